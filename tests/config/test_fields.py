"""Each config field's default and allowed values are declared once
(tuning/config/defaults.py's FIELDS): base_config() and the checks are
derived from that declaration, and the modules that implement a field's
choices implement exactly the declared ones."""

import dataclasses

import pytest

from tuning.config import checks
from tuning.config import defaults
from tuning.config.defaults import FIELD, base_config
from tuning.config.fields import OneOf
from tuning.engine import train_step
from tuning.modes import experiment


def _config(**fields):
  config = base_config()
  config.training.total_steps = 10
  for path, value in fields.items():
    section, name = path.split('__')
    with config[section].ignore_type():
      config[section][name] = value
  return config


def test_the_check_is_the_declared_rule(monkeypatch):
  config = _config(training__on_nonfinite='retry')
  with pytest.raises(checks.ConfigValueError, match="'stop', 'skip' \\("):
    checks.check(config)
  # Declare one more choice: the check allows it and names it.
  declared = dataclasses.replace(
      FIELD['training.on_nonfinite'], allowed=OneOf('stop', 'skip', 'retry')
  )
  monkeypatch.setitem(FIELD, 'training.on_nonfinite', declared)
  monkeypatch.setattr(
      checks,
      'FIELDS',
      tuple(declared if f.path == declared.path else f for f in checks.FIELDS),
  )
  checks.check(config)
  with pytest.raises(checks.ConfigValueError, match="'skip', 'retry' \\("):
    checks.check(_config(training__on_nonfinite='halt'))


def test_none_is_allowed_exactly_where_the_field_is_declared_unset():
  checks.check(_config(training__ema_decay=None))  # unset=float
  with pytest.raises(checks.ConfigValueError, match='accumulation_steps=None'):
    checks.check(_config(training__accumulation_steps=None))  # default 1


def test_base_config_holds_each_declared_default():
  config = base_config()
  paths = {f.path for f in defaults.FIELDS}
  assert len(paths) == len(defaults.FIELDS)  # each field declared once
  for field in defaults.FIELDS:
    node = config
    for part in field.path.split('.'):
      node = node[part]
    expected = None if field.unset else field.default
    assert node == expected or (expected == {} and not node), field.path
  # Placeholders keep their type for --config.a.b=value overrides.
  config.training.ema_decay = 0.9
  with pytest.raises(TypeError):
    config.training.ema_decay = 'high'
  # Each base_config() is a fresh one (placeholders are not shared).
  assert base_config().training.ema_decay is None


def test_the_implemented_choices_are_the_declared_ones():
  choices = lambda path: set(FIELD[path].allowed.choices)  # pylint: disable=unnecessary-lambda-assignment
  assert set(train_step.DROPOUT_KEYS) == choices('training.dropout_keys')
  assert set(experiment.RUNNERS) == choices('mode')
