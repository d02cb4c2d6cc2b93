"""Batching: a resumable grain stream for training, padded passes for eval.

Training batches come from a grain `MapDataset` (shuffled from the seed,
repeated, batched) whose iterator state is saved with each checkpoint, so a
resumed run sees exactly the batches an uninterrupted run would. Every
global batch carries an `index` column (the example's position in the
global batch), from which the train step derives per-example dropout keys:
results then do not depend on how the batch is split across devices or
hosts.

Text batches are cut to the shortest length bucket that holds their longest
example, so the jitted step compiles a few shapes instead of one per batch.

The training split is a table in memory, or a `records.RecordSplit` read by
index from ArrayRecord shards: the same shuffled index batches then read
just their rows from disk (and tokenize them, for raw text), so the two give
the same batches and the stream never holds the data set.
"""

from __future__ import annotations

import math
from typing import Iterator

import grain
import numpy as np

from tuning.data import augmentation
from tuning.data.tables import DataError, Table, num_rows

TOKEN_COLUMNS = (
    'input_ids',
    'attention_mask',
    'token_type_ids',
    'loss_mask',  # instruction data: 1 on the tokens the loss predicts
    'segment_ids',  # packed rows: 1..n per document, 0 on padding
    'positions',  # packed rows: 0 at each document's first token
)
# Sequence-to-sequence targets (tuning/data/parallel.py), cut by their own
# mask.
TARGET_COLUMNS = ('decoder_input_ids', 'target_ids', 'target_mask')


def _bucket_length(mask: np.ndarray, buckets) -> int:
  width = mask.shape[1]
  longest = int(mask.sum(axis=1).max(initial=1))
  fits = [b for b in sorted(buckets) if b >= longest] or [width]
  return min(fits[0], width)


PAIR_SIDES = ('chosen', 'rejected')  # preference pairs' column prefixes


def _trim_pairs(batch: Table, buckets) -> Table:
  """Preference pairs: both sides' token columns cut to one bucket (the
  decoder runs on them stacked)."""
  mask = np.concatenate([batch[f'{s}_attention_mask'] for s in PAIR_SIDES])
  length = _bucket_length(mask, buckets)
  names = {f'{s}_{c}' for s in PAIR_SIDES for c in TOKEN_COLUMNS}
  return {k: (v[:, :length] if k in names else v) for k, v in batch.items()}


def trim_to_bucket(batch: Table, buckets) -> Table:
  """Cuts token columns to the smallest bucket >= the longest example
  (target columns, where present, by the longest target; preference
  pairs by their longer side)."""
  if 'chosen_attention_mask' in batch and buckets:
    return _trim_pairs(batch, buckets)
  if 'attention_mask' not in batch or not buckets:
    return batch
  length = _bucket_length(batch['attention_mask'], buckets)
  out = {
      k: (v[:, :length] if k in TOKEN_COLUMNS else v) for k, v in batch.items()
  }
  if 'target_mask' in batch:
    length = _bucket_length(batch['target_mask'], buckets)
    for k in TARGET_COLUMNS:
      out[k] = batch[k][:, :length]
  return out


