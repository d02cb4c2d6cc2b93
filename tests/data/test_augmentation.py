"""config.data.augment: each op, determinism from (seed, batch), exact
resume, the same batches on any process count, training batches only, the
mixed-label loss, and one-line errors."""

import json

import numpy as np
import pytest

from conftest import run_main_in_process
from tuning.config.defaults import base_config
from tuning.data import augmentation
from tuning.data.datasets import build_datasets
from tuning.data.pipeline import TrainStream
from tuning.tasks import classification

TEXTS = [
    'a b c d e f g h',
    'one two three',
    'the film is good and warm',
    'bad',
    'slow but honest work',
    'it never quite works',
    'x y',
    'a fine cast wasted here',
]


def rng(k=0):
  return augmentation.batch_rng(3, k)


def test_parse_reads_ops_in_order_and_rejects_bad_ones():
  assert augmentation.parse('') == ()
  assert augmentation.parse('mask:0.1, ngram:0.25') == (
      ('mask', 0.1),
      ('ngram', 0.25),
  )
  for spec, words in (
      ('blur:0.1', "unknown op 'blur'"),
      ('mask', 'needs a probability'),
      ('mask:1.5', 'needs a probability'),
      ('mixup:0', 'positive Beta'),
      ('mask:0.1,mask:0.2', 'given twice'),
      ('mixup:0.2,cutmix:1', 'not both'),
  ):
    with pytest.raises(ValueError, match=words):
      augmentation.parse(spec)


def test_each_text_op_does_what_it_says():
  words = 'w0 w1 w2 w3 w4 w5 w6 w7 w8 w9'.split()
  vocabulary = augmentation.WordFrequencies.fit(['p q q', 'q'])
  out = augmentation.augment_words(words, [('mask', 0.5)], rng(), None)
  assert len(out) == 10 and 0 < out.count('[UNK]') < 10
  assert all(o in ('[UNK]', w) for o, w in zip(out, words))
  out = augmentation.augment_words(words, [('delete', 0.5)], rng(), None)
  assert 0 < len(out) < 10 and out == [w for w in words if w in out]
  assert augmentation.augment_words(['x'], [('delete', 1.0)], rng(), None) == [
      'x'
  ]  # one word always kept
  out = augmentation.augment_words(words, [('swap', 0.3)], rng(), None)
  assert sorted(out) == sorted(words) and out != words
  out = augmentation.augment_words(words, [('replace', 0.5)], rng(), vocabulary)
  replaced = [o for o, w in zip(out, words) if o != w]
  assert replaced and set(replaced) <= {'p', 'q'}
  out = augmentation.augment_words(words, [('ngram', 1.0)], rng(), None)
  start = words.index(out[0])
  assert 1 <= len(out) <= 5 and out == words[start : start + len(out)]
  assert augmentation.augment_words(words, [('ngram', 0.0)], rng(), None) == (
      words
  )


def test_copies_for_distillation_are_deterministic_and_tang_style():
  ops = augmentation.parse('mask:0.2,ngram:0.5')
  out = augmentation.copies(TEXTS[:2], ops, 3, seed=4)
  assert out == augmentation.copies(TEXTS[:2], ops, 3, seed=4)
  assert out != augmentation.copies(TEXTS[:2], ops, 3, seed=5)
  assert len(out) == 6
  for i, text in enumerate(out):
    source = TEXTS[i % 2].split()
    words = text.split()
    assert any(  # a contiguous n-gram of the source, some words masked
        all(w in ('[UNK]', source[j + k]) for k, w in enumerate(words))
        for j in range(len(source) - len(words) + 1)
    )
  assert any('[UNK]' in t for t in out)
  with pytest.raises(ValueError, match='needs text ops'):
    augmentation.copies(TEXTS, augmentation.parse('mixup:0.2'), 1, seed=0)


