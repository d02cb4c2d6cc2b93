"""A sweep's definition and its Optuna study.

`prepare` loads and checks what a sweep runs (the config file's
`get_sweep(arg)` or a spec from the command line, the `--config.k=v`
overrides of every trial) into a `Sweep`; `open_study` creates or reopens
its study (grid, random or TPE sampler, median pruning) in DIR/study.db or a
shared `--storage`, checking that it holds this sweep; `remaining` counts
the trials a worker still starts; `dry_run` prints the commands a cluster
scheduler would run. Running the trials is tuning/sweep/trials.py's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import socket
import sys

import optuna

from tuning.config import loading as config_loading
from tuning.sweep import space as sweep_space
from tuning.sweep.space import SweepError

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
MAIN = os.path.join(REPO, 'main.py')
HOST = socket.gethostname()
FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


@dataclasses.dataclass
class Sweep:
  """A sweep's definition: what every trial runs, and where."""

  config: str  # 'experiments/x.py[:arg]', the path absolute
  workdir: str  # absolute
  spec: dict  # sweep_space.normalize()d
  overrides: list[str]  # '--config.k=v' (and main_flags) for every trial
  storage: str
  study_name: str
  main: str = MAIN

  def command(self, trial_dir: str, values: dict) -> list[str]:
    return (
        [
            sys.executable,
            self.main,
            f'--config={self.config}',
            f'--workdir={trial_dir}',
        ]
        + self.overrides
        + [f'--config.{k}={v}' for k, v in values.items()]
    )

  def identity(self) -> dict:
    """What must match for a rerun to continue an existing study."""
    return {
        'config': self.config,
        'overrides': self.overrides,
        'spec': sweep_space.to_json(self.spec),
        'main': self.main,
    }


def load_spec(config_spec: str):
  """The config file's `get_sweep(arg)`, or None where it has none."""
  path, _, arg = config_spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)  # load_config_file checked it loads
  if not hasattr(module, 'get_sweep'):
    return None
  try:
    return module.get_sweep(arg) if arg else module.get_sweep()
  except Exception as e:  # the user's function rejecting its argument
    raise SweepError(
        f'{path}: get_sweep({arg!r}) failed: ' f'{type(e).__name__}: {e}'
    ) from None


def prepare(
    config: str,
    workdir: str,
    spec: dict | None = None,
    overrides=(),
    storage: str | None = None,
    study_name: str | None = None,
    main: str = MAIN,
    main_flags=(),
    **changes,
) -> Sweep:
  """Loads and checks everything a sweep needs; runs nothing.

  `spec` None: the config file's get_sweep. `overrides`: 'k=v' or
  '--config.k=v' for every trial. `main_flags`: main.py's other flags for
  every trial (its process settings, '--malloc=tuned'). `changes`: spec
  entries to replace (metric=..., trials=...), None meaning unchanged.
  """
  path, colon, arg = config.partition(':')
  config = os.path.abspath(path) + colon + arg
  loaded = config_loading.load_config_file(config)
  if spec is None:
    spec = load_spec(config)
    if spec is None:
      raise SweepError(
          f'{path} has no get_sweep(arg=None); define one or '
          "pass --sweep='key=v1,v2;key2=...'"
      )
  spec = dict(spec, **{k: v for k, v in changes.items() if v is not None})
  spec = sweep_space.normalize(spec, loaded)
  flags = []
  for text in overrides:
    text = text.removeprefix('--').removeprefix('config.')
    key, eq, _ = text.partition('=')
    if not eq:
      raise SweepError(f'override {text!r}: use --config.key=value')
    sweep_space.check_key(loaded, key)
    if key in sweep_space.swept_keys(spec):
      raise SweepError(
          f'--config.{key} is swept; leave it out of the ' 'overrides'
      )
    flags.append(f'--config.{text}')
  flags += list(main_flags)
  workdir = os.path.abspath(workdir)
  return Sweep(
      config=config,
      workdir=workdir,
      spec=spec,
      overrides=flags,
      storage=storage or default_storage(workdir),
      study_name=study_name or os.path.basename(workdir),
      main=os.path.abspath(main),
  )


def default_storage(workdir: str) -> str:
  return f'sqlite:///{os.path.join(os.path.abspath(workdir), "study.db")}'


def open_storage(url: str):
  kwargs = {'connect_args': {'timeout': 60}} if url.startswith('sqlite') else {}
  try:
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
  except Exception as e:  # a bad URL, a missing driver, no server
    raise SweepError(
        f'cannot open the study storage {printable(url)}: '
        f'{type(e).__name__}: {e}'
    ) from None


def study_exists(sweep: Sweep) -> bool:
  if sweep.storage == default_storage(sweep.workdir):
    if not os.path.exists(os.path.join(sweep.workdir, 'study.db')):
      return False
  return sweep.study_name in optuna.get_all_study_names(
      open_storage(sweep.storage)
  )


class _GridSampler(optuna.samplers.GridSampler):
  """Optuna's grid sampler, less its `after_trial`, which only stops an
  `optimize` loop once the grid is done: workers here use ask/tell and
  count the grid's trials themselves."""

  def after_trial(self, study, trial, state, values):
    del study, trial, state, values


