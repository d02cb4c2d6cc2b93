"""Data sets larger than memory: a sharded ArrayRecord copy, read by index.

Conversion (once, `python -m tuning.data.to_records`) streams local files
(CSV, TSV, JSON Lines, plain text) row by row into

    DIR/<split>-00000-of-00004.array_record   (one msgpack map per example)
    DIR/metadata.json                          (columns, counts, labels, tokenizer)

parsing and checking every row with `rows`, as `sources` does: a malformed
row is an error naming file:line, or with on_bad_rows='drop' dropped and
counted. Training rows with a missing label, text or feature value are
dropped and counted, like `preprocessing.clean`; validation and test rows
are kept as given (one that cannot be used at all is an error, or dropped
and counted). Text is kept raw (tokenized on the fly while training) or
tokenized at conversion with a pretrained tokenizer (`--tokenizer`), stored
unpadded.

Reading (`RecordSplit`) is random access through grain's
`ArrayRecordDataSource`: a batch of indices reads just those records, so
memory does not grow with the data set. The labels' vocabulary comes from
the metadata, not from a pass over the data; the pipeline's report of how
many validation/test rows also occur in train reads the training records
once (about 150,000 short examples a second on one core), holding only the
dev rows' keys.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import threading
from typing import Any, Iterator, Sequence

import msgpack
import numpy as np

from tuning.data import preprocessing
from tuning.data import rows
from tuning.data.rows import Columns
from tuning.data.tables import DataError, SourceReport, Table

FORMATS = ('csv', 'tsv', 'jsonl', 'text')
METADATA = 'metadata.json'
VERSION = 1
# Records per compressed chunk. A random read decodes its record's whole
# chunk, so the ArrayRecord default (65,536) is far too large; grain asks
# for 1, but the reader then keeps ~50 bytes of index per record in memory
# (27 MiB more for 10x SST-2, measured) and the files are 2.5x larger, while
# groups of 8 short examples read as fast (benchmarks/input_pipeline.py).
DEFAULT_GROUP_SIZE = 8
_SHARD = re.compile(
    r'^(?P<split>[A-Za-z0-9_]+)-(?P<i>\d{5})-of-(?P<n>\d{5})' r'\.array_record$'
)


def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}.array_record'


# ----------------------------------------------------------------- tokenizer


def tokenizer_file(path: str) -> str:
  """The tokenizer.json / vocab.txt a tokenizer path stands for."""
  if os.path.isfile(path):
    return path
  for name in ('tokenizer.json', 'vocab.txt'):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise DataError(
      f'no tokenizer at {path!r}: expected tokenizer.json or '
      'vocab.txt (or the folder holding them)'
  )


def tokenizer_fingerprint(path: str) -> str:
  """A hash of the tokenizer's files: equal hashes give equal token ids."""
  main = tokenizer_file(path)
  digest = hashlib.sha256()
  folder = os.path.dirname(main)
  for name in (
      os.path.basename(main),
      'tokenizer_config.json',
      'special_tokens_map.json',
  ):
    file = os.path.join(folder, name)
    if os.path.isfile(file):
      with open(file, 'rb') as f:
        digest.update(name.encode() + b'\0' + f.read())
  return digest.hexdigest()[:16]


# ----------------------------------------------------------------- writing


