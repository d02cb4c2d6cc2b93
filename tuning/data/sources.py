"""Reading raw examples from a source into column tables.

A *table* is a dict of equally long numpy columns. Numeric feature columns
are float64 (NaN marks a missing value, which cleaning later drops and
counts); labels and text stay as they were read (strings or numbers), and
`preprocessing` turns them into model inputs.

Every malformed row is either an error naming the file and line, or, with
`on_bad_rows='drop'`, dropped and counted in the returned report.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any

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


def read_split_files(data_config) -> tuple[dict[str, Table], SourceReport]:
  """Reads the splits a config names; returns {split: table} and a report.

  Splits that the source lacks are absent from the result (they are carved
  from train later).
  """
  source = data_config.source
  report = SourceReport()
  if source == 'digits':
    return {'train': _read_digits()}, report
  if source == 'tfds':
    return _read_tfds(data_config), report
  readers = {'csv': _read_delimited, 'tsv': _read_delimited,
             'jsonl': _read_jsonl, 'npz': _read_npz}
  if source not in readers:
    raise DataError(f'unknown data source {source!r}: use one of digits, '
                    'csv, tsv, jsonl, npz, tfds (config.data.source)')
  if not data_config.path:
    raise DataError(f'config.data.path is required for source {source!r}')
  tables = {}
  for split, path in (('train', data_config.path),
                      ('validation', data_config.validation_path),
                      ('test', data_config.test_path)):
    if path:
      tables[split] = readers[source](path, data_config, report)
  return tables, report


def _read_digits() -> Table:
  """scikit-learn's 1,797 real 8x8 handwritten digits (ships offline)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  return {'x': digits.data.astype(np.float64), 'label': digits.target}


def _check_exists(path: str):
  if not os.path.exists(path):
    raise DataError(f'data file not found: {path} (check config.data.path '
                    'and friends)')


def _feature_value(text: str, path: str, line: int, column: str):
  """Parses one numeric cell; '' and 'nan' are missing (NaN)."""
  text = text.strip()
  if text == '' or text.lower() in ('nan', 'na', 'null', 'none'):
    return math.nan
  try:
    return float(text)
  except ValueError:
    raise DataError(f'{path}:{line}: column {column!r} is not a number: '
                    f'{text[:40]!r} (fix the row, or set '
                    "config.data.on_bad_rows='drop' to skip such rows)"
                    ) from None


def _rows_to_table(rows: list[dict[str, Any]], line_numbers: list[int],
                   columns: list[str], path: str, data_config,
                   report: SourceReport) -> Table:
  """Turns parsed rows into columns, checking each row."""
  label = data_config.label_column
  text_columns = [c for c in (data_config.text_column,
                              data_config.text_pair_column) if c]
  if label not in columns:
    raise DataError(f'{path}: no label column {label!r} among {columns} '
                    '(set config.data.label_column)')
  for c in text_columns:
    if c not in columns:
      raise DataError(f'{path}: no text column {c!r} among {columns} '
                      '(set config.data.text_column / text_pair_column)')
  if text_columns:
    features = []
  elif data_config.feature_columns:
    features = list(data_config.feature_columns)
    missing = [c for c in features if c not in columns]
    if missing:
      raise DataError(f'{path}: feature columns {missing} not found among '
                      f'{columns} (config.data.feature_columns)')
  else:
    features = [c for c in columns if c != label]
  drop = data_config.on_bad_rows == 'drop'
  out = {'label': [], 'x': []}
  for c in text_columns:
    out[c] = []
  for row, line in zip(rows, line_numbers):
    try:
      absent = [c for c in [label, *text_columns, *features] if c not in row]
      if absent:
        raise DataError(f'{path}:{line}: row has no value for {absent} '
                        "(fix the row, or set config.data.on_bad_rows='drop')")
      x = [_feature_value(str(row[c]), path, line, c) for c in features]
    except DataError:
      if not drop:
        raise
      report.drop('malformed row')
      continue
    out['label'].append(row[label])
    out['x'].append(x)
    for c in text_columns:
      out[c].append(row[c])
  table = {'label': np.array(out['label'], dtype=object)}
  if features:
    table['x'] = np.array(out['x'], dtype=np.float64).reshape(
        len(out['x']), len(features))
  if data_config.text_column:
    table['text'] = np.array(out[data_config.text_column], dtype=object)
  if data_config.text_pair_column:
    table['text_pair'] = np.array(out[data_config.text_pair_column],
                                  dtype=object)
  return table


