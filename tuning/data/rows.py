"""One parser for the rows of CSV, TSV, JSON Lines and plain-text files.

Both ways of reading such files use it: `sources` (tables in memory) and
`records` (conversion to ArrayRecord shards), so a file gives the same
examples, and a bad row the same file:line error, either way.

A file is read one line at a time (never whole) and decoded with
`encoding`; a line that does not decode is an error naming file:line. CSV
and TSV take their column names from the header row, or from
`column_names` for headerless files (the first line is then data). Each row
becomes an *example*: 'label' (as read; a float for regression values; no
label for text-only data), 'x' (floats, NaN where missing), 'text' and
'text_pair' (strings), or instruction data (`tuning.data.instructions`):
'prompt' and 'response' (strings) or 'messages' (a list of {role,
content}), with 'where' (the row's file:line, for later errors).

A malformed row (wrong number of fields, not JSON, an absent column, a
feature or value that is not a number) is an error naming file:line, or,
with on_bad_rows='drop', dropped and counted. An *incomplete* row (missing
label, feature or text) is the caller's to handle: training drops it while
cleaning; a validation or test row that cannot be used at all (`unusable`)
is an error like a malformed one, since those splits are never cleaned.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import gzip
import json
import math
import os
from typing import Any, Callable, Iterator

import numpy as np

from tuning.data import instructions
from tuning.data.tables import DataError, SourceReport, Table, is_missing

FORMATS = ('csv', 'tsv', 'jsonl', 'text')
# What a data set's label column holds: class names or numbers ('classes'),
# regression targets ('values'), or nothing (None: text-only data).
LABEL_KINDS = ('classes', 'values', None)


@dataclasses.dataclass
class Columns:
  """Which input columns make an example (names as in the input files)."""

  label: str | None = 'label'  # None: no label column
  text: str | None = None
  text_pair: str | None = None
  features: tuple[str, ...] | None = None  # None: every other column
  # Instruction data: prompt and response, or a conversation.
  prompt: str | None = None
  response: str | None = None
  messages: str | None = None

  @property
  def instructions(self) -> dict[str, str]:
    """{example key: column} of the instruction columns that are set."""
    named = {
        'prompt': self.prompt,
        'response': self.response,
        'messages': self.messages,
    }
    return {k: c for k, c in named.items() if c}

  def resolve_features(self, names) -> tuple[str, ...]:
    """The feature columns, given a file's column names in order."""
    if self.text or self.instructions:
      return ()
    if self.features:
      return tuple(self.features)
    return tuple(c for c in names if c != self.label)


@dataclasses.dataclass
class ReadOptions:
  """How files are read, and how their errors name the fix."""

  encoding: str = 'utf-8'
  column_names: tuple[str, ...] | None = None  # headerless CSV/TSV
  on_bad_rows: str = 'error'  # error | drop
  # Name settings as command-line flags (to_records), not config fields.
  flags: bool = False

  def __post_init__(self):
    try:
      codecs.lookup(self.encoding)
    except LookupError:
      raise DataError(
          f'unknown encoding {self.encoding!r} (set '
          f"{self.setting('encoding', 'latin-1')}, say)"
      ) from None
    if self.on_bad_rows not in ('error', 'drop'):
      raise DataError(
          f'{self.name("on_bad_rows")}={self.on_bad_rows!r}: '
          "use 'error' or 'drop'"
      )
    if self.column_names is not None:
      self.column_names = tuple(str(c).strip() for c in self.column_names)

  def name(self, field: str) -> str:
    return f'--{field}' if self.flags else f'config.data.{field}'

  def setting(self, field: str, value) -> str:
    if self.flags:
      if isinstance(value, (tuple, list)):
        value = ','.join(value)
      return f'--{field}={value}'
    return f'config.data.{field}={value!r}'

  @property
  def drop(self) -> bool:
    return self.on_bad_rows == 'drop'

  def or_drop(self) -> str:
    return f"set {self.setting('on_bad_rows', 'drop')}"


def _lines(
    path: str, options: ReadOptions, progress: Callable[[int], None] | None
) -> Iterator[str]:
  """The decoded lines of a file (gzip-compressed when its name ends in
  .gz); a line that does not decode is an error."""
  with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      if progress is not None:
        progress(len(raw))
      try:
        yield raw.decode(options.encoding)
      except UnicodeDecodeError as e:
        raise DataError(
            f'{path}:{number}: not valid {options.encoding} (byte '
            f'{raw[e.start:e.start + 1]!r} at column {e.start + 1}); set '
            f"{options.setting('encoding', 'latin-1')} or the file's own "
            'encoding, or convert the file to UTF-8'
        ) from None


