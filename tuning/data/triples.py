"""Knowledge-graph triples (`config.data.source='triples'`).

Files: `head<TAB>relation<TAB>tail[<TAB>label]` per line (gzip allowed),
with the words of every entity and relation in id files (`id<TAB>words`:
`data.entity_names`, `data.relation_names`, e.g. WN11's entity2text.txt and
relation2text.txt). A label is 1 (true) or 0 / -1 (false); an unlabelled
file's triples are all true (WN11's training file).

What the model reads (`data.triple_input`):
  ids    column `triples`: (head, relation, tail) in one id space, entities
         0..E-1 then relations E..E+R-1 (one embedding table of E+R rows,
         the data's `vocab_size`);
  words  column `triple_words` [n, 3, MAX_WORDS]: each entity as the ids of
         its words (0 pads), each relation as one id of its own, so that
         entities that share words share parameters (the word-vector
         entities of Socher et al. 2013's NTN) and an entity never seen in
         training still has a representation;
  text   column `text` (tokenized): "head words [SEP] relation words [SEP]
         tail words", for a BERT-family classifier (KG-BERT, Yao et al.
         2019).
The raw `triples` of every split stay in the data's `raw` (the relation of
each triple, for the per-relation thresholds).

Training negatives (`data.negatives=k`): the training split holds each true
triple once, labelled 1, and k corruption slots after it, labelled 0. The
training stream fills every slot of every batch afresh with the source
triple's head or tail (one side at random) replaced by a random entity,
redrawn until the triple is not a known true triple (any labelled-true
triple of any split), with random numbers from (seed, batch number) only:
batches are the same on any device count and a resumed run sees exactly the
uninterrupted run's negatives. Each slot's source triple rides along in the
`source_triple` column, which no model reads.
"""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np

from tuning.data.tables import DataError, Table

# The column naming each training row's true triple (not a model input).
SOURCE_COLUMN = 'source_triple'
# The first negatives' random numbers (the stream redraws them per batch).
_SPLIT_TAG = 0x7E1
# Words kept of an entity's name (triple_input='words').
MAX_WORDS = 8


def _open(path: str):
  if path.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8')
  return open(path, encoding='utf-8')


def read_names(path: str) -> dict[str, str]:
  """An id file: `id<TAB>words` per line -> {id: words}, in file order."""
  names = {}
  try:
    f = _open(path)
  except FileNotFoundError:
    raise DataError(
        f'{path}: no such file (set config.data.entity_names and '
        'config.data.relation_names to id<TAB>words files)'
    ) from None
  with f:
    for n, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip():
        continue
      parts = line.split('\t', 1)
      words = parts[1].replace('\t', ' ').strip() if len(parts) == 2 else ''
      if not parts[0] or not words:
        raise DataError(
            f'{path}:{n}: expected an id, a tab and its words: fix the line'
        )
      names[parts[0]] = words
  return names


@dataclasses.dataclass
class Vocab:
  """Entity and relation ids (one id space: entities, then relations)."""

  entities: list[str]
  relations: list[str]
  entity_text: dict[str, str]
  relation_text: dict[str, str]

  def __post_init__(self):
    self.entity_index = {e: i for i, e in enumerate(self.entities)}
    e = len(self.entities)
    self.relation_index = {r: e + i for i, r in enumerate(self.relations)}

  @property
  def size(self) -> int:
    return len(self.entities) + len(self.relations)

  @property
  def num_words(self) -> int:
    """Word ids of triple_input='words': 0 pads, then the relations' own
    ids, then the words of the entities' names."""
    return int(self.word_ids.max()) + 1

  @property
  def word_ids(self) -> np.ndarray:
    """[E + R, MAX_WORDS] int32: each id's word ids (0 pads)."""
    if getattr(self, '_word_ids', None) is None:
      words = {}
      e = len(self.entities)
      table = np.zeros((self.size, MAX_WORDS), np.int32)
      for i in range(len(self.relations)):
        table[e + i, 0] = 1 + i
      for i, entity in enumerate(self.entities):
        names = self.entity_text[entity].split()[:MAX_WORDS]
        for j, w in enumerate(names):
          table[i, j] = words.setdefault(
              w, 1 + len(self.relations) + len(words)
          )
      self._word_ids = table
    return self._word_ids

  @classmethod
  def from_files(cls, entity_path: str, relation_path: str) -> Vocab:
    ents = read_names(entity_path)
    rels = read_names(relation_path)
    return cls(list(ents), list(rels), ents, rels)

  def words(self, i: int) -> str:
    e = len(self.entities)
    if i < e:
      return self.entity_text[self.entities[i]]
    return self.relation_text[self.relations[i - e]]


