"""Up-front checks of config values that cannot be meant.

`check(config)` runs before a run touches its work directory and raises
`ConfigValueError` with one line naming the field, the value, and what to
give instead: batch sizes and durations of at least one, rates of at least 0,
probabilities in their range, warm-up shorter than the run, known names.
What needs the data (a duration in epochs, the device count) is checked
where it is resolved: `check_schedule`.
"""

from __future__ import annotations

import math
import numbers


class ConfigValueError(ValueError):
  """A config value that cannot be meant, worded for the user."""


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if node is None or part not in node:
      return None
    node = node[part]
  return node


def _fail(dotted: str, value, want: str):
  raise ConfigValueError(
      f'config.{dotted}={value!r}: {want} (set ' f'--config.{dotted}=...)'
  )


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(config, dotted: str, optional: bool = False):
  value = _get(config, dotted)
  if value is None and optional:
    return
  if not _is_int(value) or value < 1:
    _fail(dotted, value, 'use a whole number of at least 1')


def _non_negative_int(config, dotted: str, optional: bool = False):
  value = _get(config, dotted)
  if value is None and optional:
    return
  if not _is_int(value) or value < 0:
    _fail(dotted, value, 'use a whole number of at least 0')


def _number(
    config,
    dotted: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    what: str | None = None,
):
  """A finite number in [low, high] (open at the ends asked for)."""
  value = _get(config, dotted)
  if value is None and optional:
    return
  ok = _is_number(value) and math.isfinite(value)
  if ok:
    ok = (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high
    )
  if not ok:
    if what is None:
      left = '(' if low_open else '['
      right = ')' if high_open else ']'
      high_text = 'inf' if high == math.inf else f'{high:g}'
      what = f'use a number in {left}{low:g}, {high_text}{right}'
    _fail(dotted, value, what)


def _choice(config, dotted: str, choices, optional: bool = False):
  value = _get(config, dotted)
  if value is None and (optional or None in choices):
    return
  if value not in choices:  # worded as the modules that read it word it
    raise ConfigValueError(
        f'unknown config.{dotted} {value!r}: use one of '
        + ', '.join(repr(c) for c in choices if c is not None)
        + f' (set --config.{dotted}=...)'
    )


def _duration(config, section: str, name: str, required: bool = False):
  steps, epochs = f'{section}.{name}_steps', f'{section}.{name}_epochs'
  if _get(config, steps) is not None and _get(config, epochs) is not None:
    raise ConfigValueError(
        f'config.{steps}={_get(config, steps)!r} and config.{epochs}='
        f'{_get(config, epochs)!r} are both set: give only one of them'
    )
  if required and _get(config, steps) is None and _get(config, epochs) is None:
    raise ConfigValueError(
        f'the run has no length: set --config.{steps}=N '
        f'or --config.{epochs}=E'
    )
  _positive_int(config, steps, optional=True)
  _number(
      config,
      epochs,
      0,
      math.inf,
      low_open=True,
      optional=True,
      what='use a positive number of epochs',
  )


