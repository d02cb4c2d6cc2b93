"""Data augmentation of training batches: `config.data.augment`.

A comma-separated list of `op:value`, applied in the order written to each
global training batch as the stream builds it (tuning/data/pipeline.py),
never to validation or test batches. Text ops work on the words (spaces
split them) of the raw training texts, which are then tokenized again, so
they mean the same under any tokenizer (Tang et al. 2019's rules for
distillation transfer sets, and EDA's deletion and swap):

  mask:p     each word becomes `[UNK]` with probability p
  delete:p   each word is dropped with probability p (one is always kept)
  swap:p     round(p * words) random pairs of words swap places (a
             fractional remainder is one more swap with that probability)
  replace:p  each word becomes a word drawn from the training texts'
             word frequencies with probability p
  ngram:p    with probability p only a random 1-5-word n-gram is kept

Image ops work on the `cnn` family's `[H, W, C]` images (`data.image_shape`
set; mixup also on any numeric features):

  crop:p     with probability p: padded by max(1, H // 8) pixels (the
             image's lowest value) and cropped back at a random offset
  flip:p     with probability p: mirrored left to right
  shift:p    with probability p: moved one pixel up, down, left or right
             (edge pixels repeated)
  mixup:a    every example mixed with another of the batch, lam ~ Beta(a, a)
             (Zhang et al. 2018)
  cutmix:a   a box of area 1 - lam (lam ~ Beta(a, a)) pasted from another
             example, lam the area kept (Yun et al. 2019)

mixup and cutmix add the columns `label_mix` (the other example's class)
and `mix_weight` (lam); the classification loss is then
lam * CE(label) + (1 - lam) * CE(label_mix).

The random numbers of global batch k come from `(seed, k)` alone, so the
batches are the same on any number of devices or processes and a resumed
run (whose stream restarts at its saved position) sees exactly the batches
of an uninterrupted one. Under distillation the same ops make the
teacher-labelled copies of `distill.augment_copies` instead
(tuning/multirun/distillation.py).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import numpy as np

from tuning.data.tables import DataError, Table

TEXT_OPS = ('mask', 'delete', 'swap', 'replace', 'ngram')
IMAGE_OPS = ('crop', 'flip', 'shift')
MIX_OPS = ('mixup', 'cutmix')
OPS = TEXT_OPS + IMAGE_OPS + MIX_OPS
MASK_WORD = '[UNK]'
# Columns a mixing op adds to a batch (not model inputs).
MIX_COLUMNS = ('label_mix', 'mix_weight')
_STREAM_TAG = 0xA06  # separates these random numbers from other uses


def parse(spec: str) -> tuple[tuple[str, float], ...]:
  """(op, value) pairs of a `data.augment` string ('' -> none)."""
  ops = []
  for part in (spec or '').split(','):
    part = part.strip()
    if not part:
      continue
    name, sep, value = part.partition(':')
    name = name.strip()
    if name not in OPS:
      raise ValueError(
          f'config.data.augment: unknown op {name!r}; use op:value with ops '
          f'{", ".join(OPS)} (e.g. "mask:0.1,ngram:0.25")'
      )
    try:
      number = float(value) if sep else float('nan')
    except ValueError:
      number = float('nan')
    if name in MIX_OPS:
      good = number > 0
      want = 'a positive Beta parameter, e.g. mixup:0.2'
    else:
      good = 0 <= number <= 1
      want = f'a probability in [0, 1], e.g. {name}:0.1'
    if not good:
      raise ValueError(f'config.data.augment: {part!r} needs {want}')
    if name in (op for op, _ in ops):
      raise ValueError(f'config.data.augment: {name!r} is given twice')
    ops.append((name, number))
  if sum(op in MIX_OPS for op, _ in ops) > 1:
    raise ValueError(
        'config.data.augment: use one of mixup and cutmix, not both'
    )
  return tuple(ops)


def batch_rng(seed: int, k: int) -> np.random.Generator:
  """The random numbers of global training batch `k`."""
  return np.random.default_rng([int(seed), _STREAM_TAG, int(k)])


# ----------------------------------------------------------------- text


@dataclasses.dataclass
class WordFrequencies:
  """The training texts' words and their frequencies (for `replace`)."""

  words: np.ndarray
  cumulative: np.ndarray

  @classmethod
  def fit(cls, texts) -> 'WordFrequencies':
    counts = collections.Counter(w for t in texts for w in str(t).split())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    freq = np.array([counts[w] for w in words] or [1], np.float64)
    return cls(
        np.array(words or [MASK_WORD], dtype=object),
        np.cumsum(freq) / freq.sum(),
    )

  def draw(self, rng: np.random.Generator) -> str:
    return str(self.words[np.searchsorted(self.cumulative, rng.random())])


