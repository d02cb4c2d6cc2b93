"""Tables, the rows they come from, and the one error type for bad data.

A *table* is a dict of equally long numpy columns: 'label' (raw labels as
read, class indices, or float values; absent for text-only data), 'x'
(float64 features, NaN where missing), 'text'/'text_pair' (strings), or
token columns. `Rows` is what the data pipeline asks of a training split,
whether it is a table in memory (`sources.MemoryRows`) or an ArrayRecord
directory read by index (`records.RecordSplit`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Protocol

import numpy as np

Table = dict[str, np.ndarray]


class DataError(ValueError):
  """A problem with the input data, worded for the user."""


@dataclasses.dataclass
class SourceReport:
  """What reading a source dropped, by reason (for the run's log)."""

  dropped: dict[str, int] = dataclasses.field(default_factory=dict)

  def drop(self, reason: str):
    self.dropped[reason] = self.dropped.get(reason, 0) + 1


class Rows(Protocol):
  """A training split as the pipeline reads it (raw rows, by position)."""

  def __len__(self) -> int:
    ...

  def select(self, index: np.ndarray) -> Rows:
    """The rows at `index` (sorted positions in this split)."""

  def raw_table(self, index: np.ndarray | None = None) -> Table:
    """Raw columns of the rows at `index` (all rows: None)."""

  def raw_labels(self) -> np.ndarray:
    """The raw label of every row, in order."""

  def raw_chunks(self) -> Iterator[Table]:
    """Every row's raw columns, a chunk at a time, in order."""

  def label_counts(self) -> dict[str, int]:
    """Rows per raw label (as `preprocessing.label_key` writes it)."""


def num_rows(table: Table) -> int:
  """The number of rows of a table (0 for a table without columns)."""
  return len(next(iter(table.values()))) if table else 0


def take(table: Table, index) -> Table:
  return {k: v[index] for k, v in table.items()}


def is_missing(value) -> bool:
  """A missing cell: None, NaN, or '', 'nan', 'na', 'null', 'none'."""
  if value is None:
    return True
  if isinstance(value, float) and math.isnan(value):
    return True
  return isinstance(value, str) and value.strip().lower() in (
      '',
      'nan',
      'na',
      'null',
      'none',
  )
