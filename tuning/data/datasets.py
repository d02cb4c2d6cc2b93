"""From a data config to model-ready train/validation/test arrays.

One pipeline, two sources of the same rows: files read into memory
(`sources`: CSV/TSV/JSON Lines/NPZ/TFDS/digits, cleaned here) and an
ArrayRecord directory read by index (`records`, cleaned at conversion).
Each gives a training split (`tables.Rows`) and the validation/test tables
the user gave; the steps between are written once:

1. clean the training split only (missing values, exact duplicates);
   validation and test rows are used as given, never de-duplicated or
   filtered (a row that cannot be used at all is an error naming file:line,
   or dropped and counted with on_bad_rows='drop');
2. carve missing validation/test splits deterministically from the
   (cleaned) training split;
3. labels: 'classes' fits the label encoder on the training labels (keeping
   only `classes` when the task names them: rows of other classes are
   dropped and counted in every split), 'values' keeps float targets, None
   reads no label at all;
4. subsample the training split (few-label tasks, max_train_examples) and
   limit validation (max_validation_examples);
5. report how many validation/test rows also occur in train;
6. fit feature/text preprocessing on the training split only and apply it
   to all three (in memory), or tokenize batches as they are read (records).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tuning.data import instructions
from tuning.data import preprocessing
from tuning.data import records
from tuning.data import rows
from tuning.data import sources
from tuning.data import triples as triples_lib
from tuning.data.tables import DataError, Table, is_missing, num_rows

SPLITS = ('train', 'validation', 'test')
# Carving uses its own fixed seed so that changing config.seed (e.g. in a
# seed sweep) never changes which examples are in which split.
_SPLIT_SEED = 20240601


@dataclasses.dataclass
class Datasets:
  """Model-ready splits: each a dict of numpy arrays.

  'label' holds class indices (int32; labels='classes'), float32 targets
  ('values'), or is absent (None). With source 'array_record' the training
  split is a `records.RecordSplit` (read by index from disk; `take(indices)`
  gives a table's rows) and validation/test are tables in memory.
  """

  train: Table  # or records.RecordSplit
  validation: Table
  test: Table
  num_classes: int | None  # None: not classes
  class_names: list[str] | None
  log: list[str]  # what preprocessing did, one line each
  # Token-id range for streamed text (None: computed from the tables).
  streamed_vocab_size: int | None = None
  # The inputs before feature/text preprocessing ('x' or 'text' and
  # 'text_pair'), per split, and the fitted preprocessing that turns such
  # raw columns into model features (for a distillation teacher, which
  # encodes the student's examples its own way).
  raw: dict[str, Table] = dataclasses.field(default_factory=dict)
  encode: Any = None
  labels: str | None = 'classes'  # what 'label' holds (see build_datasets)
  # Source 'triples': the vocab and known triples (tuning/data/triples.py),
  # and the training stream's `(batch, rng) -> batch` that fills the
  # corruption slots of each batch (None: no negatives).
  triples: Any = None
  corrupt: Any = None

  def split(self, name: str) -> Table:
    return getattr(self, name)

  def first_train_example(self) -> Table:
    """The first training example as a batch of one (for model init)."""
    if not isinstance(self.train, dict):
      return self.train.take(np.arange(1))
    return {k: v[:1] for k, v in self.train.items()}

  def vocab_size(self, data_config) -> int | None:
    """Token-id range the embedding must cover (None: not text)."""
    if self.triples is not None and 'triples' in self.validation:
      return self.triples.vocab.size  # entities, then relations
    if self.triples is not None and 'triple_words' in self.validation:
      return self.triples.vocab.num_words
    if 'input_ids' not in self.validation:
      return None
    if data_config.tokenizer == 'whitespace':
      return data_config.vocab_size
    if self.streamed_vocab_size is not None:
      return self.streamed_vocab_size
    return (
        max(
            int(t['input_ids'].max())
            for t in (self.train, self.validation, self.test)
        )
        + 1
    )


def build_datasets(
    data_config, labels: str | None = 'classes', *, append_eos: bool = False
) -> Datasets:
  """Builds the three splits described by `config.data`.

  `labels`: 'classes' (class labels: encoded to 0..num_classes-1, with
  `classes`, `class_names` and `examples_per_class`), 'values' (float32
  regression targets; a label that is not a number is an error naming
  file:line), or None (no label column is read: text-only data).
  `append_eos`: end each text with its pretrained tokenizer's end-of-text
  token (language modelling; see `preprocessing.PretrainedTokenizer`).
  """
  _check_labels(data_config, labels)
  instructions.check_config(data_config, labels)
  if data_config.source == 'array_record':
    source = _RecordsSource(data_config, labels)
  else:
    source = _MemorySource(data_config, labels)
  source.append_eos = append_eos
  log = source.log
  train, tables = source.train, dict(source.given)
  for name in tables:
    if labels is None:
      tables[name].pop('label', None)
    tables[name] = _check_given(tables[name], name, data_config, log)
  train, counts = _carve(train, tables, data_config, labels, log)
  encoder, ids = None, None  # ids: class index of every training row
  if labels == 'classes':
    encoder, train, ids = _encode_labels(
        train, tables, counts, data_config, log
    )
  for name, size in (
      ('train', len(train)),
      *((n, num_rows(tables[n])) for n in ('validation', 'test')),
  ):
    if not size:
      raise DataError(
          f'the {name} split is empty after preprocessing '
          '(check config.data.classes and the data files)'
      )
  if data_config.examples_per_class or data_config.max_train_examples:
    if data_config.examples_per_class and ids is None:
      ids = encoder.ids(train.raw_labels())
    order = _subsample_order(ids, len(train), data_config)
    if len(order) < len(train):
      what = 'labelled examples' if labels else 'examples'
      log.append(f'train: kept {len(order)} of {len(train)} {what}')
      train = train.select(order)
  tables['validation'] = _limit_validation(
      tables['validation'], data_config, log
  )
  _report_overlap(train, tables, log)

  data = source.finish(train, tables, encoder, labels, data_config)
  data.labels = labels
  sizes = ', '.join(
      f'{n} {s}'
      for n, s in (
          (
              'train',
              num_rows(data.train)
              if isinstance(data.train, dict)
              else len(data.train),
          ),
          ('validation', num_rows(data.validation)),
          ('test', num_rows(data.test)),
      )
  )
  what = {
      'classes': f'{data.num_classes} classes',
      'values': 'regression values',
      None: 'no labels',
  }[labels]
  log.append(f'examples: {sizes}; {what}')
  return data


def _carve(train, tables: dict[str, Table], data_config, labels, log):
  """Carves missing validation/test splits (into `tables`) from train.

  Returns the rest of train and, for class labels, its rows per label.
  """
  counts = train.label_counts() if labels == 'classes' else None
  rng = np.random.default_rng(_SPLIT_SEED)
  for name, fraction in (
      ('test', data_config.test_fraction),
      ('validation', data_config.validation_fraction),
  ):
    if name in tables:
      continue
    n = len(train)
    count = int(round(n * fraction))
    if not 0 < count < n:
      raise DataError(
          f'cannot carve a {name} split of fraction {fraction} '
          f'from {n} training rows (config.data.{name}_fraction)'
      )
    order = rng.permutation(n)
    tables[name] = train.raw_table(np.sort(order[:count]))
    train = train.select(np.sort(order[count:]))
    if counts is not None:
      for label in tables[name]['label']:
        counts[preprocessing.label_key(label)] -= 1
    if labels is None:
      tables[name].pop('label', None)  # records converted with labels
    log.append(
        f'{name}: carved {count} of {n} training rows ' f'(fraction {fraction})'
    )
  return train, counts


def _encode_labels(
    train, tables: dict[str, Table], counts: dict[str, int], data_config, log
):
  """Fits class labels on train; keeps only `classes`; encodes dev labels.

  Returns the encoder, the training rows kept and their class indices
  (None: not read).
  """
  encoder = preprocessing.LabelEncoder.fit(
      np.array([k for k, v in counts.items() if v > 0], dtype=object),
      data_config.classes,
      data_config.class_names,
  )
  ids = None
  if data_config.classes:
    ids = encoder.ids(train.raw_labels())
    keep = np.flatnonzero(ids >= 0)
    if len(keep) < len(train):
      log.append(
          f'train: dropped {len(train) - len(keep)} rows (label not '
          'in config.data.classes)'
      )
      train, ids = train.select(keep), ids[keep]
  for name in ('validation', 'test'):
    tables[name], dropped = encoder.transform(tables[name])
    if dropped:
      why = (
          'label not in config.data.classes'
          if data_config.classes
          else 'label not seen in training'
      )
      log.append(f'{name}: dropped {dropped} rows ({why})')
  return encoder, train, ids


def _check_labels(data_config, labels):
  if data_config.pack and labels is not None:
    raise DataError(
        'config.data.pack packs unlabelled text for language modelling: use '
        'it with config.task=causal_lm, or unset it'
    )
  if labels not in rows.LABEL_KINDS:
    raise DataError(f"labels={labels!r}: use 'classes', 'values' or None")
  if labels != 'classes':
    for field in ('classes', 'class_names', 'examples_per_class'):
      if data_config.get(field):
        raise DataError(
            f'config.data.{field} needs class labels, but this task reads '
            f'{"regression values" if labels else "no labels"}; unset it'
        )


def _check_given(table: Table, name: str, data_config, log) -> Table:
  """A given validation/test split is used as given: every row must be
  usable (files are checked row by row as they are read; this catches
  NPZ/TFDS splits and older record conversions)."""
  n = num_rows(table)
  bad = np.zeros(n, bool)
  reasons = {}
  checks = []
  if 'label' in table:
    checks.append(
        (
            'missing label',
            np.array([is_missing(v) for v in table['label']], bool),
        )
    )
  if 'x' in table:
    checks.append(
        (
            'missing/NaN feature',
            ~np.isfinite(table['x'].reshape(n, -1)).all(axis=1),
        )
    )
  for key in ('text', 'text_pair'):
    if key in table:
      checks.append(
          (f'missing {key}', np.array([v is None for v in table[key]], bool))
      )
  for reason, rows_bad in checks:
    new = rows_bad & ~bad
    if new.any():
      reasons[reason] = (int(new.sum()), int(np.argmax(new)))
    bad |= rows_bad
  if not bad.any():
    return table
  if data_config.on_bad_rows != 'drop':
    reason, (count, first) = next(iter(reasons.items()))
    raise DataError(
        f'the {name} split has {count} rows with a {reason} '
        f'(first: row {first}); {name} rows are used as given, '
        'never cleaned: fix the data, or set '
        "config.data.on_bad_rows='drop' to drop and count them"
    )
  for reason, (count, _) in reasons.items():
    log.append(f'{name}: dropped {count} rows ({reason})')
  return preprocessing.take(table, np.flatnonzero(~bad))


def _limit_validation(validation: Table, data_config, log) -> Table:
  """A fixed random subset of `max_validation_examples` (faster checks)."""
  limit = data_config.max_validation_examples
  n = num_rows(validation)
  if not limit or limit >= n:
    return validation
  keep = np.sort(np.random.default_rng(_SPLIT_SEED + 2).permutation(n)[:limit])
  log.append(f'validation: kept {limit} of {n} examples')
  return preprocessing.take(validation, keep)


def _subsample_order(ids: np.ndarray | None, n: int, data_config) -> np.ndarray:
  """The training rows to keep, sorted: the first `examples_per_class` of
  each class (`ids`: class index of every row), then `max_train_examples`,
  in a fixed random order."""
  order = np.random.default_rng(_SPLIT_SEED + 1).permutation(n)
  if data_config.examples_per_class:
    k = data_config.examples_per_class
    seen, chosen = {}, []
    for i in order:
      c = int(ids[i])
      if seen.get(c, 0) < k:
        seen[c] = seen.get(c, 0) + 1
        chosen.append(i)
    order = np.array(chosen, np.int64)
  if data_config.max_train_examples:
    order = order[: data_config.max_train_examples]
  return np.sort(order)


def _input_keys(table: Table) -> list[tuple]:
  """Each row's inputs (every column but the label), comparable exactly."""
  parts = []
  for key in sorted(k for k in table if k not in ('label', 'where')):
    column = table[key]
    if column.dtype == object:
      parts.append(
          [v.tobytes() if isinstance(v, np.ndarray) else str(v) for v in column]
      )
    else:
      parts.append([r.tobytes() for r in column.reshape(len(column), -1)])
  return list(zip(*parts))


def _report_overlap(train, tables: dict[str, Table], log: list[str]):
  """Logs how many validation/test rows have inputs equal to a training
  row's (one pass over the training rows; only the dev keys are held)."""
  wanted = {name: _input_keys(tables[name]) for name in ('validation', 'test')}
  keys = set().union(*wanted.values())
  if not keys:
    return
  found = set()
  for chunk in train.raw_chunks():
    found.update(k for k in _input_keys(chunk) if k in keys)
  for name, split_keys in wanted.items():
    count = sum(k in found for k in split_keys)
    log.append(
        f'{count} of {len(split_keys)} {name} rows also occur in ' 'train'
    )


def _finish_labels(table: Table, labels: str | None) -> Table:
  if labels == 'classes':
    table['label'] = table['label'].astype(np.int32)
  elif labels == 'values':
    table['label'] = np.asarray(table['label'], np.float32)
  return table


def _fit_tokenizer(chunks, data_config, append_eos: bool = False):
  """The whitespace vocabulary of the training text (text and pairs), or a
  pretrained tokenizer."""
  if append_eos and data_config.tokenizer == 'whitespace':
    raise DataError(
        "this task predicts the pretrained model's tokens: set "
        'config.data.tokenizer to its folder or tokenizer.json'
    )
  if data_config.tokenizer == 'whitespace':
    texts = (
        t
        for chunk in chunks
        for key in ('text', 'text_pair')
        if key in chunk
        for t in chunk[key]
    )
    return preprocessing.WhitespaceVocabulary.fit(
        texts, data_config.vocab_size, data_config.max_length
    )
  return preprocessing.PretrainedTokenizer(
      data_config.tokenizer, data_config.max_length, append_eos
  )


def _pack_splits(tables, data_config, labels, log):
  """config.data.pack: each split's whole documents packed into rows."""
  if 'input_ids' not in tables['train']:
    raise DataError(
        'config.data.pack packs tokenized text: set config.data.text_column '
        '(or instruction columns) and a pretrained config.data.tokenizer, '
        'or unset it'
    )
  counts = []
  for name in SPLITS:
    before = len(tables[name]['input_ids'])
    tables[name] = preprocessing.pack(tables[name], data_config.max_length)
    counts.append(f'{name} {before} -> {len(tables[name]["input_ids"])}')
  filled = tables['train']['attention_mask'].mean()
  log.append(
      f'packed documents into rows of {data_config.max_length} tokens '
      f'(attention within each document): {", ".join(counts)}; train rows '
      f'{filled:.0%} tokens, {1 - filled:.0%} padding'
  )


class _MemorySource:
  """Files, NPZ, TFDS or digits read whole into tables; train cleaned."""

  append_eos = False

  triples = None

  def __init__(self, data_config, labels: str | None):
    self.log = []
    if data_config.source == 'triples':
      self.triples = triples_lib.read_splits(data_config)
      tables = dict(self.triples.tables)
      reports = {name: sources.SourceReport() for name in SPLITS}
      self.log.extend(self.triples.log)
    else:
      tables, reports = sources.read_split_files(data_config, labels)
    for name in SPLITS:
      prefix = '' if name == 'train' else f'{name}: '
      for reason, count in reports[name].dropped.items():
        self.log.append(
            f'{prefix}dropped {count} rows while reading: ' f'{reason}'
        )
    train, counts = preprocessing.clean(
        tables.pop('train'),
        # triples: true ones de-duplicated when read; slots refilled later
        drop_duplicates=data_config.drop_duplicates and self.triples is None,
    )
    for reason, count in counts.items():
      self.log.append(f'train: dropped {count} rows ({reason})')
    self.train = sources.MemoryRows(train)
    self.given = tables

  def finish(self, train, tables, encoder, labels, data_config) -> Datasets:
    """Fits feature/text preprocessing on train; encodes every split."""
    log = self.log
    tables = {'train': train.table, **tables}
    if encoder is not None:
      tables['train'], _ = encoder.transform(tables['train'])
    raw = {
        name: {
            k: tables[name][k]
            for k in ('x', 'text', 'text_pair', 'triples')
            if k in tables[name]
        }
        for name in SPLITS
    }
    encode = None
    if self.triples is not None:
      _check_triple_classes(encoder, data_config)
      for name in SPLITS:
        tables[name].update(
            triples_lib.model_columns(
                tables[name].pop('triples'),
                self.triples.vocab,
                data_config.triple_input,
            )
        )
    if 'x' in tables['train']:
      transform = preprocessing.FeatureTransform.fit(
          tables['train']['x'],
          data_config.normalize,
          data_config.pca_components,
      )

      def encode(raw_table):
        x = transform.transform(raw_table['x'])
        if data_config.image_shape:
          x = _as_images(x, tuple(data_config.image_shape))
        return {'x': x}

      for name in SPLITS:
        tables[name].update(encode({'x': tables[name].pop('x')}))
      if data_config.normalize or data_config.pca_components:
        log.append(
            'features: fitted on train: '
            f'normalize={data_config.normalize}, '
            f'pca_components={data_config.pca_components}'
        )
    if 'text' in tables['train']:
      tokenizer = _fit_tokenizer(
          [tables['train']], data_config, self.append_eos
      )

      def encode(raw_table):
        if 'text_pair' in raw_table and hasattr(tokenizer, 'path'):
          return tokenizer.encode(raw_table['text'], raw_table['text_pair'])
        return tokenizer.encode(raw_table['text'])

      for name in SPLITS:
        table = tables[name]
        table.update(
            encode(
                {
                    'text': table.pop('text'),
                    **(
                        {'text_pair': table.pop('text_pair')}
                        if 'text_pair' in table
                        else {}
                    ),
                }
            )
        )
      log.append(
          f'text: tokenizer {data_config.tokenizer!r}, max_length '
          f'{data_config.max_length}'
      )
    if instructions.columns_set(data_config):
      encoder_of_rows = instructions.InstructionEncoder(data_config)
      log.append(encoder_of_rows.describe())
      for name in SPLITS:
        tables[name], lines = encoder_of_rows.encode(tables[name], name)
        log.extend(lines)
        if not num_rows(tables[name]):
          raise DataError(
              f'the {name} split has no row with a response token within '
              f'config.data.max_length={data_config.max_length}: raise it'
          )
    if data_config.pack:
      _pack_splits(tables, data_config, labels, log)
    for name in SPLITS:
      _finish_labels(tables[name], labels)
    corrupt = None
    if self.triples is not None and data_config.negatives:
      corrupt = triples_lib.negatives_hook(
          self.triples,
          data_config.triple_input,
          encode if data_config.triple_input == 'text' else None,
      )
    return Datasets(
        tables['train'],
        tables['validation'],
        tables['test'],
        encoder and encoder.num_classes,
        encoder and encoder.classes,
        log,
        raw=raw,
        encode=encode,
        triples=self.triples,
        corrupt=corrupt,
    )


def _check_triple_classes(encoder, data_config):
  """Triples are classified false (label 0, class 0) or true (1, class 1)."""
  index = dict(encoder.index) if encoder is not None else None
  if index != {'0': 0, '1': 1}:
    raise DataError(
        "source 'triples' classifies triples as false (0) or true (1); "
        'set config.task=classification and leave config.data.classes '
        f'unset (it is {data_config.classes})'
    )


class _RecordsSource:
  """Training streams from an ArrayRecord directory; dev splits in memory.

  Cleaning happened at conversion. Only carving, `classes` and subsampling
  keep an index of the training rows in memory (8 bytes a row; `classes`
  and examples_per_class read every label once); otherwise training reads
  the shards by position. The labels' counts come from the metadata.
  """

  append_eos = False

  def __init__(self, data_config, labels: str | None):
    directory = data_config.get('records_dir')
    metadata = records.read_metadata(directory)
    if 'train' not in metadata['splits']:
      records.split_paths(directory, 'train', metadata)  # raises
    if (
        str(data_config.normalize).lower() not in ('none', '')
        or data_config.pca_components
    ):
      raise DataError(
          'config.data.normalize / pca_components need a pass '
          'over the whole training set: not supported with source '
          "'array_record'; normalize the features before "
          'converting'
      )
    kind = metadata.get('labels', 'classes')
    if labels is not None and kind != labels:
      raise DataError(
          f'records directory {directory} holds labels as '
          f'{kind}, not {labels}; convert it again with '
          f'--labels={labels}'
      )
    _check_records_tokenizer(data_config, metadata, directory)
    train = metadata['splits']['train']
    self.log = [
        f'records: {directory} (train {train["num_examples"]}'
        ' examples, read by index from '
        f'{len(train["shards"])} shard(s))'
    ]
    for name, entry in sorted(metadata['splits'].items()):
      for reason, count in entry['dropped'].items():
        self.log.append(
            f'{name}: dropped {count} rows at conversion ' f'({reason})'
        )
    if data_config.drop_duplicates and not train.get('drop_duplicates'):
      self.log.append(
          'train: duplicates kept (drop them at conversion with '
          '--drop_duplicates)'
      )
    self.metadata = metadata
    self.train = records.RecordSplit(
        directory, 'train', metadata, image_shape=data_config.image_shape
    )
    self.given = {
        name: records.RecordSplit(directory, name, metadata).raw_table()
        for name in ('validation', 'test')
        if name in metadata['splits']
    }

  def finish(self, train, tables, encoder, labels, data_config) -> Datasets:
    """Sets how the training split encodes what it reads; encodes dev."""
    if data_config.pack:
      raise DataError(
          'config.data.pack needs the documents in memory: use a csv/jsonl '
          'source, not array_record, or unset it'
      )
    log, metadata = self.log, self.metadata
    train.label_index = encoder and encoder.index
    train.labels = labels
    train.read_threads = data_config.read_threads
    vocab = None
    if 'text' in metadata['fields']:
      train.tokenizer = _fit_tokenizer(
          train.raw_chunks(), data_config, self.append_eos
      )
      if data_config.tokenizer != 'whitespace':
        vocab = int(train.tokenizer._tokenizer.get_vocab_size())  # pylint: disable=protected-access
      log.append(
          f'text: tokenizer {data_config.tokenizer!r}, max_length '
          f'{data_config.max_length}, tokenized on the fly'
      )
    elif 'input_ids' in metadata['fields']:
      info = metadata['tokenizer']
      vocab = (
          max(e.get('max_input_id', -1) for e in metadata['splits'].values())
          + 1
      )
      log.append(
          f'text: tokenized at conversion ({info["path"]}, max_length '
          f'{info["max_length"]})'
      )
    for name in ('validation', 'test'):  # labels are class indices already
      tables[name] = _finish_labels(
          train.finish(tables[name], encode_labels=False), labels
      )
    if vocab is not None and 'input_ids' in tables['validation']:
      vocab = max(
          [vocab]
          + [
              int(tables[n]['input_ids'].max()) + 1
              for n in ('validation', 'test')
          ]
      )
    return Datasets(
        train,
        tables['validation'],
        tables['test'],
        encoder and encoder.num_classes,
        encoder and encoder.classes,
        log,
        vocab,
    )


def _as_images(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if int(np.prod(shape)) != x[0].size:
    raise DataError(
        f'config.data.image_shape={shape} does not fit features '
        f'of size {x[0].size}'
    )
  return x.reshape((len(x),) + shape)


def _check_records_tokenizer(data_config, metadata: dict, directory: str):
  """Records tokenized at conversion must match config.data.tokenizer."""
  info = metadata.get('tokenizer')
  if not info:
    return
  where = f'records directory {directory} was tokenized at conversion with '
  if data_config.tokenizer == 'whitespace':
    raise DataError(
        where + f'{info["path"]}; set config.data.tokenizer to '
        'that tokenizer, or convert raw text (no --tokenizer)'
    )
  if (
      records.tokenizer_fingerprint(data_config.tokenizer)
      != info['fingerprint']
  ):
    raise DataError(
        where + f'{info["path"]}, not config.data.tokenizer='
        f'{data_config.tokenizer}; convert again with '
        f'--tokenizer={data_config.tokenizer}'
    )
  if int(data_config.max_length) != int(info['max_length']):
    raise DataError(
        where + f'max_length {info["max_length"]}, not '
        f'config.data.max_length={data_config.max_length}; set '
        'it, or convert again with --max_length'
    )