def augment_words(
    words: list[str],
    ops,
    rng: np.random.Generator,
    vocabulary: WordFrequencies | None,
) -> list[str]:
  """One text's words through the text ops, in order."""
  for op, p in ops:
    if op == 'mask':
      words = [MASK_WORD if rng.random() < p else w for w in words]
    elif op == 'delete':
      kept = [w for w in words if rng.random() >= p]
      words = kept or words[int(rng.integers(len(words))) :][:1]
    elif op == 'swap' and len(words) > 1:
      swaps = p * len(words)
      count = int(swaps) + int(rng.random() < swaps - int(swaps))
      words = list(words)
      for _ in range(count):
        i, j = rng.integers(len(words), size=2)
        words[i], words[j] = words[j], words[i]
    elif op == 'replace':
      words = [vocabulary.draw(rng) if rng.random() < p else w for w in words]
    elif op == 'ngram' and len(words) > 1 and rng.random() < p:
      n = int(rng.integers(1, min(5, len(words)) + 1))
      start = int(rng.integers(0, len(words) - n + 1))
      words = words[start : start + n]
  return words


def augment_texts(
    texts, ops, rng: np.random.Generator, vocabulary: WordFrequencies | None
) -> list[str]:
  """Each text through the text ops (an empty text stays as it is)."""
  out = []
  for text in texts:
    words = str(text).split()
    out.append(
        ' '.join(augment_words(words, ops, rng, vocabulary)) if words else text
    )
  return out


# ---------------------------------------------------------------- images


def _crop(image, rng):
  h, w = image.shape[:2]
  pad = max(1, h // 8)
  padded = np.pad(
      image,
      ((pad, pad), (pad, pad), (0, 0)),
      constant_values=image.min(),
  )
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  return padded[top : top + h, left : left + w]


def _shift(image, rng):
  h, w = image.shape[:2]
  axis, direction = int(rng.integers(2)), int(rng.choice([-1, 1]))
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode='edge')
  top = 1 + (direction if axis == 0 else 0)
  left = 1 + (direction if axis == 1 else 0)
  return padded[top : top + h, left : left + w]


