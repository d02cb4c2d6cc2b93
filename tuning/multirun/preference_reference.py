"""The reference model of DPO and IPO: its log-probs of every pair, once.

DPO's loss compares the policy's summed reply log-probs with those of the
frozen reference (the pretrained model). Rather than run the reference in
every train step, the run computes them once, before its first step, from
the pretrained parameters (with LoRA, the same tree with every adapter
off, `lora.without_adapters`), and adds them to every split as the
columns `ref_chosen_logps` and `ref_rejected_logps` (as TRL's
`precompute_ref_log_probs`). They are cached in
WORKDIR/reference_logps.npz, so that a resumed run reads the same values
instead of needing the pretrained parameters again; a cache made for other
pairs is an error.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import numpy as np

from tuning.data import pipeline
from tuning.terminal import console
from tuning.methods import lora
from tuning.tasks import preference

FILE = 'reference_logps.npz'
SPLITS = ('train', 'validation', 'test')


def _fingerprint(table) -> np.ndarray:
  """Rows and token sums of both sides: what identifies a split's pairs."""
  return np.array(
      [len(table['chosen_input_ids'])]
      + [
          int(table[f'{side}_{c}'].astype(np.int64).sum())
          for side in preference.SIDES
          for c in ('input_ids', 'loss_mask')
      ],
      np.int64,
  )


def split_logps(
    model, params, table, batch_size: int, buckets=(), progress: str = ''
):
  """(chosen, rejected) summed reply log-probs, float32 [rows], of every
  pair of `table` under `params`, `batch_size` pairs a forward pass;
  `progress` names the pass in a console line every 30 seconds."""
  logps = jax.jit(
      lambda p, b: preference.stacked_logps(
          model.apply({'params': p}, **preference.stacked_inputs(b)), b
      )[:2]
  )
  rows = len(table['chosen_input_ids'])
  columns = [f'{s}_{c}' for s in preference.SIDES for c in preference.COLUMNS]
  out = np.zeros((2, rows), np.float32)
  shown = time.time()
  for start in range(0, rows, batch_size):
    if progress and time.time() - shown > 30:
      console.info(f'{progress}: {start}/{rows} pairs')
      shown = time.time()
    stop = min(start + batch_size, rows)
    batch = {}
    for name in columns:
      part = np.zeros((batch_size,) + table[name].shape[1:], np.int32)
      part[: stop - start] = table[name][start:stop]
      batch[name] = part
    chosen, rejected = logps(params, pipeline.trim_to_bucket(batch, buckets))
    out[0, start:stop] = np.asarray(chosen)[: stop - start]
    out[1, start:stop] = np.asarray(rejected)[: stop - start]
  return out[0], out[1]


def add_reference_logps(run, pretrained: Callable[[], object]):
  """Adds the reference columns to `run.data`'s splits, from the cache or
  from `pretrained()` (the loaded parameters). Returns (log lines, the
  loaded parameters or None where the cache held the values)."""
  path = os.path.join(run.workdir, FILE)
  tables = {name: run.data.split(name) for name in SPLITS}
  if not isinstance(tables['train'], dict):
    raise ValueError(
        'config.task=preference reads its pairs into memory: use '
        'config.data.path files, not records'
    )
  loaded, values = None, {}
  if os.path.exists(path):
    with np.load(path) as cache:
      for name, table in tables.items():
        if f'{name}_fingerprint' not in cache or not np.array_equal(
            cache[f'{name}_fingerprint'], _fingerprint(table)
        ):
          raise ValueError(
              f'{path} holds reference log-probs of other {name} pairs than '
              'this run reads: use a new --workdir, or delete the file to '
              'recompute them'
          )
        values[name] = (cache[f'{name}_chosen'], cache[f'{name}_rejected'])
    line = f'reference: log-probs of every pair read from {path}'
  else:
    loaded = pretrained()
    reference = lora.without_adapters(loaded)
    batch = int(run.config.training.eval_batch_size)
    for name, table in tables.items():
      values[name] = split_logps(
          run.model,
          reference,
          table,
          batch,
          run.buckets,
          progress=f'reference log-probs, {name}',
      )
    if jax.process_index() == 0:
      os.makedirs(run.workdir, exist_ok=True)
      arrays = {}
      for name, (chosen, rejected) in values.items():
        arrays[f'{name}_chosen'] = chosen
        arrays[f'{name}_rejected'] = rejected
        arrays[f'{name}_fingerprint'] = _fingerprint(tables[name])
      with open(path + '.tmp', 'wb') as f:
        np.savez(f, **arrays)
      os.replace(path + '.tmp', path)
    line = (
        'reference: log-probs of every pair computed with the pretrained '
        f'parameters{" (LoRA adapters off)" if run.lora else ""}, cached in '
        f'{path}'
    )
  for name, (chosen, rejected) in values.items():
    tables[name]['ref_chosen_logps'] = chosen
    tables[name]['ref_rejected_logps'] = rejected
  train = values['train']
  mean = float(np.mean(train[0] - train[1]))
  return [
      line,
      f'reference: mean chosen - rejected log-prob on train {mean:.3f}',
  ], loaded