def check(config):
  """Raises ConfigValueError for the first value that cannot be meant."""
  mode = _get(config, 'mode')
  _choice(config, 'mode', ('train', 'eval', 'ensemble', 'soup'))
  if not _is_int(_get(config, 'seed')):
    _fail('seed', _get(config, 'seed'), 'use a whole number')
  _choice(config, 'dtype', ('float32', 'bfloat16'))
  _choice(config, 'xla_cpu_dots', ('auto', 'eigen', 'ynnpack'))
  _choice(config, 'host_malloc', ('tuned', 'default'))
  # config.parallelism: checked by sharding.make_layout, before any file.
  for axis in ('data', 'fsdp'):
    value = _get(config, f'mesh.{axis}')
    if value is not None and (
        not _is_int(value) or (value < 1 and value != -1)
    ):
      _fail(
          f'mesh.{axis}',
          value,
          'use a positive number of devices, or -1 ' 'for the rest',
      )
  # ---- data
  _number(
      config, 'data.validation_fraction', 0, 1, high_open=True, optional=True
  )
  _number(config, 'data.test_fraction', 0, 1, high_open=True, optional=True)
  fractions = sum(
      _get(config, f'data.{f}_fraction') or 0 for f in ('validation', 'test')
  )
  if fractions >= 1:
    raise ConfigValueError(
        f'config.data.validation_fraction + test_fraction = {fractions:g} '
        'leaves nothing to train on: make their sum less than 1'
    )
  _choice(config, 'data.on_bad_rows', ('error', 'drop'), optional=True)
  _choice(config, 'data.normalize', (None, 'none', 'standard', 'minmax'))
  for field in (
      'pca_components',
      'examples_per_class',
      'max_train_examples',
      'max_validation_examples',
  ):
    _positive_int(config, f'data.{field}', optional=True)
  for field in ('vocab_size', 'max_length', 'read_threads'):
    _positive_int(config, f'data.{field}', optional=True)
  # ---- model
  _number(
      config,
      'model.dropout',
      0,
      1,
      high_open=True,
      optional=True,
      what='use a dropout rate in [0, 1) (0 turns dropout off)',
  )
  num_classes = _get(config, 'model.num_classes')
  if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
    _fail(
        'model.num_classes',
        num_classes,
        'use at least 2 classes, or ' 'None to take them from the data',
    )
  for field in ('hidden', 'channels'):
    value = _get(config, f'model.{field}')
    if value is not None and (
        not isinstance(value, (tuple, list))
        or not all(_is_int(v) and v >= 1 for v in value)
    ):
      _fail(
          f'model.{field}',
          value,
          'use a tuple of positive layer sizes, ' "e.g. '(128, 128)'",
      )
  # ---- optimizer
  _choice(config, 'optimizer.name', ('adam', 'adamw', 'sgd'))
  _number(
      config,
      'optimizer.learning_rate',
      0,
      math.inf,
      what='use a positive learning rate, e.g. 1e-3 (0 trains nothing)',
  )
  _number(
      config,
      'optimizer.weight_decay',
      0,
      math.inf,
      optional=True,
      what='use a weight decay of at least 0',
  )
  _number(config, 'optimizer.momentum', 0, 1, high_open=True, optional=True)
  for field in ('b1', 'b2'):
    _number(config, f'optimizer.{field}', 0, 1, high_open=True, optional=True)
  _number(
      config,
      'optimizer.eps',
      0,
      math.inf,
      low_open=True,
      optional=True,
      what='use a small positive number, e.g. 1e-8',
  )
  _number(
      config,
      'optimizer.clip_norm',
      0,
      math.inf,
      optional=True,
      what='use a positive norm, or 0 to turn clipping off',
  )
  _choice(
      config,
      'optimizer.schedule',
      ('cosine', 'linear', 'constant', 'rsqrt'),
      optional=True,
  )
  _number(
      config,
      'optimizer.end_learning_rate_factor',
      0,
      math.inf,
      optional=True,
      what='use a factor of at least 0',
  )
  _number(config, 'optimizer.layer_decay', 0, 1, low_open=True, optional=True)
  _non_negative_int(config, 'optimizer.warmup_steps', optional=True)
  _number(
      config,
      'optimizer.warmup_epochs',
      0,
      math.inf,
      optional=True,
      what='use a number of epochs of at least 0',
  )
  # ---- training
  _positive_int(config, 'training.batch_size')
  _positive_int(config, 'training.eval_batch_size')
  _positive_int(config, 'training.log_every_steps', optional=True)
  _positive_int(config, 'training.accumulation_steps', optional=True)
  accumulation = _get(config, 'training.accumulation_steps') or 1
  if _get(config, 'training.batch_size') % accumulation:
    raise ConfigValueError(
        f'config.training.batch_size={_get(config, "training.batch_size")} '
        'does not split into config.training.accumulation_steps='
        f'{accumulation} micro-batches: make the batch size a multiple of it'
    )
  _duration(config, 'training', 'total', required=mode == 'train')
  _duration(config, 'training', 'eval_every')
  _duration(config, 'training', 'checkpoint_every')
  if (
      _get(config, 'optimizer.warmup_steps') is not None
      and _get(config, 'optimizer.warmup_epochs') is not None
  ):
    raise ConfigValueError(
        'config.optimizer.warmup_steps and warmup_epochs '
        'are both set: give only one of them'
    )
  check_schedule(
      _get(config, 'training.total_steps'),
      _get(config, 'optimizer.warmup_steps'),
  )
  check_schedule(
      _get(config, 'training.total_epochs'),
      _get(config, 'optimizer.warmup_epochs'),
      unit='epochs',
  )
  _choice(config, 'training.on_nonfinite', ('stop', 'skip'), optional=True)
  _choice(
      config,
      'training.prng_impl',
      ('threefry2x32', 'rbg', 'unsafe_rbg', 'hash'),  # tuning/engine/prng.py
      optional=True,
  )
  _choice(
      config,
      'training.dropout_keys',
      ('per_example', 'per_shard'),
      optional=True,
  )
  _number(config, 'training.ema_decay', 0, 1, high_open=True, optional=True)
  _positive_int(config, 'training.early_stopping_patience', optional=True)
  # ---- lora, checkpoints, init, members
  _non_negative_int(config, 'lora.rank', optional=True)
  _number(
      config,
      'lora.alpha',
      0,
      math.inf,
      low_open=True,
      optional=True,
      what='use a positive scale, e.g. 16',
  )
  _number(config, 'lora.dropout', 0, 1, high_open=True, optional=True)
  _choice(config, 'checkpoint.best_mode', ('max', 'min'), optional=True)
  _choice(config, 'checkpoint.evaluate', ('best', 'latest'), optional=True)
  step = _get(config, 'init.step')
  if (
      step is not None
      and step not in ('best', 'latest')
      and not (_is_int(step) or (isinstance(step, str) and step.isdigit()))
  ):
    _fail('init.step', step, "use 'best', 'latest' or a step number")
  _choice(config, 'soup.method', ('greedy', 'uniform'), optional=True)
  _positive_int(config, 'checkpoint.keep', optional=True)
  _positive_int(config, 'soup.last_checkpoints', optional=True)
  if mode == 'soup' and _get(config, 'soup.run'):
    if _get(config, 'soup.members'):
      raise ConfigValueError(
          'config.soup.run and config.soup.members are both set: average '
          'the last checkpoints of one run, or members, not both'
      )
    if _get(config, 'soup.last_checkpoints') is None:
      raise ConfigValueError(
          'config.soup.run needs config.soup.last_checkpoints: how many of '
          "the run's latest checkpoints to average, e.g. 5"
      )
  elif mode in ('ensemble', 'soup') and not _get(config, f'{mode}.members'):
    raise ConfigValueError(
        f'config.mode={mode} needs members: set '
        f'--config.{mode}.members=\'("/runs/a", '
        '"/runs/b")\' (run work directories)'
        + (
            ', or average the last checkpoints of one run with '
            'config.soup.run and config.soup.last_checkpoints'
        )
        * (mode == 'soup')
    )


def check_schedule(total, warmup, unit: str = 'steps'):
  """Warm-up must not outlast the run (both in the same unit)."""
  if total is None or warmup is None:
    return
  if warmup > total:
    raise ConfigValueError(
        f'warm-up of {warmup:g} {unit} is longer than the run '
        f'({total:g} {unit}): lower config.optimizer.warmup_{unit} or raise '
        f'config.training.total_{unit}'
    )