def _text_data(tmp_path, augment='mask:0.3,swap:0.2,delete:0.1'):
  path = tmp_path / 'train.tsv'
  rows = [f'{TEXTS[i % 8]} {i}\t{i % 2}' for i in range(64)]
  path.write_text('sentence\tlabel\n' + '\n'.join(rows) + '\n')
  config = base_config()
  config.data.source = 'tsv'
  config.data.path = str(path)
  config.data.text_column = 'sentence'
  config.data.tokenizer = 'whitespace'
  config.data.vocab_size = 200
  config.data.max_length = 16
  config.data.augment = augment
  return config, build_datasets(config.data)


def _batches(stream, n):
  return [next(stream) for _ in range(n)]


def test_text_batches_are_augmented_deterministically_and_resume(tmp_path):
  config, data = _text_data(tmp_path)
  augment = augmentation.for_training(config, 'classification', data)
  make = lambda **kw: TrainStream(  # pylint: disable=unnecessary-lambda-assignment
      data.train, 8, 0, augment=augment, **kw
  )
  plain = _batches(TrainStream(data.train, 8, 0), 4)
  first = _batches(make(), 4)
  again = _batches(make(), 4)
  for a, b, p in zip(first, again, plain):
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
    np.testing.assert_array_equal(a['label'], p['label'])  # same rows
  assert any(
      not np.array_equal(a['input_ids'], p['input_ids'])
      for a, p in zip(first, plain)
  )
  # Each batch its own random numbers: the same rows, augmented anew.
  same = {k: v[np.zeros(8, int)] for k, v in data.train.items()}
  augment_same = lambda batch, indices, r: augment(  # pylint: disable=unnecessary-lambda-assignment
      batch, np.zeros_like(indices), r
  )
  twice = _batches(TrainStream(same, 8, 0, augment=augment_same), 2)
  assert not np.array_equal(twice[0]['input_ids'], twice[1]['input_ids'])
  # Resume: a stream set to the state after two batches continues alike.
  stream = make()
  _batches(stream, 2)
  resumed = make()
  resumed.set_state(stream.get_state())
  for a, b in zip(_batches(resumed, 2), first[2:]):
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
  # Two processes' rows make up the one-process batch.
  halves = [_batches(make(process_index=i, process_count=2), 4) for i in (0, 1)]
  for whole, low, high in zip(first, *halves):
    np.testing.assert_array_equal(
        whole['input_ids'],
        np.concatenate([low['input_ids'], high['input_ids']]),
    )
  # Validation and test tables are never touched.
  again_data = build_datasets(config.data)
  np.testing.assert_array_equal(
      data.validation['input_ids'], again_data.validation['input_ids']
  )


def test_image_ops_and_mixing():
  x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
  batch = {'x': x, 'label': np.array([0, 1], np.int32)}
  flipped = augmentation.augment_images(batch, [('flip', 1.0)], rng())
  np.testing.assert_array_equal(flipped['x'], x[:, :, ::-1])
  for op in ('crop', 'shift'):
    out = augmentation.augment_images(batch, [(op, 1.0)], rng())['x']
    assert out.shape == x.shape and not np.array_equal(out, x)
  shifted = augmentation.augment_images(batch, [('shift', 1.0)], rng())['x']
  # one pixel in one direction: 7 of 8 rows or columns are the original's
  assert any(
      np.array_equal(shifted[0, a:b], x[0, c:d])
      or np.array_equal(shifted[0, :, a:b], x[0, :, c:d])
      for a, b, c, d in ((0, 7, 1, 8), (1, 8, 0, 7))
  )
  labels = np.arange(16, dtype=np.int32) % 4
  many = {'x': np.random.default_rng(0).random((16, 8, 8, 1)), 'label': labels}
  mixed = augmentation.augment_images(many, [('mixup', 0.4)], rng())
  lam = mixed['mix_weight']
  assert lam.shape == (16,) and np.all((lam > 0) & (lam < 1))
  assert sorted(mixed['label_mix'].tolist()) == sorted(labels.tolist())
  cut = augmentation.augment_images(many, [('cutmix', 1.0)], rng())
  kept = (cut['x'] == many['x']).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(kept, cut['mix_weight'], atol=1e-6)
  assert sorted(cut['label_mix'].tolist()) == sorted(labels.tolist())