def open_study(sweep: Sweep) -> optuna.Study:
  """Creates the study, or loads it after checking it holds this sweep."""
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  spec = sweep.spec
  if spec['sampler'] == 'grid':
    sampler = _GridSampler(
        sweep_space.grid_search_space(spec), seed=spec['seed']
    )
  elif spec['sampler'] == 'random':
    sampler = optuna.samplers.RandomSampler(seed=spec['seed'])
  else:
    sampler = optuna.samplers.TPESampler(seed=spec['seed'])
  pruner = (
      optuna.pruners.MedianPruner(**spec['pruner_args'])
      if spec['pruner'] == 'median'
      else optuna.pruners.NopPruner()
  )
  if sweep.storage == default_storage(sweep.workdir):
    os.makedirs(sweep.workdir, exist_ok=True)
  study = optuna.create_study(
      storage=open_storage(sweep.storage),
      sampler=sampler,
      pruner=pruner,
      study_name=sweep.study_name,
      direction=spec['direction'],
      load_if_exists=True,
  )
  identity = sweep.identity()
  stored = study.user_attrs.get('sweep')
  if stored is None:
    study.set_user_attr('sweep', identity)
  elif stored != identity:
    differs = ', '.join(k for k in identity if stored.get(k) != identity[k])
    raise SweepError(
        f'study {sweep.study_name!r} holds another sweep '
        f'(different {differs}); use a new --workdir or '
        '--study_name'
    )
  return study


def frozen_trial(study, number: int):
  return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def trial_id(study, number: int) -> int:
  storage = study._storage  # pylint: disable=protected-access
  return storage.get_trial_id_from_study_id_trial_number(
      storage.get_study_id_from_name(study.study_name), number
  )


def enqueue_retry(study, frozen, wall_time_s: float | None):
  """A waiting copy of an interrupted trial: same values, same directory."""
  system = {'fixed_params': dict(frozen.params)}
  for key in ('grid_id', 'search_space'):  # GridSampler's bookkeeping
    if key in frozen.system_attrs:
      system[key] = frozen.system_attrs[key]
  previous = (frozen.user_attrs.get('previous_wall_time_s') or 0) + (
      wall_time_s or 0
  )
  user = {'retry_of': frozen.number, 'previous_wall_time_s': previous}
  for key in ('trial_dir', 'overrides'):
    if key in frozen.user_attrs:
      user[key] = frozen.user_attrs[key]
  study.add_trial(
      optuna.trial.create_trial(
          state=optuna.trial.TrialState.WAITING,
          system_attrs=system,
          user_attrs=user,
      )
  )


def remaining(study, sweep: Sweep) -> int:
  """How many trials this worker starts: waiting ones + the unspent budget."""
  trials = [
      t
      for t in study.get_trials(deepcopy=False)
      if not t.user_attrs.get('interrupted')
  ]
  waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
  return waiting + max(0, sweep.spec['trials'] - len(trials))


def printable(storage: str) -> str:
  """The storage URL without its password."""
  return re.sub(r'//([^:/@]+):[^@/]+@', r'//\1:***@', storage)


def load_study(
    workdir: str, storage: str | None = None, study_name: str | None = None
) -> optuna.Study:
  """The study of a sweep directory, for `report`."""
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  workdir = os.path.abspath(workdir)
  if storage is None:
    storage = default_storage(workdir)
    if not os.path.exists(os.path.join(workdir, 'study.db')):
      raise SweepError(
          f'no sweep in {workdir} (no study.db; pass --storage '
          'for a shared study)'
      )
  names = optuna.get_all_study_names(open_storage(storage))
  name = study_name or os.path.basename(workdir)
  if name not in names:
    if study_name is None and len(names) == 1:
      name = names[0]
    else:
      raise SweepError(
          f'no study {name!r} in {printable(storage)} (have: '
          f'{", ".join(names) or "none"}); pass --study_name'
      )
  study = optuna.load_study(study_name=name, storage=open_storage(storage))
  if 'sweep' not in study.user_attrs:
    raise SweepError(f'study {name!r} was not made by tuning.sweep')
  return study


def dry_run(sweep: Sweep, worker_command: list[str] | None = None) -> str:
  """The commands a scheduler would run, one a line ('#' lines explain)."""
  spec = sweep.spec
  if spec['sampler'] != 'grid':
    command = worker_command or [
        sys.executable,
        '-m',
        'tuning.sweep',
        f'--config={sweep.config}',
        f'--workdir={sweep.workdir}',
        *sweep.overrides,
    ]
    return '\n'.join(
        [
            f'# {spec["sampler"]} sampler, {spec["trials"]} trials: values are '
            'chosen as trials finish, so run this worker (on each machine; they '
            'share the study through --storage):',
            f'cd {shlex.quote(REPO)} && {shlex.join(command)}',
        ]
    )
  finished = set()
  if study_exists(sweep):
    study = optuna.load_study(
        study_name=sweep.study_name, storage=open_storage(sweep.storage)
    )
    finished = {
        t.user_attrs.get('trial_dir')
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if not t.user_attrs.get('interrupted')
    }
  points = sweep_space.grid_points(spec)
  lines = [
      f'# {len(points)} trials, {len(points) - len(finished)} not yet '
      'finished in the study; one main.py run each (running '
      '`python -m tuning.sweep` with the same flags afterwards records '
      'them from their checkpoints):'
  ]
  for values in points:
    name = sweep_space.grid_trial_name(values)
    if name not in finished:
      lines.append(
          shlex.join(sweep.command(os.path.join(sweep.workdir, name), values))
      )
  return '\n'.join(lines)
