"""From a data config to model-ready train/validation/test arrays.

Order of work: read the source, clean every split, carve missing
validation/test splits deterministically from train, encode labels (keeping
only `classes` when the task names them), subsample the training labels
(few-label tasks), then fit feature/text preprocessing on the training split
only and apply it to all three.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tuning.data import preprocessing
from tuning.data.sources import DataError, Table, read_split_files

SPLITS = ('train', 'validation', 'test')
# Carving uses its own fixed seed so that changing config.seed (e.g. in a
# seed sweep) never changes which examples are in which split.
_SPLIT_SEED = 20240601


@dataclasses.dataclass
class Datasets:
  """Model-ready splits: each a dict of numpy arrays with a 'label' column.

  With source 'array_record' the training split is a `records.RecordSplit`
  (read by index from disk; `take(indices)` gives a table's rows) and
  validation/test are tables in memory.
  """
  train: Table  # or records.RecordSplit
  validation: Table
  test: Table
  num_classes: int
  class_names: list[str]
  log: list[str]  # what preprocessing did, one line each
  # Token-id range for streamed text (None: computed from the tables).
  streamed_vocab_size: int | None = None
  # The inputs before feature/text preprocessing ('x' or 'text' and
  # 'text_pair'), per split, and the fitted preprocessing that turns such
  # raw columns into model features (for a distillation teacher, which
  # encodes the student's examples its own way).
  raw: dict[str, Table] = dataclasses.field(default_factory=dict)
  encode: Any = None

  def split(self, name: str) -> Table:
    return getattr(self, name)

  def first_train_example(self) -> Table:
    """The first training example as a batch of one (for model init)."""
    if not isinstance(self.train, dict):
      return self.train.take(np.arange(1))
    return {k: v[:1] for k, v in self.train.items()}

  def vocab_size(self, data_config) -> int | None:
    """Token-id range the embedding must cover (None: not text)."""
    if 'input_ids' not in self.validation:
      return None
    if data_config.tokenizer == 'whitespace':
      return data_config.vocab_size
    if self.streamed_vocab_size is not None:
      return self.streamed_vocab_size
    return max(int(t['input_ids'].max()) for t in
               (self.train, self.validation, self.test)) + 1


def build_datasets(data_config) -> Datasets:
  """Builds the three splits described by `config.data`."""
  if data_config.source == 'array_record':
    return _build_from_records(data_config)
  log = []
  tables, report = read_split_files(data_config)
  for reason, count in report.dropped.items():
    log.append(f'dropped {count} rows while reading: {reason}')

  for name in list(tables):
    tables[name], counts = preprocessing.clean(
        tables[name], drop_duplicates=data_config.drop_duplicates)
    for reason, count in counts.items():
      log.append(f'{name}: dropped {count} rows ({reason})')

  rng = np.random.default_rng(_SPLIT_SEED)
  for name, fraction in (('test', data_config.test_fraction),
                         ('validation', data_config.validation_fraction)):
    if name in tables:
      continue
    train = tables['train']
    n = len(train['label'])
    count = int(round(n * fraction))
    if not 0 < count < n:
      raise DataError(f'cannot carve a {name} split of fraction {fraction} '
                      f'from {n} training rows (config.data.{name}_fraction)')
    order = rng.permutation(n)
    tables[name] = preprocessing.take(train, np.sort(order[:count]))
    tables['train'] = preprocessing.take(train, np.sort(order[count:]))
    log.append(f'{name}: carved {count} of {n} training rows '
               f'(fraction {fraction})')

  encoder = preprocessing.LabelEncoder.fit(
      tables['train']['label'], data_config.classes, data_config.class_names)
  for name in SPLITS:
    tables[name], dropped = encoder.transform(tables[name])
    if dropped:
      why = ('label not in config.data.classes' if data_config.classes
             else 'label not seen in training')
      log.append(f'{name}: dropped {dropped} rows ({why})')
    if not len(tables[name]['label']):
      raise DataError(f'the {name} split is empty after preprocessing '
                      '(check config.data.classes and the data files)')

  tables['train'] = _subsample(tables['train'], data_config, log)
  tables['validation'] = _limit_validation(tables['validation'],
                                           data_config, log)

  raw = {name: {k: tables[name][k] for k in ('x', 'text', 'text_pair')
                if k in tables[name]} for name in SPLITS}
  encode = None
  if 'x' in tables['train']:
    transform = preprocessing.FeatureTransform.fit(
        tables['train']['x'], data_config.normalize,
        data_config.pca_components)

    def encode(raw_table):
      x = transform.transform(raw_table['x'])
      if data_config.image_shape:
        x = _as_images(x, tuple(data_config.image_shape))
      return {'x': x}

    for name in SPLITS:
      tables[name].update(encode({'x': tables[name].pop('x')}))
    if data_config.normalize or data_config.pca_components:
      log.append('features: fitted on train: '
                 f'normalize={data_config.normalize}, '
                 f'pca_components={data_config.pca_components}')
  if 'text' in tables['train']:
    tokenizer = _fit_tokenizer(tables['train'], data_config)

    def encode(raw_table):
      if 'text_pair' in raw_table and hasattr(tokenizer, 'path'):
        return tokenizer.encode(raw_table['text'], raw_table['text_pair'])
      return tokenizer.encode(raw_table['text'])

    for name in SPLITS:
      table = tables[name]
      table.update(encode({'text': table.pop('text'),
                           **({'text_pair': table.pop('text_pair')}
                              if 'text_pair' in table else {})}))
    log.append(f'text: tokenizer {data_config.tokenizer!r}, max_length '
               f'{data_config.max_length}')
  for name in SPLITS:
    tables[name]['label'] = tables[name]['label'].astype(np.int32)
  sizes = ', '.join(f'{n} {len(tables[n]["label"])}' for n in SPLITS)
  log.append(f'examples: {sizes}; {encoder.num_classes} classes')
  return Datasets(tables['train'], tables['validation'], tables['test'],
                  encoder.num_classes, encoder.classes, log, raw=raw,
                  encode=encode)


def _limit_validation(validation: Table, data_config, log) -> Table:
  """A fixed random subset of `max_validation_examples` (faster checks)."""
  limit = data_config.max_validation_examples
  n = len(validation['label'])
  if not limit or limit >= n:
    return validation
  keep = np.sort(np.random.default_rng(_SPLIT_SEED + 2).permutation(n)[:limit])
  log.append(f'validation: kept {limit} of {n} examples')
  return preprocessing.take(validation, keep)


def _subsample(train: Table, data_config, log: list[str]) -> Table:
  """Keeps the first examples of each class (few-label training sets)."""
  n = len(train['label'])
  order = np.random.default_rng(_SPLIT_SEED + 1).permutation(n)
  if data_config.examples_per_class:
    k = data_config.examples_per_class
    chosen = []
    seen = {}
    for i in order:
      c = int(train['label'][i])
      if seen.get(c, 0) < k:
        seen[c] = seen.get(c, 0) + 1
        chosen.append(i)
    order = np.array(chosen)
  if data_config.max_train_examples:
    order = order[:data_config.max_train_examples]
  if len(order) == n:
    return train
  log.append(f'train: kept {len(order)} of {n} labelled examples')
  return preprocessing.take(train, np.sort(order))


def _as_images(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if int(np.prod(shape)) != x[0].size:
    raise DataError(f'config.data.image_shape={shape} does not fit features '
                    f'of size {x[0].size}')
  return x.reshape((len(x),) + shape)


def _fit_tokenizer(train: Table, data_config):
  if data_config.tokenizer == 'whitespace':
    texts = list(train['text']) + list(train.get('text_pair', []))
    return preprocessing.WhitespaceVocabulary.fit(
        texts, data_config.vocab_size, data_config.max_length)
  return preprocessing.PretrainedTokenizer(data_config.tokenizer,
                                           data_config.max_length)


def _build_from_records(data_config) -> Datasets:
  """Training streams from an ArrayRecord directory; dev splits in memory.

  Mirrors build_datasets step by step (cleaning happened at conversion):
  carve missing validation/test splits from train with the same seed, fit
  labels on the training split's label counts (metadata), keep only
  `classes` and subsample, fit the tokenizer, and encode. Only carving,
  `classes` and subsampling keep an index of the training rows in memory
  (8 bytes a row; `classes` and examples_per_class read every label once);
  otherwise training reads the shards by position.
  """
  from tuning.data import records  # pylint: disable=g-import-not-at-top
  directory = data_config.get('records_dir')
  metadata = records.read_metadata(directory)
  if 'train' not in metadata['splits']:
    records.split_paths(directory, 'train', metadata)  # raises
  if (str(data_config.normalize).lower() not in ('none', '')
      or data_config.pca_components):
    raise DataError('config.data.normalize / pca_components need a pass over '
                    "the whole training set: not supported with source "
                    "'array_record'; normalize the features before converting")
  _check_records_tokenizer(data_config, metadata, directory)
  log = [f'records: {directory} (train {metadata["splits"]["train"]["num_examples"]}'
         ' examples, read by index from '
         f'{len(metadata["splits"]["train"]["shards"])} shard(s))']
  for name, entry in sorted(metadata['splits'].items()):
    for reason, count in entry['dropped'].items():
      log.append(f'{name}: dropped {count} rows at conversion ({reason})')
  if data_config.drop_duplicates and not metadata['splits']['train'].get(
      'drop_duplicates'):
    log.append('train: duplicates kept (drop them at conversion with '
               '--drop_duplicates)')

  train = records.RecordSplit(directory, 'train', metadata,
                              image_shape=data_config.image_shape)
  tables = {}
  for name in ('validation', 'test'):
    if name in metadata['splits']:
      tables[name] = records.RecordSplit(directory, name,
                                         metadata).raw_table()
  key = preprocessing._label_key  # pylint: disable=protected-access
  # Training label counts from the metadata, less the rows carved away.
  counts = dict(metadata['splits']['train']['label_counts'])
  rng = np.random.default_rng(_SPLIT_SEED)
  for name, fraction in (('test', data_config.test_fraction),
                         ('validation', data_config.validation_fraction)):
    if name in tables:
      continue
    n = len(train)
    count = int(round(n * fraction))
    if not 0 < count < n:
      raise DataError(f'cannot carve a {name} split of fraction {fraction} '
                      f'from {n} training rows (config.data.{name}_fraction)')
    order = rng.permutation(n)
    tables[name] = train.raw_table(np.sort(order[:count]))
    train = train.view(np.sort(order[count:]))
    for label in tables[name]['label']:
      counts[key(label)] -= 1
    log.append(f'{name}: carved {count} of {n} training rows '
               f'(fraction {fraction})')

  encoder = preprocessing.LabelEncoder.fit(
      np.array([k for k, v in counts.items() if v > 0], dtype=object),
      data_config.classes, data_config.class_names)
  ids = None  # class index of every training example, read when needed
  if data_config.classes:
    ids = _record_label_ids(train, encoder)
    keep = np.flatnonzero(ids >= 0)
    if len(keep) < len(train):
      log.append(f'train: dropped {len(train) - len(keep)} rows (label not '
                 'in config.data.classes)')
      train, ids = train.view(keep), ids[keep]
  for name in ('validation', 'test'):
    tables[name], dropped = encoder.transform(tables[name])
    if dropped:
      why = ('label not in config.data.classes' if data_config.classes
             else 'label not seen in training')
      log.append(f'{name}: dropped {dropped} rows ({why})')
  for name, size in (('train', len(train)), *(
      (n, len(tables[n]['label'])) for n in ('validation', 'test'))):
    if not size:
      raise DataError(f'the {name} split is empty after preprocessing '
                      '(check config.data.classes and the data files)')

  if data_config.examples_per_class or data_config.max_train_examples:
    if data_config.examples_per_class and ids is None:
      ids = _record_label_ids(train, encoder)
    order = _subsample_order(
        ids if ids is not None else np.zeros(len(train), np.int32),
        data_config)
    if len(order) < len(train):
      log.append(f'train: kept {len(order)} of {len(train)} labelled '
                 'examples')
      train = train.view(order)
  tables['validation'] = _limit_validation(tables['validation'],
                                           data_config, log)

  train.label_index = encoder.index
  train.read_threads = int(data_config.get('read_threads') or 1)
  vocab = None
  if 'text' in metadata['fields']:
    if data_config.tokenizer == 'whitespace':
      texts = (r['text'] for r in train.iter_records())
      tokenizer = preprocessing.WhitespaceVocabulary.fit(
          texts, data_config.vocab_size, data_config.max_length)
    else:
      tokenizer = _fit_tokenizer({}, data_config)
      vocab = int(tokenizer._tokenizer.get_vocab_size())  # pylint: disable=protected-access
    train.tokenizer = tokenizer
    log.append(f'text: tokenizer {data_config.tokenizer!r}, max_length '
               f'{data_config.max_length}, tokenized on the fly')
  elif 'input_ids' in metadata['fields']:
    info = metadata['tokenizer']
    vocab = max(e.get('max_input_id', -1)
                for e in metadata['splits'].values()) + 1
    log.append(f'text: tokenized at conversion ({info["path"]}, max_length '
               f'{info["max_length"]})')
  for name in ('validation', 'test'):  # labels are class indices already
    tables[name] = train.finish(tables[name], encode_labels=False)
    tables[name]['label'] = tables[name]['label'].astype(np.int32)
  if vocab is not None and 'input_ids' in tables['validation']:
    vocab = max([vocab] + [int(tables[n]['input_ids'].max()) + 1
                           for n in ('validation', 'test')])
  sizes = ', '.join(f'{n} {s}' for n, s in (
      ('train', len(train)), ('validation', len(tables['validation']['label'])),
      ('test', len(tables['test']['label']))))
  log.append(f'examples: {sizes}; {encoder.num_classes} classes')
  return Datasets(train, tables['validation'], tables['test'],
                  encoder.num_classes, encoder.classes, log, vocab)


def _record_label_ids(split, encoder) -> np.ndarray:
  """Class index of every example of a record split (-1: not a class)."""
  key = preprocessing._label_key  # pylint: disable=protected-access
  return np.fromiter((encoder.index.get(key(r['label']), -1)
                      for r in split.iter_records()), np.int32, len(split))


def _subsample_order(ids: np.ndarray, data_config) -> np.ndarray:
  """The rows _subsample keeps, in order (same seed, same choice)."""
  n = len(ids)
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
    order = order[:data_config.max_train_examples]
  return np.sort(order)


def _check_records_tokenizer(data_config, metadata: dict, directory: str):
  """Records tokenized at conversion must match config.data.tokenizer."""
  from tuning.data import records  # pylint: disable=g-import-not-at-top
  info = metadata.get('tokenizer')
  if not info:
    return
  where = f'records directory {directory} was tokenized at conversion with '
  if data_config.tokenizer == 'whitespace':
    raise DataError(where + f'{info["path"]}; set config.data.tokenizer to '
                    'that tokenizer, or convert raw text (no --tokenizer)')
  if records.tokenizer_fingerprint(data_config.tokenizer) != \
      info['fingerprint']:
    raise DataError(where + f'{info["path"]}, not config.data.tokenizer='
                    f'{data_config.tokenizer}; convert again with '
                    f'--tokenizer={data_config.tokenizer}')
  if int(data_config.max_length) != int(info['max_length']):
    raise DataError(where + f'max_length {info["max_length"]}, not '
                    f'config.data.max_length={data_config.max_length}; set '
                    'it, or convert again with --max_length')