def test_the_mixed_label_loss_is_the_lam_weighted_cross_entropy():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
  batch = {
      'label': np.array([0, 2]),
      'label_mix': np.array([1, 0]),
      'mix_weight': np.array([0.7, 0.25], np.float32),
  }
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  want = -(0.7 * log_p[0, 0] + 0.3 * log_p[0, 1])
  want += -(0.25 * log_p[1, 2] + 0.75 * log_p[1, 0])
  total, metrics = classification.loss(logits, batch)
  np.testing.assert_allclose(float(total), want, rtol=1e-6)
  assert float(metrics['accuracy']) == 2.0


def test_ops_that_do_not_fit_are_one_line_errors(tmp_path):
  config, data = _text_data(tmp_path, augment='mask:0.1')
  with pytest.raises(ValueError, match='for classification and regression'):
    augmentation.for_training(config, 'causal_lm', data)
  config.data.augment = 'crop:0.5'
  with pytest.raises(ValueError, match='this data is text'):
    augmentation.for_training(config, 'classification', data)
  digits = build_datasets(base_config().data)
  config.data.source = 'digits'
  config.data.augment = 'mask:0.1'
  with pytest.raises(ValueError, match='numeric features'):
    augmentation.for_training(config, 'classification', digits)
  config.data.augment = 'flip:0.5'
  with pytest.raises(ValueError, match='set config.data.image_shape'):
    augmentation.for_training(config, 'classification', digits)
  config.data.augment = 'mixup:0.2'
  with pytest.raises(ValueError, match='config.task="classification"'):
    augmentation.for_training(config, 'regression', digits)


def test_a_cnn_run_trains_on_cropped_flipped_cutmixed_digits(tmp_path):
  workdir = tmp_path / 'run'
  out = run_main_in_process(
      '--config=tests/tiny_config.py:steps=20',
      f'--workdir={workdir}',
      '--config.model.name=cnn',
      '--config.model.channels=(8,)',
      '--config.data.image_shape=(8, 8, 1)',
      '--config.data.augment=crop:0.5,flip:0.5,cutmix:1.0',
  ).stdout
  assert 'augment (training batches only): crop 0.5, flip 0.5, cutmix 1' in out
  results = json.loads((workdir / 'results.json').read_text())
  assert np.isfinite(results['test']['loss'])


class _LengthTeacher:
  """A distillation teacher whose logits are the texts' lengths."""

  def __init__(self, distill_config):
    self.config = distill_config
    self.members = distill_config  # only .workdirs/.steps are read
    self.texts = None

  def logits(self, raw, progress=''):
    del progress
    self.texts = list(raw['text'])
    lengths = np.array([len(t.split()) for t in raw['text']], np.float32)
    return np.stack([lengths, -lengths], axis=1)


def test_distillation_copies_come_from_data_augment(tmp_path):
  from tuning.multirun import distillation  # pylint: disable=g-import-not-at-top

  config, data = _text_data(tmp_path, augment='mask:0.5,ngram:0.5')
  config.distill.augment_copies = 2
  config.distill.teacher = ('/teacher',)
  teacher = _LengthTeacher(config.distill)
  teacher.members = type('M', (), {'workdirs': ['/t'], 'steps': [1]})()
  table, log = distillation.student_training_table(
      config, data, teacher, str(tmp_path)
  )
  n = len(data.train['label'])
  assert len(table['labelled']) == 3 * n and table['labelled'].sum() == n
  assert f'+ {2 * n} teacher-labelled (2 augmented copies)' in log[0]
  want = augmentation.copies(
      data.raw['train']['text'],
      augmentation.parse(config.data.augment),
      2,
      config.seed,
  )
  assert teacher.texts[n:] == want and '[UNK]' in ' '.join(want)
