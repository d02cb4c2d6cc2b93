"""Metrics to `metrics.jsonl` and TensorBoard event files (no TensorFlow).

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np


class MetricWriter:
  """Appends `{"step", "split", ...}` lines and TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a',
                         encoding='utf-8')
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, scalars: dict):
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()
              if np.ndim(v) == 0}
    self._jsonl.write(json.dumps({'step': int(step), 'split': split,
                                  **values}) + '\n')
    self._jsonl.flush()
    for k, v in values.items():
      self._tensorboard.add_scalar(f'{split}/{k}', v, int(step))
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  """The lines of a run's `metrics.jsonl` (for tests, sweeps and reports)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