class RowFile:
  """The rows of one file, (line, {column: value}), read lazily.

  `header`: the column names of a CSV/TSV file (None for JSON Lines and
  text, whose rows name their own columns).
  """

  def __init__(
      self,
      path: str,
      fmt: str,
      options: ReadOptions,
      report: SourceReport,
      progress: Callable[[int], None] | None = None,
  ):
    if fmt not in FORMATS:
      raise DataError(
          f'unsupported format {fmt!r}: use one of ' f'{", ".join(FORMATS)}'
      )
    if not os.path.exists(path):
      where = '--input' if options.flags else 'config.data.path and friends'
      raise DataError(f'data file not found: {path} (check {where})')
    if options.column_names and fmt not in ('csv', 'tsv'):
      raise DataError(
          f'{options.name("column_names")} names the columns of '
          f'headerless CSV/TSV files, not {fmt} ({path}); unset '
          'it'
      )
    self.path, self.fmt = path, fmt
    self._options, self._report = options, report
    self._lines = _lines(path, options, progress)
    self.header = None
    self._reader = None
    if fmt in ('csv', 'tsv'):
      # QUOTE_NONE for TSV: GLUE files contain bare quotes inside sentences.
      self._reader = csv.reader(
          self._lines,
          delimiter='\t' if fmt == 'tsv' else ',',
          quoting=csv.QUOTE_NONE if fmt == 'tsv' else csv.QUOTE_MINIMAL,
      )
      if options.column_names:
        self.header = list(options.column_names)
      else:
        try:
          self.header = [h.strip() for h in next(self._reader)]
        except StopIteration:
          names = options.setting('column_names', ('text', 'label'))
          raise DataError(
              f'{path}: the file is empty (a header row is '
              f'required, or name the columns with {names})'
          ) from None

  def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
    if self._reader is not None:
      return self._delimited()
    if self.fmt == 'jsonl':
      return self._jsonl()
    return self._text()

  def _delimited(self):
    header, options = self.header, self._options
    first = True
    for fields in self._reader:
      line = self._reader.line_num
      if not fields or (len(fields) == 1 and not fields[0].strip()):
        continue  # blank line
      if (
          first
          and options.column_names
          and [f.strip() for f in fields] == header
      ):
        raise DataError(
            f'{self.path}:{line}: the first line repeats '
            f'{options.name("column_names")}: the file has a header row, so '
            'unset column_names'
        )
      first = False
      if len(fields) != len(header):
        if options.drop:
          self._report.drop('malformed row')
          continue
        raise DataError(
            f'{self.path}:{line}: expected {len(header)} fields '
            f'({", ".join(header)}), found {len(fields)} (fix '
            f'the row, or {options.or_drop()})'
        )
      yield line, dict(zip(header, fields))

  def _jsonl(self):
    for line, text in enumerate(self._lines, start=1):
      if not text.strip():
        continue
      try:
        row = json.loads(text)
        if not isinstance(row, dict):
          raise ValueError('not an object')
      except ValueError as e:
        if self._options.drop:
          self._report.drop('malformed row')
          continue
        raise DataError(
            f'{self.path}:{line}: not a JSON object ({e}); fix '
            f'the line, or {self._options.or_drop()}'
        ) from None
      yield line, row

  def _text(self):
    # One example a line; the label is the file's name, or a fastText-style
    # '__label__NAME ' prefix.
    stem = os.path.splitext(os.path.basename(self.path))[0]
    for line, text in enumerate(self._lines, start=1):
      text = text.rstrip('\r\n')
      if not text.strip():
        continue
      label = stem
      if text.startswith('__label__'):
        label, _, text = text[len('__label__') :].partition(' ')
      yield line, {'label': label, 'text': text}


