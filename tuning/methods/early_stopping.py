"""Early stopping on a validation metric (`config.checkpoint.best_metric`).

The run stops after `config.training.early_stopping_patience` evaluations
without an improvement; the final test evaluation then uses the best
checkpoint as usual. On resume the counter is rebuilt from the validation
lines of `metrics.jsonl` up to the resumed step.
"""

from __future__ import annotations

import json
import os


class EarlyStopping:
  """Counts evaluations since the best value of one metric."""

  def __init__(self, patience: int, metric: str, mode: str = 'max'):
    if patience < 1:
      raise ValueError(
          f'config.training.early_stopping_patience={patience}: '
          'use a positive number of evaluations, or leave it '
          'unset'
      )
    self.patience, self.metric, self.mode = patience, metric, mode
    self.best = None
    self.best_step = None
    self.since_best = 0

  def update(self, step: int, metrics: dict) -> bool:
    """Records an evaluation; True when the run should stop."""
    if self.metric not in metrics:
      raise ValueError(
          f'config.checkpoint.best_metric={self.metric!r} is not '
          f'a validation metric (have: {", ".join(metrics)})'
      )
    value = float(metrics[self.metric])
    better = self.best is None or (
        value > self.best if self.mode == 'max' else value < self.best
    )
    if better:
      self.best, self.best_step, self.since_best = value, step, 0
    else:
      self.since_best += 1
    return self.since_best >= self.patience

  def replay(self, workdir: str, up_to_step: int):
    """Feeds the validation results logged before a resume."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
      return
    seen = {}
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if row.get('split') == 'validation' and 0 < row['step'] <= up_to_step:
          seen[row['step']] = row  # a rerun step overwrites
    for step in sorted(seen):
      self.update(step, seen[step])

  def message(self, step: int) -> str:
    return (
        f'early stopping at step {step}: validation {self.metric} has not'
        f' improved for {self.since_best} evaluations (best '
        f'{self.best:.4f} at step {self.best_step})'
    )