def _cutmix_box(h, w, lam, rng):
  cut = np.sqrt(1.0 - lam)
  ch, cw = int(round(h * cut)), int(round(w * cut))
  cy, cx = rng.integers(h), rng.integers(w)
  top, bottom = np.clip([cy - ch // 2, cy - ch // 2 + ch], 0, h)
  left, right = np.clip([cx - cw // 2, cx - cw // 2 + cw], 0, w)
  return top, bottom, left, right


def augment_images(batch: Table, ops, rng: np.random.Generator) -> Table:
  """The image and mixing ops on a batch's 'x' (and its labels)."""
  batch = dict(batch)
  x = np.array(batch['x'], copy=True)
  for op, value in ops:
    if op in IMAGE_OPS:
      step = {'crop': _crop, 'flip': lambda im, _: im[:, ::-1], 'shift': _shift}
      for i in range(len(x)):
        if rng.random() < value:
          x[i] = step[op](x[i], rng)
    elif op in MIX_OPS:
      partner = rng.permutation(len(x))
      lam = rng.beta(value, value, size=len(x)).astype(np.float32)
      if op == 'mixup':
        shape = (-1,) + (1,) * (x.ndim - 1)
        x = lam.reshape(shape) * x + (1 - lam.reshape(shape)) * x[partner]
      else:
        mixed = x.copy()
        h, w = x.shape[1:3]
        for i in range(len(x)):
          top, bottom, left, right = _cutmix_box(h, w, lam[i], rng)
          mixed[i, top:bottom, left:right] = x[
              partner[i], top:bottom, left:right
          ]
          lam[i] = 1.0 - (bottom - top) * (right - left) / (h * w)
        x = mixed
      batch['label_mix'] = np.asarray(batch['label'])[partner]
      batch['mix_weight'] = lam
  batch['x'] = x.astype(batch['x'].dtype)
  return batch


# -------------------------------------------------------------- the seam


def for_training(
    config, task_name: str, data
) -> Callable[[Table, np.ndarray, np.random.Generator], Table] | None:
  """The function the training stream applies to each global batch
  (`batch, row indices into the training table, rng -> batch`), or None
  where `config.data.augment` is empty and the data makes no negatives
  (source 'triples'; their slots are filled first); a one-line error where
  its ops do not fit the task or data."""
  ops = parse(config.data.augment)
  corrupt = getattr(data, 'corrupt', None)  # triples' negatives
  if not ops:
    if corrupt is None:
      return None
    return lambda batch, indices, rng: corrupt(batch, rng)
  names = ', '.join(op for op, _ in ops)
  if task_name not in ('classification', 'regression'):
    raise ValueError(
        f'config.data.augment ({names}) is for classification and '
        f'regression; config.task={task_name!r} trains on token sequences '
        '(set config.data.augment="")'
    )
  text_ops = tuple((o, v) for o, v in ops if o in TEXT_OPS)
  other_ops = tuple((o, v) for o, v in ops if o not in TEXT_OPS)
  raw = (data.raw or {}).get('train', {})
  if text_ops and ('text' not in raw or data.encode is None):
    raise ValueError(
        f'config.data.augment: text ops ({names}) need raw training text in '
        f'memory; config.data.source={config.data.source!r} gives '
        + (
            'numeric features (use crop, flip, shift, mixup or cutmix)'
            if 'x' in raw
            else 'streamed records (use the files they were converted from)'
        )
    )
  if other_ops:
    first = data.first_train_example()
    if 'x' not in first:
      raise ValueError(
          f'config.data.augment: image ops ({names}) need image features; '
          'this data is text (use mask, delete, swap, replace or ngram)'
      )
    spatial = [o for o, _ in other_ops if o != 'mixup']
    if spatial and np.ndim(first['x']) != 4:
      raise ValueError(
          f'config.data.augment: {", ".join(spatial)} need images [H, W, C]: '
          'set '
          'config.data.image_shape (only mixup works on flat features)'
      )
    if any(o in MIX_OPS for o, _ in other_ops) and task_name != (
        'classification'
    ):
      raise ValueError(
          'config.data.augment: mixup and cutmix mix class labels; use them '
          'with config.task="classification"'
      )
  vocabulary = (
      WordFrequencies.fit(raw['text'])
      if any(o == 'replace' for o, _ in text_ops)
      else None
  )

  def augment(batch: Table, indices: np.ndarray, rng) -> Table:
    if corrupt is not None:
      batch = corrupt(batch, rng)
    if text_ops:
      texts = {
          k: augment_texts(raw[k][indices], text_ops, rng, vocabulary)
          for k in ('text', 'text_pair')
          if k in raw
      }
      batch = {**batch, **data.encode(texts)}
    if other_ops:
      batch = augment_images(batch, other_ops, rng)
    return batch

  return augment


def describe(spec: str) -> str:
  """The log line of a run's augmentation."""
  ops = parse(spec)
  return 'augment (training batches only): ' + ', '.join(
      f'{op} {value:g}' for op, value in ops
  )


def copies(
    texts, ops, count: int, seed: int, vocabulary: Any = None
) -> list[str]:
  """`count` augmented copies of `texts` (copy by copy), from the seed:
  distillation's teacher-labelled transfer set (Tang et al.'s x20)."""
  text_ops = tuple((o, v) for o, v in ops if o in TEXT_OPS)
  if not text_ops:
    raise ValueError(
        'config.distill.augment_copies needs text ops in config.data.augment '
        '(e.g. "mask:0.1,ngram:0.25", Tang et al.\'s)'
    )
  vocabulary = vocabulary or (
      WordFrequencies.fit(texts)
      if any(o == 'replace' for o, _ in text_ops)
      else None
  )
  out = []
  for c in range(count):
    out.extend(
        augment_texts(
            texts,
            text_ops,
            np.random.default_rng([int(seed), _STREAM_TAG + 1, c]),
            vocabulary,
        )
    )
  return out