def _number(value, path: str, line: int, what: str, fix: str) -> float:
  """A numeric cell as a float; '' and 'nan' are missing (NaN)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  text = str(value).strip()
  if text == '' or text.lower() in ('nan', 'na', 'null', 'none'):
    return math.nan
  try:
    return float(text)
  except ValueError:
    raise DataError(
        f'{path}:{line}: {what} is not a number: {text[:40]!r} '
        f'(fix the row, or {fix})'
    ) from None


class RowParser:
  """Turns rows into examples, checking each: one set of rules for all.

  The feature columns are fixed by the first file read (its header, or its
  first row), so every split has the same features.
  """

  def __init__(
      self, columns: Columns, labels: str | None, options: ReadOptions
  ):
    if labels not in LABEL_KINDS:
      raise DataError(f"labels={labels!r}: use 'classes', 'values' or None")
    self.columns, self.labels, self.options = columns, labels, options
    self.features: tuple[str, ...] | None = None
    self._texts = [c for c in (columns.text, columns.text_pair) if c]
    self._texts += list(columns.instructions.values())

  def _needed(self) -> list[str]:
    label = [self.columns.label] if self.labels is not None else []
    return label + self._texts + list(self.features or ())

  def _column_settings(self) -> str:
    name = self.options.name
    if self.columns.instructions:
      return '/'.join(name(f'{k}_column') for k in self.columns.instructions)
    return f'{name("label_column")}/{name("text_column")}'

  def check_header(self, path: str, names: list[str]):
    """A CSV/TSV header must hold every column the examples need."""
    if self.features is None:
      self.features = self.columns.resolve_features(names)
    o = self.options
    if self.labels is not None and self.columns.label not in names:
      raise DataError(
          f'{path}: no label column {self.columns.label!r} among '
          f'{names} (set {o.name("label_column")})'
      )
    for c in self._texts:
      if c not in names:
        settings = (
            self._column_settings()
            if self.columns.instructions
            else f'{o.name("text_column")} / {o.name("text_pair_column")}'
        )
        raise DataError(
            f'{path}: no text column {c!r} among {names} (set {settings})'
        )
    missing = [c for c in self.features if c not in names]
    if missing:
      raise DataError(
          f'{path}: feature columns {missing} not found among '
          f'{names} ({o.name("feature_columns")})'
      )

  def parse(self, path: str, line: int, row: dict[str, Any]) -> dict:
    """The example of one row; a malformed row raises DataError."""
    if self.features is None:
      self.features = self.columns.resolve_features(list(row))
    fix = self.options.or_drop()
    absent = [c for c in self._needed() if c not in row]
    if absent:
      raise DataError(
          f'{path}:{line}: row has no value for {absent} (fix '
          f'the row, check {self._column_settings()}, or {fix})'
      )
    example = {}
    if self.labels == 'values':
      example['label'] = _number(
          row[self.columns.label],
          path,
          line,
          f'label {self.columns.label!r}',
          fix,
      )
    elif self.labels == 'classes':
      example['label'] = row[self.columns.label]
    if self.features:
      example['x'] = [
          _number(row[c], path, line, f'column {c!r}', fix)
          for c in self.features
      ]
    for key, c in (
        ('text', self.columns.text),
        ('text_pair', self.columns.text_pair),
    ):
      if c:
        example[key] = None if row[c] is None else str(row[c])
    if self.columns.instructions:
      where = f'{path}:{line}'
      for key, c in self.columns.instructions.items():
        check = (
            instructions.check_messages
            if key == 'messages'
            else instructions.check_text
        )
        example[key] = check(row[c], c, where, fix)
      example['where'] = where
    return example

  @staticmethod
  def incomplete(example: dict) -> str | None:
    """Why training cannot use an example (None: it can), as cleaning says."""
    return _lacks(example, is_missing)

  @staticmethod
  def unusable(example: dict) -> str | None:
    """Why a validation/test example cannot be used at all (None: it can).

    Looser than cleaning: an empty or 'NA' text is still an example to
    predict; a missing label or feature is not.
    """
    return _lacks(example, lambda text: text is None)

  def to_table(self, examples: list[dict]) -> Table:
    """Examples as columns (labels as read, or float64 values)."""
    table = {}
    if self.labels == 'values':
      table['label'] = np.array([e['label'] for e in examples], np.float64)
    elif self.labels == 'classes':
      table['label'] = np.array([e['label'] for e in examples], dtype=object)
    if self.features:
      table['x'] = np.array([e['x'] for e in examples], np.float64).reshape(
          len(examples), len(self.features)
      )
    for key, c in (
        ('text', self.columns.text),
        ('text_pair', self.columns.text_pair),
    ):
      if c:
        table[key] = np.array([e[key] for e in examples], dtype=object)
    for key in (*self.columns.instructions, 'where'):
      if examples and key in examples[0]:
        column = np.empty(len(examples), dtype=object)  # lists stay whole
        for i, e in enumerate(examples):
          column[i] = e[key]
        table[key] = column
    return table


def _lacks(example: dict, missing_text) -> str | None:
  """The first missing part of an example: label, a feature, or a text."""
  if 'label' in example and is_missing(example['label']):
    return 'missing label'
  if 'x' in example and not all(math.isfinite(v) for v in example['x']):
    return 'missing/NaN feature'
  for key in ('text', 'text_pair'):
    if key in example and missing_text(example[key]):
      return f'missing {key}'
  return None


def read_examples(
    path: str,
    fmt: str,
    parser: RowParser,
    report: SourceReport,
    split: str = 'train',
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, dict]]:
  """(line, example) for each usable row of a file, read lazily.

  Malformed rows raise DataError naming file:line, or are dropped and
  counted in `report` (on_bad_rows='drop'). Validation and test rows are
  kept as given: one that cannot be used at all is an error too (or
  dropped and counted); training rows come back even when incomplete.
  """
  options = parser.options
  rows = RowFile(path, fmt, options, report, progress)
  if rows.header is not None:
    parser.check_header(path, rows.header)
  for line, row in rows:
    try:
      example = parser.parse(path, line, row)
    except DataError:
      if not options.drop:
        raise
      report.drop('malformed row')
      continue
    if split != 'train':
      reason = parser.unusable(example)
      if reason:
        if options.drop:
          report.drop(reason)
          continue
        raise DataError(
            f'{path}:{line}: {reason} in a {split} row ({split} '
            'rows are used as given, never cleaned: fix the row, '
            f'or {options.or_drop()} to drop and count it)'
        )
    yield line, example