def _read_delimited(path: str, data_config, report: SourceReport) -> Table:
  """CSV or TSV with a header row; the delimiter follows the extension."""
  _check_exists(path)
  delimiter = '\t' if (path.endswith('.tsv') or data_config.source == 'tsv'
                       and not path.endswith('.csv')) else ','
  rows, lines = [], []
  with open(path, newline='', encoding='utf-8') as f:
    # QUOTE_NONE for TSV: GLUE files contain bare quotes inside sentences.
    quoting = csv.QUOTE_NONE if delimiter == '\t' else csv.QUOTE_MINIMAL
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    try:
      header = next(reader)
    except StopIteration:
      raise DataError(f'{path}: the file is empty (a header row is '
                      'required)') from None
    header = [h.strip() for h in header]
    for fields in reader:
      line = reader.line_num
      if not fields or (len(fields) == 1 and not fields[0].strip()):
        continue  # blank line
      if len(fields) != len(header):
        if data_config.on_bad_rows == 'drop':
          report.drop('malformed row')
          continue
        raise DataError(f'{path}:{line}: expected {len(header)} fields '
                        f'({", ".join(header)}), found {len(fields)} (fix '
                        "the row, or set config.data.on_bad_rows='drop')")
      rows.append(dict(zip(header, fields)))
      lines.append(line)
  if not rows:
    raise DataError(f'{path}: no rows after the header (add examples, or '
                    'fix the rows that were dropped as malformed)')
  return _rows_to_table(rows, lines, header, path, data_config, report)


def _read_jsonl(path: str, data_config, report: SourceReport) -> Table:
  """JSON Lines: one JSON object a line."""
  _check_exists(path)
  rows, lines, columns = [], [], []
  with open(path, encoding='utf-8') as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        row = json.loads(text)
        if not isinstance(row, dict):
          raise ValueError('not an object')
      except ValueError as e:
        if data_config.on_bad_rows == 'drop':
          report.drop('malformed row')
          continue
        raise DataError(f'{path}:{line}: not a JSON object ({e}); fix the '
                        "line, or set config.data.on_bad_rows='drop'"
                        ) from None
      for k in row:
        if k not in columns:
          columns.append(k)
      rows.append(row)
      lines.append(line)
  if not rows:
    raise DataError(f'{path}: no rows')
  return _rows_to_table(rows, lines, columns, path, data_config, report)


def _read_npz(path: str, data_config, report: SourceReport) -> Table:
  """NPZ with a label array and a feature array (x/features/inputs)."""
  del report
  _check_exists(path)
  try:
    arrays = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise DataError(f'{path}: not a readable .npz file ({e})') from None
  label = data_config.label_column
  names = list(arrays.keys())
  if label not in arrays:
    raise DataError(f'{path}: no array {label!r} among {names} '
                    '(set config.data.label_column)')
  feature_names = list(data_config.feature_columns or ())
  if not feature_names:
    feature_names = [n for n in ('x', 'features', 'inputs', 'image')
                     if n in arrays][:1]
  if not feature_names:
    raise DataError(f'{path}: no feature array among {names}; name it x, or '
                    'set config.data.feature_columns')
  y = arrays[label]
  x = [arrays[n].reshape(len(arrays[n]), -1) for n in feature_names]
  for n, v in zip(feature_names, x):
    if len(v) != len(y):
      raise DataError(f'{path}: array {n!r} has {len(v)} rows but {label!r} '
                      f'has {len(y)}')
  return {'x': np.concatenate(x, axis=1).astype(np.float64),
          'label': y.astype(object) if y.dtype.kind in 'OUS' else y}


def _read_tfds(data_config) -> dict[str, Table]:
  """A prepared TFDS dataset by name, read with tfds.data_source (no TF)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = data_config.tfds_name
  if not name:
    raise DataError("config.data.tfds_name is required for source 'tfds' "
                    "(e.g. 'mnist' or 'glue/sst2')")
  splits = {'train': data_config.train_split}
  if data_config.validation_split:
    splits['validation'] = data_config.validation_split
  if data_config.test_split:
    splits['test'] = data_config.test_split
  tables = {}
  for split, tfds_split in splits.items():
    try:
      source = tfds.data_source(name, split=tfds_split,
                                data_dir=data_config.tfds_data_dir,
                                download=False)
    except Exception as e:  # TFDS raises many types; all mean "not here".
      raise DataError(f'TFDS dataset {name!r} split {tfds_split!r} is not '
                      f'prepared in {data_config.tfds_data_dir or "~/tensorflow_datasets"} '
                      f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
                      'prepare it with `tfds build` where internet exists, '
                      'or point config.data.tfds_data_dir at it') from None
    records = [source[i] for i in range(len(source))]
    tables[split] = _records_to_table(records, data_config)
  return tables


def _records_to_table(records: list[dict[str, Any]], data_config) -> Table:
  label = data_config.label_column
  table = {'label': np.array([r[label] for r in records])}
  if data_config.text_column:
    table['text'] = np.array(
        [_as_text(r[data_config.text_column]) for r in records], dtype=object)
    if data_config.text_pair_column:
      table['text_pair'] = np.array(
          [_as_text(r[data_config.text_pair_column]) for r in records],
          dtype=object)
    return table
  names = list(data_config.feature_columns or ()) or [
      k for k in records[0] if k != label and
      np.asarray(records[0][k]).dtype.kind in 'iuf']
  table['x'] = np.stack([
      np.concatenate([np.asarray(r[n], np.float64).reshape(-1)
                      for n in names]) for r in records])
  return table


def _as_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
