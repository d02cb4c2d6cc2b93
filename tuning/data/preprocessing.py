"""Preprocessing fitted on the training split and applied to every split.

Cleaning (missing values, unparseable labels, duplicates), label encoding,
per-feature normalization, PCA, and text tokenization. Each `fit_*`
function looks only at the training table; the returned object transforms
any table the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

from tuning.data.tables import DataError, Table, is_missing, num_rows, take

_missing = is_missing  # the name older code imports


def clean(table: Table, drop_duplicates: bool) -> tuple[Table, dict[str, int]]:
  """Drops rows with missing values or labels, and exact duplicates.

  For the training split only: validation and test rows are used as given.
  """
  n = num_rows(table)
  keep = np.ones(n, dtype=bool)
  counts = {}
  if 'label' in table:
    keep = np.array([not is_missing(v) for v in table['label']], dtype=bool)
    counts['missing label'] = int(n - keep.sum())
  if 'x' in table:
    finite = np.isfinite(table['x']).reshape(n, -1).all(axis=1)
    counts['missing/NaN feature'] = int((keep & ~finite).sum())
    keep &= finite
  for c in ('text', 'text_pair'):
    if c in table:
      has = np.array([not is_missing(v) for v in table[c]], dtype=bool)
      counts[f'missing {c}'] = int((keep & ~has).sum())
      keep &= has
  if drop_duplicates:
    seen = set()
    dup = 0
    for i in np.flatnonzero(keep):
      key = tuple(
          str(table[c][i])
          if table[c].dtype == object
          else table[c][i].tobytes()
          for c in sorted(table)
          if c != 'where'  # a row's file:line (instruction data)
      )
      if key in seen:
        keep[i] = False
        dup += 1
      else:
        seen.add(key)
    counts['exact duplicate'] = dup
  return take(table, np.flatnonzero(keep)), {
      k: v for k, v in counts.items() if v
  }


@dataclasses.dataclass
class LabelEncoder:
  """Maps raw labels (numbers or names) to 0..num_classes-1.

  `classes` names the task: each entry is a raw label, or a tuple of raw
  labels merged into one class (e.g. ((0, 2, 4, 6, 8), (1, 3, 5, 7, 9)) for
  even/odd digits). Rows with other labels are dropped (and counted).
  """

  classes: list[str]  # a readable name of each class index
  index: dict[str, int]  # raw label (as text) -> class index

  @classmethod
  def fit(
      cls, train_labels: np.ndarray, classes=None, class_names=None
  ) -> LabelEncoder:
    if classes:
      index, names = {}, []
      for i, entry in enumerate(classes):
        members = entry if isinstance(entry, (tuple, list)) else (entry,)
        for m in members:
          if label_key(m) in index:
            raise DataError(
                f'label {m!r} appears twice in ' 'config.data.classes'
            )
          index[label_key(m)] = i
        names.append('+'.join(label_key(m) for m in members))
    else:
      names = sorted(
          {label_key(v) for v in train_labels},
          key=lambda k: (not _is_int(k), int(k) if _is_int(k) else 0, k),
      )
      if names and all(_is_int(k) and int(k) >= 0 for k in names):
        # Integer labels keep their meaning: class i is label i.
        names = [str(i) for i in range(max(int(k) for k in names) + 1)]
      index = {k: i for i, k in enumerate(names)}
    if class_names:
      if len(class_names) != len(names):
        raise DataError(
            f'config.data.class_names has {len(class_names)} '
            f'names for {len(names)} classes'
        )
      names = [str(n) for n in class_names]
    return cls(names, index)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def ids(self, labels) -> np.ndarray:
    """The class index of each raw label (-1: not a class)."""
    return np.fromiter(
        (self.index.get(label_key(v), -1) for v in labels),
        np.int32,
        len(labels),
    )

  def transform(self, table: Table) -> tuple[Table, int]:
    """Encodes labels; rows whose label is not a class are dropped."""
    ids = self.ids(table['label'])
    keep = np.flatnonzero(ids >= 0)
    out = take(table, keep)
    out['label'] = ids[keep]
    return out, int(len(ids) - len(keep))


def label_key(value) -> str:
  """A raw label as text (1, 1.0, '1' and b'1' are one label)."""
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    value = int(value)
  if isinstance(value, bytes):
    value = value.decode('utf-8')
  text = str(value).strip()
  if re.fullmatch(r'[+-]?\d+\.0*', text):
    text = text.split('.')[0]
  return text


_label_key = label_key  # the name older code imports


def _is_int(text: str) -> bool:
  return re.fullmatch(r'[+-]?\d+', text) is not None


@dataclasses.dataclass
class FeatureTransform:
  """Normalization ('standard' or 'minmax') then optional PCA."""

  shift: np.ndarray | None = None
  scale: np.ndarray | None = None
  components: np.ndarray | None = None  # [D, k]
  pca_mean: np.ndarray | None = None

  @classmethod
  def fit(cls, x: np.ndarray, normalize=None, pca_components=None):
    x = x.reshape(len(x), -1)
    t = cls()
    if str(normalize).lower() in ('none', ''):
      normalize = None  # as given on a command line
    if normalize == 'standard':
      t.shift = x.mean(axis=0)
      std = x.std(axis=0)
      t.scale = np.where(std > 0, std, 1.0)  # constant features stay 0
    elif normalize == 'minmax':
      t.shift = x.min(axis=0)
      span = x.max(axis=0) - t.shift
      t.scale = np.where(span > 0, span, 1.0)
    elif normalize:
      raise DataError(
          f'unknown config.data.normalize {normalize!r}: use '
          "'standard' or 'minmax'"
      )
    if pca_components:
      z = t._normalize(x)
      if not 0 < pca_components <= min(z.shape):
        raise DataError(
            f'config.data.pca_components={pca_components} must be'
            f' between 1 and {min(z.shape)} for this data'
        )
      t.pca_mean = z.mean(axis=0)
      _, _, vt = np.linalg.svd(z - t.pca_mean, full_matrices=False)
      # Fix each component's sign so that results do not depend on LAPACK.
      signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
      t.components = (vt * signs[:, None])[:pca_components].T
    return t

  def _normalize(self, x):
    return x if self.shift is None else (x - self.shift) / self.scale

  def transform(self, x: np.ndarray) -> np.ndarray:
    flat = self._normalize(x.reshape(len(x), -1))
    if self.components is not None:
      return ((flat - self.pca_mean) @ self.components).astype(np.float32)
    return flat.reshape(x.shape).astype(np.float32)


# Words and punctuation marks of lower-cased text; `[unk]` (the mask word
# of tuning/data/augmentation.py) is one token, the unknown word.
_TOKEN = re.compile(r'\[unk\]|\w+|[^\w\s]')


@dataclasses.dataclass
class WhitespaceVocabulary:
  """Words by frequency on the training split; 0 is padding, 1 unknown."""

  words: list[str]
  max_length: int

  @classmethod
  def fit(cls, texts, vocab_size: int, max_length: int):
    counts = collections.Counter(
        w for t in texts for w in _TOKEN.findall(t.lower())
    )
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return cls(
        ['[PAD]', '[UNK]'] + [w for w, _ in top[: vocab_size - 2]], max_length
    )

  def encode(self, texts) -> dict[str, np.ndarray]:
    index = {w: i for i, w in enumerate(self.words)}
    ids = np.zeros((len(texts), self.max_length), np.int32)
    for row, text in enumerate(texts):
      tokens = [index.get(w, 1) for w in _TOKEN.findall(text.lower())]
      tokens = tokens[: self.max_length] or [1]
      ids[row, : len(tokens)] = tokens
    return {'input_ids': ids, 'attention_mask': (ids > 0).astype(np.int32)}


@dataclasses.dataclass
class PretrainedTokenizer:
  """A Hugging Face tokenizer (tokenizer.json or vocab.txt).

  `append_eos` (for language modelling) ends each document that fits in
  `max_length` with the end-of-text token its model folder names
  (tokenizer_config.json's `eos_token` or config.json's `eos_token_id`;
  none named: nothing is added); a document cut at `max_length` gets none.
  """

  path: str
  max_length: int
  append_eos: bool = False

  def __post_init__(self):
    from tuning.data import tokenization  # pylint: disable=g-import-not-at-top

    self._tokenization = tokenization
    self._tokenizer = tokenization.load_tokenizer(self.path)
    self.eos_id = (
        tokenization.eos_token_id(self.path, self._tokenizer)
        if self.append_eos
        else None
    )

  def encode(self, texts, texts_pair=None) -> dict[str, np.ndarray]:
    enc = self._tokenization.encode_texts(
        self._tokenizer,
        list(texts),
        None if texts_pair is None else list(texts_pair),
        max_length=self.max_length,
    )
    if self.eos_id is not None:
      enc = {k: list(v) for k, v in enc.items()}
      for i, ids in enumerate(enc['input_ids']):
        if len(ids) < self.max_length and (
            not len(ids) or ids[-1] != self.eos_id
        ):
          enc['input_ids'][i] = np.append(ids, self.eos_id).astype(np.int32)
          types = enc['token_type_ids'][i]
          enc['token_type_ids'][i] = np.append(
              types, types[-1] if len(types) else 0
          ).astype(np.int32)
    # Padded to max_length here; batches are cut to their length bucket.
    padded = self._tokenization.pad_batch(
        enc,
        buckets=(self.max_length,),
        pad_id=self._tokenization.pad_token_id(self._tokenizer),
    )
    return {k: np.asarray(v, np.int32) for k, v in padded.items()}


def pack(table: Table, max_length: int) -> Table:
  """Places whole documents, in order, into rows of `max_length` tokens.

  `table`: right-padded `input_ids` and `attention_mask` [N, L <=
  max_length], and optionally `loss_mask` (1 on the tokens the loss
  predicts; default: the attention mask). A document goes into the current
  row if it fits there, else it starts the next row (next fit: documents
  are never split, so a row may end in padding). Returns `input_ids`,
  `attention_mask`, `loss_mask`, `segment_ids` (1..n for the documents of
  a row, 0 on padding) and `positions` (0 at each document's first token):
  with them the decoder attends within each document only, and each
  document's first token is no target (`loss_mask` 0), so the last token
  of one document never learns to predict the next document.
  """
  ids = np.asarray(table['input_ids'])
  mask = np.asarray(table['attention_mask']) > 0
  loss = np.asarray(table.get('loss_mask', mask)) > 0
  if ids.shape[1] > max_length:
    raise DataError(
        f'documents of {ids.shape[1]} tokens do not fit rows of '
        f'max_length={max_length}'
    )
  lengths = mask.sum(axis=1)
  row_of = np.zeros(len(ids), np.int64)  # each document's row and offset
  start_of = np.zeros(len(ids), np.int64)
  row, used = 0, 0
  for d, n in enumerate(lengths):
    if used + n > max_length:
      row, used = row + 1, 0
    row_of[d], start_of[d] = row, used
    used += n
  rows = row + 1 if len(ids) else 1
  out = {
      k: np.zeros((rows, max_length), np.int32)
      for k in (
          'input_ids',
          'attention_mask',
          'loss_mask',
          'segment_ids',
          'positions',
      )
  }
  segment = 0
  for d, n in enumerate(lengths):
    r, s = row_of[d], start_of[d]
    segment = 1 if s == 0 else segment + 1
    span = slice(s, s + n)
    out['input_ids'][r, span] = ids[d][mask[d]]
    out['attention_mask'][r, span] = 1
    out['loss_mask'][r, span] = loss[d][mask[d]]
    out['loss_mask'][r, s] = 0  # a document's first token is no target
    out['segment_ids'][r, span] = segment
    out['positions'][r, span] = np.arange(n)
  return out
