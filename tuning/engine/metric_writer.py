"""Metrics to `metrics.jsonl` and TensorBoard event files (no TensorFlow;
tuning/engine/event_file.py writes them).

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tuning.engine import event_file


class MetricWriter:
  """Appends `{"step", "split", ...}` lines and TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      self._jsonl = open(path, 'a', encoding='utf-8')
      if self._jsonl.tell() and not _ends_with_newline(path):
        self._jsonl.write('\n')  # a killed run's half-written last line
      self._tensorboard = event_file.EventFileWriter(
          os.path.join(workdir, 'tensorboard')
      )

  def write(self, step: int, split: str, scalars: dict):
    if not self.enabled:
      return
    values = {
        k: float(np.asarray(v)) for k, v in scalars.items() if np.ndim(v) == 0
    }
    self._jsonl.write(
        json.dumps({'step': int(step), 'split': split, **values}) + '\n'
    )
    self._jsonl.flush()
    self._tensorboard.add_scalars(
        int(step), {f'{split}/{k}': v for k, v in values.items()}
    )
    self._tensorboard.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'


def read_metrics(workdir: str) -> list[dict]:
  """The lines of a run's `metrics.jsonl` (for tests, sweeps and reports);
  a line cut short by a killed run is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  lines = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      try:
        lines.append(json.loads(line))
      except ValueError:
        continue
  return [l for l in lines if isinstance(l, dict)]


def validation_history(workdir: str, up_to_step: int) -> list[dict]:
  """The run's validation evaluations across restarts, from metrics.jsonl.

  One entry per step (the last logged wins: a resumed run re-evaluates the
  steps after its checkpoint), steps <= `up_to_step` only, in step order.
  """
  by_step = {}
  for line in read_metrics(workdir):
    step = line.get('step')
    if (
        line.get('split') == 'validation'
        and isinstance(step, int)
        and step <= up_to_step
    ):
      by_step[step] = {
          'step': step,
          **{
              k: v
              for k, v in line.items()
              if k not in ('step', 'split', 'elapsed_s')
          },
      }
  return [by_step[s] for s in sorted(by_step)]