class TrainStream:
  """An endless, deterministic stream of global training batches.

  Each process yields only its own share of every global batch (the rows
  `process_index::` of a contiguous split), for multi-host training.
  """

  def __init__(
      self,
      table,
      batch_size: int,
      seed: int,
      buckets=(),
      process_index: int = 0,
      process_count: int = 1,
      read_threads: int | None = None,
      group_by_length: int = 0,
      augment=None,
  ):
    """`table`: a Table, or anything with __len__ and take(indices).

    `read_threads` build batches ahead in parallel (default: the table's
    `read_threads`, else 1); the batches do not depend on it.
    `group_by_length` = k > 0 (a table in memory with an attention mask):
    each epoch's shuffled examples are cut into chunks of k batches, each
    chunk sorted by length (source, then target) and cut into batches, and
    the epoch's batches shuffled: batches of similar lengths, less padding.
    `augment(batch, indices, rng)` (tuning/data/augmentation.py) changes
    each global batch, with random numbers from the seed and the batch's
    number alone.
    """
    read_threads = read_threads or getattr(table, 'read_threads', 1)
    n = num_rows(table) if isinstance(table, dict) else len(table)
    if batch_size > n:
      raise DataError(
          f'config.training.batch_size={batch_size} is larger '
          f'than the training set ({n} examples)'
      )
    if batch_size % process_count:
      raise DataError(
          f'batch size {batch_size} does not split over '
          f'{process_count} processes'
      )
    self.table = table
    self.batch_size = batch_size
    self.steps_per_epoch = n / batch_size
    per_process = batch_size // process_count
    lo = process_index * per_process
    self._rows = slice(lo, lo + per_process)
    self._buckets = buckets
    self._seed = seed
    self._augment = augment
    if group_by_length:
      self._grouped = _LengthGroups(
          table, batch_size, seed, int(group_by_length)
      )
      # One element a batch; the global batch number k gives its epoch and
      # place, so the iterator state (a position) resumes exactly.
      dataset = grain.MapDataset.range(2**62).map(self._grouped_batch)
    else:
      # range(n) is lazy: no index array as large as the data set.
      dataset = (
          grain.MapDataset.range(n)
          .shuffle(seed=seed)
          .repeat(None)
          .batch(batch_size, drop_remainder=True)
          .map_with_index(self._numbered_batch)
      )
    self._dataset = dataset.to_iter_dataset(
        grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=2 * read_threads
        )
    )
    self._iterator = iter(self._dataset)

  def _gather(self, indices: np.ndarray, number: int) -> Table:
    """Global batch `number`: the rows `indices`, augmented where
    set, cut to their bucket, this process's share."""
    if isinstance(self.table, dict):
      batch = {k: v[indices] for k, v in self.table.items()}
    else:
      batch = self.table.take(indices)
    if self._augment is not None:
      rng = augmentation.batch_rng(self._seed, number)
      batch = self._augment(batch, indices, rng)
    batch['index'] = np.arange(len(indices), dtype=np.int32)
    # Bucket on the global batch, so that every process cuts alike.
    batch = trim_to_bucket(batch, self._buckets)
    return {k: v[self._rows] for k, v in batch.items()}

  def _numbered_batch(self, k, indices) -> Table:
    return self._gather(indices, int(k))

  def _grouped_batch(self, k) -> Table:
    return self._gather(self._grouped.batch(int(k)), int(k))

  def __iter__(self) -> Iterator[Table]:
    return self

  def __next__(self) -> Table:
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict):
    self._iterator.set_state(state)


class _LengthGroups:
  """Batches of similar lengths, per epoch, from the seed (see
  TrainStream's `group_by_length`)."""

  def __init__(self, table, batch_size: int, seed: int, chunk_batches: int):
    if not isinstance(table, dict) or 'attention_mask' not in table:
      raise DataError(
          'grouping batches by length needs tokenized text in memory'
      )
    n = num_rows(table)
    lengths = table['attention_mask'].sum(axis=1).astype(np.int64)
    if 'target_mask' in table:
      lengths = lengths * 4096 + table['target_mask'].sum(axis=1)
    self._lengths = lengths
    self._n = n
    self._batch_size = batch_size
    self._seed = seed
    self._chunk = chunk_batches * batch_size
    self.per_epoch = n // batch_size
    self._cached = (-1, None)  # (epoch, its batches): one read, thread-safe

  def _epoch_batches(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    order = rng.permutation(self._n)[: self.per_epoch * self._batch_size]
    parts = []
    for lo in range(0, len(order), self._chunk):
      chunk = order[lo : lo + self._chunk]
      parts.append(chunk[np.argsort(self._lengths[chunk], kind='stable')])
    batches = np.concatenate(parts).reshape(self.per_epoch, self._batch_size)
    return batches[rng.permutation(self.per_epoch)]

  def batch(self, k: int) -> np.ndarray:
    epoch, place = divmod(k, self.per_epoch)
    cached_epoch, batches = self._cached
    if cached_epoch != epoch:
      batches = self._epoch_batches(epoch)
      self._cached = (epoch, batches)
    return batches[place]


def eval_batches(
    table: Table,
    batch_size: int,
    multiple_of: int = 1,
    buckets=(),
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Table]:
  """One ordered pass; the last batch is padded with weight-0 rows.

  Batch sizes are rounded up to a multiple of `multiple_of` (devices) so
  every batch splits evenly; no example is dropped.
  """
  n = num_rows(table)
  batch_size = int(math.ceil(batch_size / multiple_of) * multiple_of)
  per_process = (
      batch_size // process_count if batch_size % process_count == 0 else None
  )
  if per_process is None:
    raise DataError(
        f'eval batch size {batch_size} does not split over '
        f'{process_count} processes'
    )
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    weight = (index < n).astype(np.float32)
    index = np.minimum(index, n - 1)
    batch = {k: v[index] for k, v in table.items()}
    batch['weight'] = weight
    batch['index'] = np.arange(batch_size, dtype=np.int32)
    batch = trim_to_bucket(batch, buckets)
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    yield {k: v[rows] for k, v in batch.items()}
