"""Up-front checks of config values that cannot be meant.

`check(config)` runs before a run touches its work directory and raises
`ConfigValueError` with one line naming the field, the value, and what to
give instead. Each field's allowed values are declared beside its default
(`allowed` in tuning/config/defaults.py's FIELDS: batch sizes and durations
of at least one, rates of at least 0, probabilities in their range, known
names); this module applies them, then checks what depends on several
fields (warm-up shorter than the run, fractions that leave data to train
on, a batch that splits into micro-batches). What needs the data (a
duration in epochs, the device count) is checked where it is resolved:
`check_schedule`.
"""

from __future__ import annotations

from tuning.config.defaults import FIELD, FIELDS


class ConfigValueError(ValueError):
  """A config value that cannot be meant, worded for the user."""


_ABSENT = object()  # a field the config lacks


def _get(config, dotted: str):
  """The value at `dotted`, or _ABSENT where the config has no such field
  (a config not built on base_config(), e.g. a test's few fields)."""
  node = config
  for part in dotted.split('.'):
    if node is None or part not in node:
      return _ABSENT
    node = node[part]
  return node


def _value(config, dotted: str):
  """The value at `dotted`, None where the config has no such field."""
  value = _get(config, dotted)
  return None if value is _ABSENT else value


def check_field(dotted: str, value):
  """Raises ConfigValueError if the field `dotted` does not allow `value`
  (its `allowed` rule in defaults.FIELDS)."""
  problem = FIELD[dotted].problem(value)
  if problem:
    raise ConfigValueError(problem)


def check(config):
  """Raises ConfigValueError for the first value that cannot be meant:
  each field against its declared rule (in the order of defaults.FIELDS),
  then what depends on several fields."""
  for field in FIELDS:
    value = _get(config, field.path)
    if value is not _ABSENT:
      check_field(field.path, value)
  # config.parallelism: checked by layouts.make_layout, before any file.
  fractions = sum(
      _value(config, f'data.{f}_fraction') or 0 for f in ('validation', 'test')
  )
  if fractions >= 1:
    raise ConfigValueError(
        f'config.data.validation_fraction + test_fraction = {fractions:g} '
        'leaves nothing to train on: make their sum less than 1'
    )
  batch_size = _value(config, 'training.batch_size')
  accumulation = _value(config, 'training.accumulation_steps') or 1
  if batch_size % accumulation:
    raise ConfigValueError(
        f'config.training.batch_size={batch_size} '
        'does not split into config.training.accumulation_steps='
        f'{accumulation} micro-batches: make the batch size a multiple of it'
    )
  base_dtype = _value(config, 'lora.base_dtype')
  if base_dtype not in (None, 'float32') and not _value(config, 'lora.rank'):
    raise ConfigValueError(
        f'config.lora.base_dtype={base_dtype!r} stores the frozen base of a '
        'LoRA run: set config.lora.rank (e.g. 8), or leave base_dtype at '
        "'float32'"
    )
  mode = _value(config, 'mode')
  _one_duration(config, 'training', 'total', required=mode == 'train')
  _one_duration(config, 'training', 'eval_every')
  _one_duration(config, 'training', 'checkpoint_every')
  if (
      _value(config, 'optimizer.warmup_steps') is not None
      and _value(config, 'optimizer.warmup_epochs') is not None
  ):
    raise ConfigValueError(
        'config.optimizer.warmup_steps and warmup_epochs '
        'are both set: give only one of them'
    )
  check_schedule(
      _value(config, 'training.total_steps'),
      _value(config, 'optimizer.warmup_steps'),
  )
  check_schedule(
      _value(config, 'training.total_epochs'),
      _value(config, 'optimizer.warmup_epochs'),
      unit='epochs',
  )
  if mode == 'soup' and _value(config, 'soup.run'):
    if _value(config, 'soup.members'):
      raise ConfigValueError(
          'config.soup.run and config.soup.members are both set: average '
          'the last checkpoints of one run, or members, not both'
      )
    if _value(config, 'soup.last_checkpoints') is None:
      raise ConfigValueError(
          'config.soup.run needs config.soup.last_checkpoints: how many of '
          "the run's latest checkpoints to average, e.g. 5"
      )
  elif mode in ('ensemble', 'soup') and not _value(config, f'{mode}.members'):
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


def _one_duration(config, section: str, name: str, required: bool = False):
  """At most one of `<name>_steps` and `<name>_epochs` (one if
  `required`)."""
  steps, epochs = f'{section}.{name}_steps', f'{section}.{name}_epochs'
  if _value(config, steps) is not None and _value(config, epochs) is not None:
    raise ConfigValueError(
        f'config.{steps}={_value(config, steps)!r} and config.{epochs}='
        f'{_value(config, epochs)!r} are both set: give only one of them'
    )
  if (
      required
      and _value(config, steps) is None
      and _value(config, epochs) is None
  ):
    raise ConfigValueError(
        f'the run has no length: set --config.{steps}=N '
        f'or --config.{epochs}=E'
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