def read_triples(path: str, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
  """(triples [n, 3] int32 in the vocab's id space, labels [n] 1/0).

  A line with the wrong number of fields, an unknown entity or relation, or
  a bad label is an error naming the file and line.
  """
  triples, labels = [], []
  try:
    f = _open(path)
  except FileNotFoundError:
    raise DataError(f'{path}: no such file (check config.data.*path)') from None
  with f:
    for n, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip():
        continue
      parts = line.split('\t')
      if len(parts) not in (3, 4):
        raise DataError(
            f'{path}:{n}: expected head<TAB>relation<TAB>tail[<TAB>label], '
            f'got {len(parts)} field(s): fix the line'
        )
      h, r, t = parts[:3]
      for kind, value, index in (
          ('entity', h, vocab.entity_index),
          ('relation', r, vocab.relation_index),
          ('entity', t, vocab.entity_index),
      ):
        if value not in index:
          raise DataError(
              f'{path}:{n}: unknown {kind} {value!r}: add it to the '
              f'{kind} names file or drop the line'
          )
      label = 1
      if len(parts) == 4:
        if parts[3].strip() not in ('1', '-1', '0'):
          raise DataError(
              f'{path}:{n}: label {parts[3]!r} is not 1, 0 or -1: fix the line'
          )
        label = 1 if parts[3].strip() == '1' else 0
      triples.append(
          (
              vocab.entity_index[h],
              vocab.relation_index[r],
              vocab.entity_index[t],
          )
      )
      labels.append(label)
  if not triples:
    raise DataError(f'{path}: no triples')
  return (
      np.asarray(triples, np.int32).reshape(-1, 3),
      np.asarray(labels, np.int32),
  )


def triple_texts(triples: np.ndarray, vocab: Vocab) -> np.ndarray:
  """'head words [SEP] relation words [SEP] tail words' per triple."""
  return np.asarray(
      [
          ' [SEP] '.join(vocab.words(int(i)) for i in row)
          for row in np.asarray(triples).tolist()
      ],
      dtype=object,
  )


def model_columns(triples: np.ndarray, vocab: Vocab, kind: str) -> Table:
  """The model's input columns for triples, by `data.triple_input`."""
  if kind == 'ids':
    return {'triples': np.asarray(triples, np.int32)}
  if kind == 'words':
    return {'triple_words': vocab.word_ids[np.asarray(triples)]}
  if kind == 'text':
    return {'text': triple_texts(triples, vocab)}
  raise DataError(f'config.data.triple_input={kind!r}: use ids, words or text')


def corrupt(
    sources: np.ndarray,
    num_entities: int,
    known: set,
    rng: np.random.Generator,
) -> np.ndarray:
  """Each source triple with its head or tail (at random) replaced by a
  random entity, redrawn until the result is not in `known`."""
  out = np.array(sources, np.int32, copy=True)
  for j in range(len(out)):
    side = 0 if rng.random() < 0.5 else 2
    for _ in range(1000):
      cand = out[j].copy()
      cand[side] = rng.integers(num_entities)
      if tuple(cand.tolist()) not in known:
        break
    else:
      raise DataError(
          f'triple {out[j].tolist()}: no corruption of its '
          f'{"head" if side == 0 else "tail"} in 1000 draws is unknown '
          '(too few entities for config.data.negatives)'
      )
    out[j] = cand
  return out


@dataclasses.dataclass
class TripleSplits:
  """What reading a triple source gives: tables, the vocab, the known set."""

  tables: dict[str, Table]
  vocab: Vocab
  known: set
  log: list[str]


def read_splits(data_config) -> TripleSplits:
  """The train/validation/test tables of a triple source."""
  for key in ('path', 'entity_names', 'relation_names'):
    if not data_config.get(key):
      raise DataError(
          f"config.data.{key} is required for source 'triples' (train "
          'triples, and id<TAB>words files of entities and relations)'
      )
  if not data_config.validation_path:
    raise DataError(
        "source 'triples' needs config.data.validation_path: labelled "
        'triples (true and false) to evaluate on'
    )
  vocab = Vocab.from_files(data_config.entity_names, data_config.relation_names)
  read = {
      name: read_triples(path, vocab)
      for name, path in (
          ('train', data_config.path),
          ('validation', data_config.validation_path),
          ('test', data_config.test_path),
      )
      if path
  }
  known = set()
  for triples, labels in read.values():
    known.update(map(tuple, triples[labels == 1].tolist()))
  k = int(data_config.negatives)
  triples, labels = read['train']
  log = [
      f'triples: {len(vocab.entities)} entities, {len(vocab.relations)} '
      f'relations, {len(known)} known true triples'
  ]
  if (labels == 0).any() and k:
    raise DataError(
        f'{data_config.path} has false triples and config.data.negatives='
        f'{k}: use one (negatives=0 with labelled training triples)'
    )
  if not (labels == 0).any() and not k:
    raise DataError(
        f'{data_config.path} holds only true triples: set '
        'config.data.negatives to the corruptions per true triple (e.g. 1)'
    )
  # The order is unique true triples, in file order.
  _, first = np.unique(triples, axis=0, return_index=True)
  first = np.sort(first)
  if len(first) < len(triples):
    log.append(f'train: dropped {len(triples) - len(first)} repeated triples')
  triples, labels = triples[first], labels[first]
  tables = {}
  if k:
    slots = np.repeat(triples, k, axis=0)
    rng = np.random.default_rng([int(data_config.get('seed', 0)), _SPLIT_TAG])
    negatives = corrupt(slots, len(vocab.entities), known, rng)
    # Positive i, then its k slots: rows (1 + k) * i ... (1 + k) * i + k.
    order = np.concatenate([triples[:, None], slots.reshape(-1, k, 3)], 1)
    train = np.concatenate([triples[:, None], negatives.reshape(-1, k, 3)], 1)
    tables['train'] = {
        'triples': train.reshape(-1, 3),
        SOURCE_COLUMN: order.reshape(-1, 3),
        'label': np.tile(np.asarray(['1'] + ['0'] * k, object), len(triples)),
    }
    log.append(
        f'train: {len(triples)} true triples, {k} corruption(s) each, '
        'redrawn in every batch'
    )
  else:
    tables['train'] = {
        'triples': triples,
        'label': np.asarray([str(v) for v in labels], object),
    }
  for name in ('validation', 'test'):
    if name in read:
      t, y = read[name]
      tables[name] = {
          'triples': t,
          'label': np.asarray([str(v) for v in y], object),
      }
  return TripleSplits(tables, vocab, known, log)


def negatives_hook(splits: TripleSplits, kind: str, encode=None):
  """The training stream's `(batch, rng) -> batch`: every corruption slot
  (class 0) filled afresh from its `source_triple`, and its model columns
  (`data.triple_input` `kind`) made again; text through `encode`."""
  num_entities = len(splits.vocab.entities)
  known = splits.known

  def fill(batch: Table, rng: np.random.Generator) -> Table:
    source = batch[SOURCE_COLUMN]
    slot = batch['label'] == 0  # class 0 is '0' (false); see datasets
    triples = np.array(source, copy=True)
    triples[slot] = corrupt(source[slot], num_entities, known, rng)
    columns = model_columns(triples, splits.vocab, kind)
    if encode is not None:
      columns = encode(columns)
    return {**batch, **columns}

  return fill
