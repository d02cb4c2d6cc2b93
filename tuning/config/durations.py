"""Durations given in steps or epochs, resolved to steps in one place."""

from __future__ import annotations

import math


def resolve_steps(
    section, name: str, steps_per_epoch: float, default: int | None = None
) -> int | None:
  """Reads `<name>_steps` or `<name>_epochs` from a config section.

  Exactly one may be set; epochs are rounded up to whole steps.
  """
  steps = section[f'{name}_steps']
  epochs = section[f'{name}_epochs']
  if steps is not None and epochs is not None:
    raise ValueError(
        f'set only one of {name}_steps and {name}_epochs '
        f'(both are set: {steps} and {epochs})'
    )
  if steps is not None:
    return int(steps)
  if epochs is not None:
    return max(1, int(math.ceil(epochs * steps_per_epoch)))
  return default
