"""Reading a source's splits into tables in memory, and those tables' rows.

A *table* (`tables.Table`) is a dict of equally long numpy columns.
Numeric feature columns are float64 (NaN marks a missing value, which
cleaning drops from the training split and counts); labels and text stay as
they were read (strings or numbers; float64 for regression values), and
`preprocessing` turns them into model inputs.

CSV, TSV and JSON Lines files are parsed by `rows`, as conversion to
ArrayRecord parses them: every malformed row is either an error naming the
file and line, or, with `on_bad_rows='drop'`, dropped and counted in the
split's report. Validation and test rows are never cleaned, so one that
cannot be used at all (no label, a missing feature) is an error there too.
"""

from __future__ import annotations

import collections
import gzip
import importlib.util
import os
from typing import Any, Iterator

import numpy as np

from tuning.data import preprocessing
from tuning.data import rows
from tuning.data.tables import (
    DataError,
    SourceReport,
    Table,
    is_missing,
    num_rows,
    take,
)

__all__ = [
    'DataError',
    'MemoryRows',
    'SourceReport',
    'Table',
    'read_options',
    'read_split_files',
]

SPLITS = ('train', 'validation', 'test')


class MemoryRows:
  """The rows of a table in memory (a `tables.Rows` for the pipeline)."""

  def __init__(self, table: Table):
    self.table = table

  def __len__(self) -> int:
    return num_rows(self.table)

  def select(self, index: np.ndarray) -> MemoryRows:
    return MemoryRows(take(self.table, index))

  def raw_table(self, index: np.ndarray | None = None) -> Table:
    return self.table if index is None else take(self.table, index)

  def raw_labels(self) -> np.ndarray:
    return self.table['label']

  def raw_chunks(self) -> Iterator[Table]:
    yield self.table

  def label_counts(self) -> dict[str, int]:
    return dict(
        collections.Counter(
            preprocessing.label_key(v) for v in self.table['label']
        )
    )


def read_options(data_config, flags: bool = False) -> rows.ReadOptions:
  """How `config.data` says files are read (encoding, header, bad rows)."""
  names = data_config.get('column_names')
  return rows.ReadOptions(
      encoding=data_config.encoding,
      column_names=tuple(names) if names else None,
      on_bad_rows=data_config.on_bad_rows,
      flags=flags,
  )


def read_split_files(
    data_config, labels: str | None = 'classes'
) -> tuple[dict[str, Table], dict[str, SourceReport]]:
  """Reads the splits a config names: {split: table}, {split: report}.

  Splits that the source lacks are absent from the result (they are carved
  from train later). `labels`: 'classes' (labels as read), 'values'
  (float64 regression targets) or None (no label column is read).
  """
  source = data_config.source
  reports = {name: SourceReport() for name in SPLITS}
  if source not in ('digits', 'tfds', 'csv', 'tsv', 'jsonl', 'npz'):
    raise DataError(
        f'unknown data source {source!r}: use one of digits, '
        'csv, tsv, jsonl, npz, tfds, array_record, triples '
        '(config.data.source)'
    )
  if data_config.get('column_names') and source not in ('csv', 'tsv'):
    raise DataError(
        'config.data.column_names names the columns of headerless'
        f' CSV/TSV files, not source {source!r}; unset it'
    )
  if source == 'digits':
    return {'train': _with_labels(_read_digits(), labels, 'digits')}, reports
  if source == 'tfds':
    return {
        name: _with_labels(table, labels, f'TFDS {name} split')
        for name, table in _read_tfds(data_config, labels).items()
    }, reports
  if not data_config.path:
    raise DataError(f'config.data.path is required for source {source!r}')
  parser = None
  if source != 'npz':
    parser = rows.RowParser(
        rows.Columns(
            data_config.label_column,
            data_config.text_column,
            data_config.text_pair_column,
            tuple(data_config.feature_columns or ()) or None,
            prompt=data_config.get('prompt_column'),
            response=data_config.get('response_column'),
            messages=data_config.get('messages_column'),
        ),
        labels,
        read_options(data_config),
    )
  tables = {}
  for split, path in (
      ('train', data_config.path),
      ('validation', data_config.validation_path),
      ('test', data_config.test_path),
  ):
    if not path:
      continue
    _check_exists(path)
    if source == 'npz':
      tables[split] = _with_labels(
          _read_npz(path, data_config, labels), labels, path
      )
    else:
      tables[split] = _read_file(
          path, split, _format(path, source), parser, reports[split]
      )
  return tables, reports


def _format(path: str, source: str) -> str:
  """csv, tsv or jsonl: TSV by the extension, else as the source says."""
  if source == 'jsonl':
    return 'jsonl'
  if path.endswith('.tsv') or (source == 'tsv' and not path.endswith('.csv')):
    return 'tsv'
  return 'csv'


def _read_file(
    path: str,
    split: str,
    fmt: str,
    parser: rows.RowParser,
    report: SourceReport,
) -> Table:
  examples = [
      e for _, e in rows.read_examples(path, fmt, parser, report, split)
  ]
  if not examples:
    dropped = f' (dropped: {report.dropped})' if report.dropped else ''
    raise DataError(f'{path}: no rows{dropped}')
  return parser.to_table(examples)


