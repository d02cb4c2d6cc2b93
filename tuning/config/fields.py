"""How a config field is declared: its default and the values it allows.

`tuning/config/defaults.py` lists every field once as a `Field`: its
dotted path, its default (or `unset=T`: None, a field of type T left
unset), and a rule for the values it allows. `base_config()` is built from
those declarations and `tuning/config/checks.py` checks each field against
its rule, so that a default and its allowed values are written in one place.

A rule's `problem(path, value)` is the one-line error for a value it does not
allow (None for one it does). None is allowed exactly where the field is
declared `unset`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable


def is_whole(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _wrong(path: str, value, want: str) -> str:
  return f'config.{path}={value!r}: {want} (set --config.{path}=...)'


@dataclasses.dataclass(frozen=True)
class OneOf:
  """One of `choices`."""

  choices: tuple

  def __init__(self, *choices):
    object.__setattr__(self, 'choices', choices)

  def problem(self, path: str, value) -> str | None:
    if value in self.choices:
      return None
    return (
        f'unknown config.{path} {value!r}: use one of '
        + ', '.join(repr(c) for c in self.choices)
        + f' (set --config.{path}=...)'
    )


@dataclasses.dataclass(frozen=True)
class Whole:
  """A whole number (not a bool), at least `at_least` when that is set."""

  at_least: int | None = None

  def problem(self, path: str, value) -> str | None:
    if is_whole(value) and (self.at_least is None or value >= self.at_least):
      return None
    want = 'use a whole number'
    if self.at_least is not None:
      want += f' of at least {self.at_least}'
    return _wrong(path, value, want)


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite number in [low, high] (open at the ends asked for); `what`
  words the fix (default: the interval)."""

  low: float
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  what: str | None = None

  def problem(self, path: str, value) -> str | None:
    if is_number(value) and math.isfinite(value):
      above = value > self.low if self.low_open else value >= self.low
      below = value < self.high if self.high_open else value <= self.high
      if above and below:
        return None
    return _wrong(path, value, self.what or self.interval())

  def interval(self) -> str:
    left = '(' if self.low_open else '['
    right = ')' if self.high_open else ']'
    high = 'inf' if self.high == math.inf else f'{self.high:g}'
    return f'use a number in {left}{self.low:g}, {high}{right}'


@dataclasses.dataclass(frozen=True)
class Satisfies:
  """A value for which `test(value)` is true; `what` words the fix."""

  test: Callable[[Any], bool]
  what: str

  def problem(self, path: str, value) -> str | None:
    return None if self.test(value) else _wrong(path, value, self.what)


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: `path` ('training.batch_size'), its `default` (or
  `unset=T`: None, of type T, for `--config.path=...` to set), and the
  `allowed` rule its values are checked against (None: not checked here;
  a field whose values only the module reading it can judge, e.g. a model
  name, is checked there)."""

  path: str
  default: Any = None
  allowed: OneOf | Whole | Number | Satisfies | None = None
  unset: type | None = None

  def problem(self, value) -> str | None:
    """The one-line error for `value` in this field, or None."""
    if self.allowed is None or (value is None and self.unset is not None):
      return None
    return self.allowed.problem(self.path, value)
