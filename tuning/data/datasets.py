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
  """Model-ready splits: each a dict of numpy arrays with a 'label' column."""
  train: Table
  validation: Table
  test: Table
  num_classes: int
  class_names: list[str]
  log: list[str]  # what preprocessing did, one line each
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
    return {k: v[:1] for k, v in self.train.items()}

  def vocab_size(self, data_config) -> int | None:
    """Token-id range the embedding must cover (None: not text)."""
    if 'input_ids' not in self.train:
      return None
    if data_config.tokenizer == 'whitespace':
      return data_config.vocab_size
    return max(int(t['input_ids'].max()) for t in
               (self.train, self.validation, self.test)) + 1


def build_datasets(data_config) -> Datasets:
  """Builds the three splits described by `config.data`."""
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
  limit = data_config.max_validation_examples
  if limit and limit < len(tables['validation']['label']):
    keep = np.sort(np.random.default_rng(_SPLIT_SEED + 2).permutation(
        len(tables['validation']['label']))[:limit])
    log.append(f'validation: kept {limit} of '
               f'{len(tables["validation"]["label"])} examples')
    tables['validation'] = preprocessing.take(tables['validation'], keep)

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
                  encoder.num_classes, encoder.classes, log, raw, encode)


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