def _with_labels(table: Table, labels: str | None, where: str) -> Table:
  """A table read with labels as read, as float values, or without."""
  if labels is None:
    table.pop('label', None)
  elif labels == 'values':
    values = np.empty(len(table['label']), np.float64)
    for i, v in enumerate(table['label']):
      try:
        values[i] = np.nan if is_missing(v) else float(v)
      except (TypeError, ValueError):
        raise DataError(
            f'{where}: label {v!r} of row {i} is not a number '
            "(labels='values' reads regression targets)"
        ) from None
    table['label'] = values
  return table


def digits_file() -> str:
  """scikit-learn's digits.csv.gz, found without importing scikit-learn
  (`sklearn.datasets` takes about two seconds to import: every digits run
  and test process would pay it)."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.origin:
    raise DataError(
        "data.source='digits' needs scikit-learn (pip install -r "
        'requirements.txt)'
    )
  return os.path.join(
      os.path.dirname(spec.origin), 'datasets', 'data', 'digits.csv.gz'
  )


def _read_digits() -> Table:
  """scikit-learn's 1,797 real 8x8 handwritten digits (ships offline), read
  as `sklearn.datasets.load_digits` reads them: 64 pixel columns and the
  label, comma-separated."""
  with gzip.open(digits_file(), 'rt') as f:
    data = np.loadtxt(f, delimiter=',')
  return {'x': data[:, :-1], 'label': data[:, -1].astype(int)}


def _check_exists(path: str):
  if not os.path.exists(path):
    raise DataError(
        f'data file not found: {path} (check config.data.path ' 'and friends)'
    )


def _read_npz(path: str, data_config, labels: str | None) -> Table:
  """NPZ with a label array and a feature array (x/features/inputs)."""
  try:
    arrays = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise DataError(f'{path}: not a readable .npz file ({e})') from None
  label = data_config.label_column
  names = list(arrays.keys())
  if labels is not None and label not in arrays:
    raise DataError(
        f'{path}: no array {label!r} among {names} '
        '(set config.data.label_column)'
    )
  feature_names = list(data_config.feature_columns or ())
  if not feature_names:
    feature_names = [
        n for n in ('x', 'features', 'inputs', 'image') if n in arrays
    ][:1]
  if not feature_names:
    raise DataError(
        f'{path}: no feature array among {names}; name it x, or '
        'set config.data.feature_columns'
    )
  x = [arrays[n].reshape(len(arrays[n]), -1) for n in feature_names]
  table = {'x': np.concatenate(x, axis=1).astype(np.float64)}
  if labels is None:
    return table
  y = arrays[label]
  for n, v in zip(feature_names, x):
    if len(v) != len(y):
      raise DataError(
          f'{path}: array {n!r} has {len(v)} rows but {label!r} '
          f'has {len(y)}'
      )
  table['label'] = y.astype(object) if y.dtype.kind in 'OUS' else y
  return table


def _read_tfds(data_config, labels: str | None) -> dict[str, Table]:
  """A prepared TFDS dataset by name, read with tfds.data_source (no TF)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = data_config.tfds_name
  if not name:
    raise DataError(
        "config.data.tfds_name is required for source 'tfds' "
        "(e.g. 'mnist' or 'glue/sst2')"
    )
  splits = {'train': data_config.train_split}
  if data_config.validation_split:
    splits['validation'] = data_config.validation_split
  if data_config.test_split:
    splits['test'] = data_config.test_split
  tables = {}
  for split, tfds_split in splits.items():
    try:
      source = tfds.data_source(
          name,
          split=tfds_split,
          data_dir=data_config.tfds_data_dir,
          download=False,
      )
    except Exception as e:  # TFDS raises many types; all mean "not here".
      raise DataError(
          f'TFDS dataset {name!r} split {tfds_split!r} is not '
          f'prepared in {data_config.tfds_data_dir or "~/tensorflow_datasets"} '
          f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
          'prepare it with `tfds build` where internet exists, '
          'or point config.data.tfds_data_dir at it'
      ) from None
    records = [source[i] for i in range(len(source))]
    tables[split] = _records_to_table(records, data_config, labels)
  return tables


def _records_to_table(
    records: list[dict[str, Any]], data_config, labels: str | None
) -> Table:
  label = data_config.label_column
  table = {}
  if labels is not None:
    table['label'] = np.array([r[label] for r in records])
  if data_config.text_column:
    table['text'] = np.array(
        [_as_text(r[data_config.text_column]) for r in records], dtype=object
    )
    if data_config.text_pair_column:
      table['text_pair'] = np.array(
          [_as_text(r[data_config.text_pair_column]) for r in records],
          dtype=object,
      )
    return table
  names = list(data_config.feature_columns or ()) or [
      k
      for k in records[0]
      if k != label and np.asarray(records[0][k]).dtype.kind in 'iuf'
  ]
  table['x'] = np.stack(
      [
          np.concatenate(
              [np.asarray(r[n], np.float64).reshape(-1) for n in names]
          )
          for r in records
      ]
  )
  return table


def _as_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
