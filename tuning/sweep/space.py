"""What a sweep varies: its spec, checked, and the overrides of each trial.

A spec is a plain dict, returned by `get_sweep(arg)` next to `get_config` in
an experiment file, or built from `--sweep` on the command line:

  {'grid': {'optimizer.learning_rate': (1e-3, 3e-3), 'seed': (0, 1)},
   'zip': {'model.hidden': ((32,), (64, 64)), 'model.dropout': (0.0, 0.2)}}
      every combination of the `grid` values, times the rows of `zip` (its
      lists vary together, so they have one length): 2 x 2 x 2 = 8 trials;
  {'space': {'optimizer.learning_rate': ('loguniform', 1e-4, 1e-2),
             'model.dropout': ('uniform', 0.0, 0.5),
             'training.batch_size': ('int', 16, 64),
             'optimizer.name': ('choice', ('adam', 'sgd'))},
   'trials': 8, 'sampler': 'tpe'}       # or 'random'
      values chosen by an Optuna sampler, `trials` in all.

Optional keys (defaults): 'metric' ('accuracy'; or 'macro_f1', 'loss'), the
best validation value of which each trial is ranked by; 'direction'
('maximize', 'minimize' for loss); 'pruner' ('median' for spaces, None for
grids: a grid means every point run to the end); 'pruner_args' (MedianPruner
keyword arguments, {}); 'seed' (the sampler's, 0).

Command line, `--sweep='k=v1,v2;k2=v3,v4'` (a grid) where a value list is
Python literals (`model.hidden=(32,),(64,64)`) or bare words
(`optimizer.name=adam,sgd`), and `k=loguniform(1e-4,1e-2)`, `uniform(a,b)`,
`int(a,b)`, `choice(v1,v2)` for a space; `--zip='k=..;k2=..'` for lists that
vary together.

Each trial's values become `--config.<key>=<value>` overrides of main.py.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re

from tuning.config import loading as config_loading

METRICS = ('accuracy', 'macro_f1', 'loss')
SAMPLERS = ('grid', 'random', 'tpe')
KINDS = ('uniform', 'loguniform', 'int', 'choice')
KEYS = (
    'grid',
    'zip',
    'space',
    'trials',
    'sampler',
    'metric',
    'direction',
    'pruner',
    'pruner_args',
    'seed',
)
ZIP_PARAM = '_zip_row'  # the Optuna parameter holding the row of `zip`


class SweepError(ValueError):
  """A bad sweep spec or flag, worded for the user in one line."""


def normalize(spec: dict, config=None) -> dict:
  """Checks `spec` (against `config`'s keys if given); fills in defaults."""
  if not isinstance(spec, dict):
    raise SweepError(f'a sweep spec is a dict, got {type(spec).__name__}')
  unknown = sorted(set(spec) - set(KEYS))
  if unknown:
    raise SweepError(
        f'unknown sweep spec key(s) {", ".join(unknown)} (use: '
        f'{", ".join(KEYS)})'
    )
  grid = {k: _values(k, v, 'grid') for k, v in (spec.get('grid') or {}).items()}
  zipped = {k: _values(k, v, 'zip') for k, v in (spec.get('zip') or {}).items()}
  space = {k: _dimension(k, v) for k, v in (spec.get('space') or {}).items()}
  if space and (grid or zipped):
    raise SweepError(
        'a sweep has either a grid/zip or a search space, not ' 'both'
    )
  if not (space or grid or zipped):
    raise SweepError('the sweep varies nothing: give grid, zip or space')
  if len({len(v) for v in zipped.values()}) > 1:
    raise SweepError(
        'zip lists vary together, so they need one length; got '
        + ', '.join(f'{k}: {len(v)}' for k, v in zipped.items())
    )
  both = sorted(set(grid) & set(zipped))
  if both:
    raise SweepError(f'{", ".join(both)} is both in grid and in zip')
  sampler = spec.get('sampler') or ('tpe' if space else 'grid')
  if sampler not in SAMPLERS:
    raise SweepError(
        f'unknown sampler {sampler!r} (use: ' f'{", ".join(SAMPLERS)})'
    )
  if space and sampler == 'grid':
    raise SweepError(
        'a search space needs sampler random or tpe; a grid '
        'sampler takes grid/zip values'
    )
  if not space and sampler != 'grid':
    raise SweepError(
        f'sampler {sampler!r} needs a search space (space: ...);'
        ' grid/zip values are run by the grid sampler'
    )
  trials = spec.get('trials')
  if space and (not isinstance(trials, int) or trials < 1):
    raise SweepError(
        'a search space needs a trial budget: trials=<positive ' 'int>'
    )
  if not space:
    points = len(grid_points({'grid': grid, 'zip': zipped}))
    if trials not in (None, points):
      raise SweepError(
          f'the grid has {points} trials; trials={trials} is '
          'for search spaces'
      )
    trials = points
  metric = spec.get('metric') or 'accuracy'
  if metric not in METRICS:
    raise SweepError(f'unknown metric {metric!r} (use: {", ".join(METRICS)})')
  direction = spec.get('direction') or (
      'minimize' if metric == 'loss' else 'maximize'
  )
  if direction not in ('maximize', 'minimize'):
    raise SweepError(f'direction is maximize or minimize, not {direction!r}')
  pruner = spec.get('pruner', 'median' if space else None)
  if pruner in ('none', 'None'):
    pruner = None
  if pruner not in ('median', None):
    raise SweepError(f'unknown pruner {pruner!r} (use: median, none)')
  result = {
      'grid': grid,
      'zip': zipped,
      'space': space,
      'trials': trials,
      'sampler': sampler,
      'metric': metric,
      'direction': direction,
      'pruner': pruner,
      'pruner_args': dict(spec.get('pruner_args') or {}),
      'seed': int(spec.get('seed') or 0),
  }
  if config is not None:
    for key in swept_keys(result):
      check_key(config, key)
  return result


def check_key(config, key: str):
  try:
    config_loading.check_override(config, key)
  except config_loading.ConfigError as e:
    raise SweepError(f'sweep: {e}') from None


def _values(key, values, where) -> tuple:
  if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
    raise SweepError(
        f'{where} values of {key} are a tuple or list, got ' f'{values!r}'
    )
  if not values:
    raise SweepError(f'{where} values of {key} are empty')
  return tuple(values)


def _dimension(key, dim) -> tuple:
  if not isinstance(dim, (tuple, list)) or not dim or dim[0] not in KINDS:
    raise SweepError(
        f'space entry {key}={dim!r}: use (kind, ...) with kind '
        f'one of {", ".join(KINDS)}'
    )
  kind = dim[0]
  if kind == 'choice':
    if len(dim) != 2:
      raise SweepError(f"space entry {key}: use ('choice', (v1, v2, ...))")
    return ('choice', _values(key, dim[1], 'choice'))
  if (
      len(dim) != 3
      or not all(isinstance(x, (int, float)) for x in dim[1:])
      or not dim[1] < dim[2]
  ):
    raise SweepError(
        f'space entry {key}={tuple(dim)!r}: use ({kind!r}, low, '
        'high) with low < high'
    )
  if kind == 'loguniform' and dim[1] <= 0:
    raise SweepError(f'space entry {key}: loguniform needs low > 0')
  if kind == 'int' and not all(isinstance(x, int) for x in dim[1:]):
    raise SweepError(f'space entry {key}: int bounds are integers')
  return (kind, dim[1], dim[2])


def swept_keys(spec: dict) -> list[str]:
  return list(spec['grid']) + list(spec['zip']) + list(spec['space'])


def to_json(spec: dict) -> str:
  """A canonical text of the spec (to see whether a study holds this one)."""
  return json.dumps(spec, default=repr)  # in spec order: names follow it


# ------------------------------------------------------------------ values


def encode(value):
  """A value as Optuna stores it: numbers and strings as they are, others
  (tuples, booleans, None) as their Python literal."""
  if isinstance(value, (int, float, str)) and not isinstance(value, bool):
    return value
  return repr(tuple(value) if isinstance(value, list) else value)


def override_text(value) -> str:
  """The text after `--config.key=` for an (encoded) value."""
  return repr(value) if isinstance(value, float) else str(value)


def grid_points(spec: dict) -> list[dict]:
  """Every trial of a grid/zip spec, as {key: override text}, in order."""
  grid, zipped = spec['grid'], spec['zip']
  rows = list(zip(*zipped.values())) if zipped else [()]
  points = []
  for combo in itertools.product(*grid.values()):
    for row in rows:
      point = dict(zip(grid, combo))
      point.update(zip(zipped, row))
      points.append({k: override_text(encode(v)) for k, v in point.items()})
  return points


def grid_search_space(spec: dict) -> dict:
  """The search space of Optuna's GridSampler: zip rows are one parameter."""
  space = {k: [encode(v) for v in values] for k, values in spec['grid'].items()}
  if spec['zip']:
    space[ZIP_PARAM] = list(range(len(next(iter(spec['zip'].values())))))
  return space


def suggest(trial, spec: dict) -> dict:
  """Asks the Optuna trial for its values; returns {key: override text}."""
  overrides = {}
  if spec['sampler'] == 'grid':
    for key, values in grid_search_space(spec).items():
      value = trial.suggest_categorical(key, values)
      if key == ZIP_PARAM:
        for zkey, zvalues in spec['zip'].items():
          overrides[zkey] = override_text(encode(zvalues[value]))
      else:
        overrides[key] = override_text(value)
    return {k: overrides[k] for k in swept_keys(spec)}  # spec order
  for key, dim in spec['space'].items():
    kind = dim[0]
    if kind == 'choice':
      value = trial.suggest_categorical(key, [encode(v) for v in dim[1]])
    elif kind == 'int':
      value = trial.suggest_int(key, dim[1], dim[2])
    else:
      value = trial.suggest_float(
          key, float(dim[1]), float(dim[2]), log=kind == 'loguniform'
      )
    overrides[key] = override_text(value)
  return overrides


# ------------------------------------------------------------------ names


def short_names(keys) -> dict:
  """Each key's last component, or the whole key where two would clash."""
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def display(text: str) -> str:
  """A value's override text, short: 0.001 -> 0.001, (64, 64) -> 64-64."""
  try:
    return f'{float(text):g}' if re.search(r'[.eE]', text) else str(int(text))
  except ValueError:
    return re.sub(r'[()\[\]\'" ]', '', text).strip(',').replace(',', '-')


def grid_trial_name(overrides: dict) -> str:
  """A readable, stable directory name: `learning_rate=0.001,seed=0`."""
  names = short_names(list(overrides))
  name = ','.join(f'{names[k]}={display(v)}' for k, v in overrides.items())
  name = re.sub(r'[^A-Za-z0-9._+=,-]', '_', name)
  if len(name) > 120:  # long names: a prefix and a stable digest
    name = name[:100] + '_' + hashlib.sha1(name.encode()).hexdigest()[:8]
  return name


def space_trial_name(number: int) -> str:
  return f'trial_{number:03d}'


# ------------------------------------------------------------------ command line

_SPACE = re.compile(r'^(uniform|loguniform|int|choice)\((.*)\)$', re.S)


def parse_values(text: str) -> list:
  """'1e-3,3e-3' -> [0.001, 0.003]; '(32,),(64,64)' -> [(32,), (64, 64)];
  'adam,sgd' -> ['adam', 'sgd']."""
  try:
    values = ast.literal_eval(f'[{text}]')
  except (ValueError, SyntaxError):
    values = []
    for part in text.split(','):
      try:
        values.append(ast.literal_eval(part.strip()))
      except (ValueError, SyntaxError):
        values.append(part.strip())
  if not values or any(v == '' for v in values):
    raise SweepError(f'empty value in {text!r}')
  return values


def parse_cli(sweep: str | None, zipped: str | None = None) -> dict:
  """`--sweep` / `--zip` text -> a spec's grid/zip/space entries."""
  spec = {'grid': {}, 'zip': {}, 'space': {}}
  for text, where in ((sweep, 'sweep'), (zipped, 'zip')):
    for entry in filter(None, (e.strip() for e in (text or '').split(';'))):
      key, eq, rhs = entry.partition('=')
      key = key.strip().removeprefix('config.')
      if not eq or not key or not rhs.strip():
        raise SweepError(
            f'--{where} entry {entry!r}: use key=v1,v2 (entries '
            'separated by ;)'
        )
      match = _SPACE.match(rhs.strip())
      if match and where == 'sweep':
        kind, args = match.groups()
        values = parse_values(args)
        spec['space'][key] = (
            (kind, tuple(values)) if kind == 'choice' else (kind, *values)
        )
      else:
        spec['grid' if where == 'sweep' else 'zip'][key] = tuple(
            parse_values(rhs.strip())
        )
  return {k: v for k, v in spec.items() if v}