class _Progress:
  """A byte-counting progress bar over the input files (tqdm)."""

  def __init__(self, paths: Sequence[str], enabled: bool):
    self._bar = None
    if enabled:
      import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm.tqdm(
          total=sum(os.path.getsize(p) for p in paths),
          unit='B',
          unit_scale=True,
          unit_divisor=1024,
          desc='converting',
          dynamic_ncols=True,
      )

  def update(self, nbytes: int):
    if self._bar is not None:
      self._bar.update(nbytes)

  def set_postfix(self, **kwargs):
    if self._bar is not None:
      self._bar.set_postfix(**kwargs, refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()


class _ShardWriter:
  """Writes records into numbered shards of at most `shard_size` records."""

  def __init__(
      self, out_dir: str, split: str, shard_size: int, group_size: int
  ):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    self._module = array_record_module
    self._dir, self._split, self._size = out_dir, split, shard_size
    self._options = f'group_size:{group_size}'
    self._writer = None
    self.temporary: list[str] = []
    self.count = 0

  def write(self, record: bytes):
    if self._writer is None or self.count % self._size == 0:
      self._close_writer()
      path = os.path.join(
          self._dir, f'.{self._split}-{len(self.temporary):05d}.tmp'
      )
      self.temporary.append(path)
      self._writer = self._module.ArrayRecordWriter(path, self._options)
    self._writer.write(record)
    self.count += 1

  def _close_writer(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def finish(self) -> list[str]:
    """Closes the last shard; renames shards to their final names."""
    self._close_writer()
    for old in glob.glob(
        os.path.join(self._dir, f'{self._split}-*-of-*' '.array_record')
    ):
      os.remove(old)  # a previous conversion of this split
    names = []
    for i, path in enumerate(self.temporary):
      name = shard_name(self._split, i, len(self.temporary))
      os.replace(path, os.path.join(self._dir, name))
      names.append(name)
    return names

  def abort(self):
    self._close_writer()
    for path in self.temporary:
      with contextlib.suppress(OSError):
        os.remove(path)


def convert(
    inputs: Sequence[str],
    fmt: str,
    out_dir: str,
    split: str = 'train',
    columns: Columns | None = None,
    tokenizer: str | None = None,
    max_length: int = 128,
    shard_size: int = 100_000,
    on_bad_rows: str = 'error',
    drop_duplicates: bool = False,
    progress: bool = True,
    group_size: int = DEFAULT_GROUP_SIZE,
    labels: str | None = 'classes',
    encoding: str = 'utf-8',
    column_names: Sequence[str] | None = None,
) -> dict:
  """Converts input files into one split of a records directory.

  `labels`: 'classes' (labels as read), 'values' (float regression targets)
  or None (no label column). `encoding` decodes the files; `column_names`
  names the columns of headerless CSV/TSV files (the first line is data).
  Returns the split's metadata entry (also written to metadata.json).

  The steps: check the arguments, load the pretrained tokenizer (if any),
  check that the directory's other splits were converted alike, stream the
  rows into shards (`_write_examples`), then write metadata.json.
  """
  _check_arguments(fmt, split, labels, shard_size, group_size, drop_duplicates)
  options = rows.ReadOptions(  # checks the encoding and on_bad_rows
      encoding,
      tuple(column_names) if column_names else None,
      on_bad_rows,
      flags=True,
  )
  _check_inputs(inputs)
  columns = columns or Columns()
  if fmt == 'text':
    columns = Columns('label', 'text', None, None)
  pretrained = None
  if tokenizer:
    pretrained = _PretrainedTokenizer.load(tokenizer, max_length, columns)
  os.makedirs(out_dir, exist_ok=True)
  metadata = read_metadata(out_dir, must_exist=False)
  fields = _record_fields(labels, columns, pretrained)
  common = {
      'version': VERSION,
      'label_column': columns.label,
      'text_column': columns.text,
      'text_pair_column': columns.text_pair,
      'tokenizer': pretrained.info if pretrained else None,
      'labels': labels,
  }
  _check_converted_alike(out_dir, metadata, common)

  parser = rows.RowParser(columns, labels, options)
  if metadata.get('features') and not columns.features:
    parser.features = tuple(metadata['features'])  # as the other splits
  writer = _ShardWriter(out_dir, split, shard_size, group_size)
  bar = _Progress(inputs, progress)
  try:
    written = _write_examples(
        inputs,
        fmt,
        split,
        parser,
        pretrained,
        writer,
        bar,
        labels=labels,
        drop_duplicates=drop_duplicates,
    )
  except BaseException:
    writer.abort()
    bar.close()
    raise
  bar.close()
  if not writer.count:
    writer.abort()
    raise DataError(
        f'{", ".join(inputs)}: no usable rows (dropped: '
        f'{written.report.dropped or "none"})'
    )
  features = parser.features
  if features:
    fields['x'] = f'float64[{len(features)}]'
  shards = writer.finish()
  entry = {
      'num_examples': writer.count,
      'shards': shards,
      'inputs': [os.path.abspath(p) for p in inputs],
      'format': fmt,
      'dropped': written.report.dropped,
      'label_counts': dict(written.label_counts),
      'drop_duplicates': bool(drop_duplicates),
      'group_size': int(group_size),
  }
  if pretrained is not None:
    entry['max_input_id'] = written.max_input_id
  metadata = metadata or dict(common, splits={})
  metadata['labels'] = labels
  if features:
    metadata['features'] = list(features)
  metadata['fields'] = fields
  metadata['splits'][split] = entry
  _write_metadata(out_dir, metadata)
  return entry


def _check_arguments(
    fmt: str,
    split: str,
    labels: str | None,
    shard_size: int,
    group_size: int,
    drop_duplicates: bool,
):
  """Raises a one-line DataError naming the flag of a bad argument."""
  if fmt not in rows.FORMATS:
    raise DataError(
        f'unsupported format {fmt!r}: use one of '
        f'{", ".join(rows.FORMATS)} (--format)'
    )
  if not re.fullmatch(r'[A-Za-z0-9_]+', split):
    raise DataError(f'split name {split!r}: use letters, digits and _')
  if labels not in rows.LABEL_KINDS:
    raise DataError(f'--labels={labels!r}: use classes, values or none')
  if shard_size < 1 or group_size < 1:
    raise DataError(
        f'--shard_size={shard_size} and --group_size='
        f'{group_size} must be at least 1'
    )
  if drop_duplicates and split != 'train':
    raise DataError(
        f'--drop_duplicates cleans the train split only; '
        f'{split} rows are kept as given (drop the flag)'
    )


def _check_inputs(inputs: Sequence[str]):
  if not inputs:
    raise DataError('no input files (--input=FILE[,FILE])')
  for path in inputs:
    if not os.path.exists(path):
      raise DataError(f'input file not found: {path} (--input)')


@dataclasses.dataclass(frozen=True)
class _PretrainedTokenizer:
  """The tokenizer of `--tokenizer`: text is stored as its token ids."""

  tokenizer: Any  # tokenizers.Tokenizer
  info: dict  # metadata.json's `tokenizer`
  max_length: int
  pairs: bool  # a text pair column: token_type_ids too

  @classmethod
  def load(
      cls, path: str, max_length: int, columns: Columns
  ) -> _PretrainedTokenizer:
    if path == 'whitespace':
      raise DataError(
          '--tokenizer=whitespace: the whitespace vocabulary is '
          'fitted on the training split when training; convert '
          'raw text (no --tokenizer) instead'
      )
    if not columns.text:
      raise DataError('--tokenizer needs text: set --text_column')
    from tuning.data import tokenization  # pylint: disable=g-import-not-at-top

    tok = tokenization.load_tokenizer(tokenizer_file(path))
    info = {
        'path': os.path.abspath(path),
        'fingerprint': tokenizer_fingerprint(path),
        'max_length': int(max_length),
        'pad_id': int(tokenization.pad_token_id(tok)),
        'vocab_size': int(tok.get_vocab_size()),
    }
    return cls(tok, info, max_length, bool(columns.text_pair))

  def encode(self, records: list[dict[str, Any]], max_id: int) -> int:
    """Replaces each record's text (and pair) by its token ids (and token
    types), little-endian int32 bytes; returns the largest id so far."""
    from tuning.data import tokenization  # pylint: disable=g-import-not-at-top

    enc = tokenization.encode_texts(
        self.tokenizer,
        [r.pop('text') for r in records],
        [r.pop('text_pair') for r in records] if self.pairs else None,
        max_length=self.max_length,
    )
    for r, ids, types in zip(records, enc['input_ids'], enc['token_type_ids']):
      r['input_ids'] = ids.astype('<i4').tobytes()
      if self.pairs:
        r['token_type_ids'] = types.astype('<i4').tobytes()
      max_id = max(max_id, int(ids.max(initial=-1)))
    return max_id


def _record_fields(
    labels: str | None,
    columns: Columns,
    pretrained: _PretrainedTokenizer | None,
) -> dict[str, str]:
  """metadata.json's `fields`: each record field and its type (features,
  known only after reading, are added by `convert`)."""
  fields = {}
  if labels is not None:
    fields['label'] = 'raw' if labels == 'classes' else 'float64'
  if columns.text:
    if pretrained is None:
      fields['text'] = 'str'
      if columns.text_pair:
        fields['text_pair'] = 'str'
    else:
      fields['input_ids'] = 'int32[]'
      if columns.text_pair:
        fields['token_type_ids'] = 'int32[]'
  return fields


def _check_converted_alike(out_dir: str, metadata: dict, common: dict):
  """Every split of a directory shares the columns, tokenizer and labels."""
  if not metadata:
    return  # the first split
  for key, value in common.items():
    old = metadata.get(key, 'classes' if key == 'labels' else None)
    if old != value:
      raise DataError(
          f'{out_dir}: already holds splits converted with '
          f'{key}={old!r}, not {value!r}; convert every split '
          'alike, or use a new --out directory'
      )


@dataclasses.dataclass
class _Written:
  """What `_write_examples` counted."""

  report: SourceReport  # dropped rows and why
  label_counts: collections.Counter
  max_input_id: int = -1  # with a pretrained tokenizer


def _write_examples(
    inputs: Sequence[str],
    fmt: str,
    split: str,
    parser: rows.RowParser,
    pretrained: _PretrainedTokenizer | None,
    writer: _ShardWriter,
    bar: _Progress,
    *,
    labels: str | None,
    drop_duplicates: bool,
) -> _Written:
  """Streams the rows of `inputs` into `writer`: training rows missing a
  value are dropped (and exact duplicates with `drop_duplicates`), text is
  tokenized 1,024 records at a time, each record packed with msgpack."""
  written = _Written(SourceReport(), collections.Counter())
  report = written.report
  seen = set() if drop_duplicates else None
  pending: list[dict[str, Any]] = []
  pack = msgpack.Packer(use_bin_type=True).pack

  def flush():
    if pretrained is not None and pending:
      written.max_input_id = pretrained.encode(pending, written.max_input_id)
    for r in pending:
      writer.write(pack(r))
    pending.clear()

  for path in inputs:
    for _, record in rows.read_examples(
        path, fmt, parser, report, split, bar.update
    ):
      if split == 'train':
        reason = parser.incomplete(record)
        if reason:
          report.drop(reason)
          continue
      if 'x' in record:
        record['x'] = np.asarray(record['x'], np.float64).tobytes()
      if seen is not None:
        key = hashlib.blake2b(pack(record), digest_size=16).digest()
        if key in seen:
          report.drop('exact duplicate')
          continue
        seen.add(key)
      if labels == 'classes':
        written.label_counts[preprocessing.label_key(record['label'])] += 1
      pending.append(record)
      if len(pending) >= 1024:
        flush()
        bar.set_postfix(examples=writer.count)
    flush()
  return written


def _write_metadata(out_dir: str, metadata: dict):
  """Writes metadata.json whole or not at all (through a renamed file)."""
  tmp = os.path.join(out_dir, METADATA + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(metadata, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, METADATA))


# ----------------------------------------------------------------- reading


def read_metadata(directory: str | None, must_exist: bool = True) -> dict:
  """The directory's metadata.json ({} if absent and not must_exist)."""
  if not directory:
    raise DataError(
        'config.data.records_dir is required for source '
        "'array_record' (convert files with python -m "
        'tuning.cli.to_records)'
    )
  path = os.path.join(directory, METADATA)
  if not os.path.isfile(path):
    if not must_exist:
      return {}
    what = (
        'directory not found'
        if not os.path.isdir(directory)
        else f'no {METADATA}'
    )
    raise DataError(
        f'records directory {directory}: {what} (convert files '
        'into it with python -m tuning.data.to_records, or fix '
        'config.data.records_dir)'
    )
  with open(path, encoding='utf-8') as f:
    metadata = json.load(f)
  if metadata.get('version') != VERSION:
    raise DataError(
        f'{path}: format version {metadata.get("version")!r}, '
        f'this code reads {VERSION}; convert the data again'
    )
  return metadata


def split_paths(directory: str, split: str, metadata: dict) -> list[str]:
  """The split's shard files, checked against the metadata."""
  entry = metadata['splits'].get(split)
  if entry is None:
    raise DataError(
        f'records directory {directory} has no {split!r} split '
        f'(it has: {", ".join(sorted(metadata["splits"]))}); '
        f'convert it with --split={split}'
    )
  paths = [os.path.join(directory, n) for n in entry['shards']]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing or not paths:
    raise DataError(
        f'records directory {directory}: no shards for split '
        f'{split!r} (missing {missing[:2] or entry["shards"]}); '
        'convert the split again'
    )
  return paths


class _GroupSizeFilter:
  """Drops grain's 'requires group size 1' error (see DEFAULT_GROUP_SIZE)."""

  def filter(self, record) -> bool:
    return 'was created with group size' not in str(record.msg)


_FILTER = _GroupSizeFilter()


class RecordSplit:
  """One split of a records directory, read by index (never whole).

  `take(indices)` returns model-ready columns like an in-memory table's rows:
  'label' (class index, int32; float32 for labels='values'; none for
  labels=None), then 'x', or token columns padded to max_length (tokenized
  at conversion, or now by `tokenizer`). It is also the pipeline's
  `tables.Rows` for the training split (select, raw_table, raw_labels,
  raw_chunks, label_counts).
  """

  def __init__(
      self,
      directory: str,
      split: str,
      metadata: dict,
      label_index: dict[str, int] | None = None,
      tokenizer=None,
      index: np.ndarray | None = None,
      image_shape: tuple[int, ...] | None = None,
  ):
    import grain  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    if _FILTER not in logging.get_absl_logger().filters:
      logging.get_absl_logger().addFilter(_FILTER)
    self.directory, self.name, self.metadata = directory, split, metadata
    self.paths = split_paths(directory, split, metadata)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    expected = metadata['splits'][split]['num_examples']
    if len(self._source) != expected:
      raise DataError(
          f'records directory {directory}: split {split!r} has '
          f'{len(self._source)} records, metadata.json says '
          f'{expected}; convert the split again'
      )
    self.label_index = label_index
    # What take() gives as 'label': class indices ('classes', through
    # label_index), float32 values ('values'), or no label (None).
    self.labels = metadata.get('labels', 'classes')
    self.tokenizer = tokenizer
    self.index = index  # a view: positions of this split's examples
    self.image_shape = image_shape
    self.read_threads = 1  # TrainStream's default read threads
    self._local = threading.local()  # a pretrained tokenizer per thread
    self._unpack = lambda b: msgpack.unpackb(b, raw=False)

  def __len__(self) -> int:
    return len(self._source) if self.index is None else len(self.index)

  def view(self, index: np.ndarray) -> RecordSplit:
    """The examples at `index` (positions in this split) as a split."""
    out = RecordSplit.__new__(RecordSplit)
    out.__dict__.update(self.__dict__)
    out.index = np.asarray(
        index if self.index is None else self.index[index], np.int64
    )
    return out

  def select(self, index: np.ndarray) -> RecordSplit:
    """As `view` (the pipeline's `tables.Rows` interface)."""
    return self.view(index)

  def raw_labels(self) -> np.ndarray:
    """The raw label of every example (one pass over the split)."""
    return np.array([r['label'] for r in self.iter_records()], dtype=object)

  def raw_chunks(self, chunk: int = 4096) -> Iterator[Table]:
    """Every example's raw columns, a chunk at a time."""
    for start in range(0, len(self), chunk):
      yield self.raw_table(np.arange(start, min(start + chunk, len(self))))

  def label_counts(self) -> dict[str, int]:
    """Examples per raw label: from the metadata for the whole split."""
    if self.index is None:
      return dict(self.metadata['splits'][self.name]['label_counts'])
    return dict(
        collections.Counter(
            preprocessing.label_key(v) for v in self.raw_labels()
        )
    )

  def records(self, indices) -> list[dict[str, Any]]:
    """Decoded records (raw label, text or token ids) at `indices`."""
    keys = np.asarray(indices, np.int64)
    if self.index is not None:
      keys = self.index[keys]
    return [
        self._unpack(b)
        for b in self._source.__getitems__([int(k) for k in keys])
    ]

  def iter_records(self, chunk: int = 4096) -> Iterator[dict[str, Any]]:
    """Every record in order, read a chunk at a time."""
    for start in range(0, len(self), chunk):
      yield from self.records(np.arange(start, min(start + chunk, len(self))))

  def raw_table(self, indices=None) -> Table:
    """Columns as `sources` reads them (raw labels, text, float64 x)."""
    records = (
        self.records(indices)
        if indices is not None
        else list(self.iter_records())
    )
    return records_to_table(records, self.metadata)

  def take(self, indices) -> Table:
    """Model-ready columns of the examples at `indices`."""
    records = self.records(indices)
    return self.finish(records_to_table(records, self.metadata))

  def finish(self, table: Table, encode_labels: bool = True) -> Table:
    """Encodes labels and pads/tokenizes text, as build_datasets does."""
    if self.labels is None:
      table.pop('label', None)
    elif self.labels == 'values':
      table['label'] = np.asarray(table['label'], np.float32)
    elif encode_labels and self.label_index is not None:
      table['label'] = np.array(
          [
              self.label_index[preprocessing.label_key(v)]
              for v in table['label']
          ],
          np.int32,
      )
    if 'text' in table:
      text = table.pop('text')
      pair = table.pop('text_pair', None)
      tokenizer = self._thread_tokenizer()
      # As build_datasets: the whitespace vocabulary reads the text only.
      table.update(
          tokenizer.encode(text, pair)
          if pair is not None and hasattr(tokenizer, 'path')
          else tokenizer.encode(text)
      )
    elif 'input_ids' in table:
      from tuning.data import tokenization  # pylint: disable=g-import-not-at-top

      info = self.metadata['tokenizer']
      ids = table.pop('input_ids')
      types = table.pop('token_type_ids', None)
      features = {'input_ids': list(ids)}
      if types is not None:
        features['token_type_ids'] = list(types)
      table.update(
          tokenization.pad_batch(
              features, buckets=(info['max_length'],), pad_id=info['pad_id']
          )
      )
    if 'x' in table:
      x = table['x'].astype(np.float32)
      if self.image_shape:
        x = x.reshape((len(x),) + tuple(self.image_shape))
      table['x'] = x
    return table

  def _thread_tokenizer(self):
    """The tokenizer for this thread (a pretrained one sets truncation on
    itself while encoding, so read threads must not share one)."""
    if not hasattr(self.tokenizer, 'path'):
      return self.tokenizer  # the whitespace vocabulary keeps no state
    if getattr(self._local, 'owner', None) is not self.tokenizer:
      self._local.owner = self.tokenizer
      self._local.tokenizer = type(self.tokenizer)(
          self.tokenizer.path, self.tokenizer.max_length
      )
    return self._local.tokenizer


def records_to_table(records: list[dict[str, Any]], metadata: dict) -> Table:
  """Decoded records as columns (token ids stay one array per example)."""
  fields = metadata['fields']
  table = {}
  if fields.get('label') == 'float64':
    table['label'] = np.array([r['label'] for r in records], np.float64)
  elif 'label' in fields:
    table['label'] = np.array([r['label'] for r in records], dtype=object)
  for key in ('text', 'text_pair'):
    if key in fields:
      table[key] = np.array([r[key] for r in records], dtype=object)
  for key in ('input_ids', 'token_type_ids'):
    if key in fields:
      column = np.empty(len(records), dtype=object)
      column[:] = [np.frombuffer(r[key], '<i4') for r in records]
      table[key] = column
  if 'x' in fields:
    width = len(metadata['features'])
    table['x'] = np.frombuffer(
        b''.join(r['x'] for r in records), '<f8'
    ).reshape(len(records), width)
  return table
