"""The seq2seq task: parallel data, the tokenizer trained in the work
directory, the label-smoothed token-weighted loss, the rsqrt schedule, and
a tiny Transformer that learns to copy (validation BLEU, best checkpoint by
BLEU, translations written in order, exact resume)."""

import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (
    enable_compilation_cache,
    final_params,
    flat,
    preempted_then_resumed,
    read_json,
)
from tuning.modes import experiment
from tuning.data import parallel
from tuning.data import records
from tuning.data.pipeline import TrainStream, trim_to_bucket
from tuning.data.tables import DataError
from tuning.config.defaults import base_config
from tuning.methods.optimizers import rsqrt_schedule
from tuning.tasks import seq2seq

WORDS = 'anna bert carl dora emil fritz gert hans ida jan'.split()


def write_lines(path, lines):
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wt', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))
  return str(path)


def copy_pairs(n, seed, low=2, high=6):
  rng = np.random.default_rng(seed)
  sources = [
      ' '.join(rng.choice(WORDS, rng.integers(low, high + 1))) for _ in range(n)
  ]
  return sources, list(sources)


@pytest.fixture(name='copy_files', scope='module')
def fixture_copy_files(tmp_path_factory):
  """A copy task: train.{src,tgt}.gz (600 pairs), valid.{src,tgt} (40)."""
  folder = tmp_path_factory.mktemp('copy')
  for split, n, seed in (('train', 600, 0), ('valid', 40, 1)):
    src, tgt = copy_pairs(n, seed)
    ext = '.gz' if split == 'train' else ''
    write_lines(folder / f'{split}.src{ext}', src)
    write_lines(folder / f'{split}.tgt{ext}', tgt)
  return str(folder)


def copy_config(folder, **overrides):
  c = base_config()
  c.task = 'seq2seq'
  c.data.source = 'parallel'
  c.data.path = os.path.join(folder, 'train.{lang}.gz')
  c.data.validation_path = os.path.join(folder, 'valid.{lang}')
  c.data.source_lang, c.data.target_lang = 'src', 'tgt'
  c.data.tokenizer = 'train'
  c.data.vocab_size = 40
  c.data.max_length = 16
  c.data.length_buckets = (8,)
  c.model.name = 'encoder_decoder'
  c.model.layers = 1
  c.model.width = 32
  c.model.heads = 2
  c.model.ffn_width = 64
  c.model.max_positions = 32
  c.model.dropout = 0.0
  c.optimizer.learning_rate = 5e-3
  c.optimizer.schedule = 'rsqrt'
  c.optimizer.warmup_steps = 40
  c.optimizer.weight_decay = 0.0
  c.training.batch_size = 32
  c.training.eval_batch_size = 40
  c.training.label_smoothing = 0.1
  c.training.total_steps = 400
  c.training.eval_every_steps = 100
  c.training.log_every_steps = 100
  c.decode.max_length_ratio = 1.0
  c.decode.max_length_offset = 3
  c.decode.batch_size = 16
  for key, value in overrides.items():
    node = c
    *parents, last = key.split('.')
    for p in parents:
      node = node[p]
    node[last] = value
  return c


# ------------------------------------------------------------ the loss


def test_label_smoothed_loss_equals_a_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = np.array([[1, 4, 0], [2, 2, 3]], np.int32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.int32)
  eps = 0.1
  smoothed, nll, correct = seq2seq.token_losses(
      jnp.asarray(logits), targets, mask, eps
  )
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  q = np.full((2, 3, 5), eps / 5) + (1 - eps) * np.eye(5)[targets]
  want = -(q * log_p).sum(-1) * mask
  np.testing.assert_allclose(smoothed, want, rtol=1e-5, atol=1e-6)
  want_nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0] * mask
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(correct, (logits.argmax(-1) == targets) * mask)
  assert smoothed.dtype == jnp.float32


def test_loss_is_summed_over_target_tokens_and_weighted_by_them():
  config = base_config()
  config.training.label_smoothing = 0.0
  task = seq2seq.Seq2Seq(config, data=None)
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 6)).astype(np.float32))
  batch = {
      'target_ids': np.array([[1, 2, 0, 0], [3, 4, 5, 1]], np.int32),
      'target_mask': np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32),
  }
  loss_sum, sums = task.loss(logits, batch)
  weight = task.loss_weight(batch)
  assert float(weight) == 6.0  # real target tokens, not rows
  log_p = np.asarray(jax.nn.log_softmax(logits))
  per_token = [
      -log_p[r, t, batch['target_ids'][r, t]]
      for r in range(2)
      for t in range(4)
      if batch['target_mask'][r, t]
  ]
  np.testing.assert_allclose(
      float(loss_sum) / float(weight), np.mean(per_token), rtol=1e-5
  )
  # Padding targets do not count, whatever they hold.
  batch2 = dict(batch, target_ids=batch['target_ids'].copy())
  batch2['target_ids'][0, 2:] = 5
  np.testing.assert_allclose(task.loss(logits, batch2)[0], loss_sum)
  assert 0 <= float(sums['token_accuracy']) <= 6


def test_rsqrt_schedule_values():
  schedule = rsqrt_schedule(1e-3, 100)
  for step, want in ((0, 0.0), (50, 5e-4), (100, 1e-3), (400, 5e-4)):
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6)
  np.testing.assert_allclose(
      float(schedule(2500)), 1e-3 * np.sqrt(100 / 2500), rtol=1e-6
  )
  np.testing.assert_allclose(float(rsqrt_schedule(1.0, 0)(16)), 0.25)


# ------------------------------------------------------------ parallel data


def test_line_aligned_files_gz_and_mismatch(tmp_path):
  a = write_lines(tmp_path / 'x.de.gz', ['eins', 'zwei'])
  b = write_lines(tmp_path / 'x.en', ['one', 'two'])
  assert parallel.read_line_pair(a, b) == (['eins', 'zwei'], ['one', 'two'])
  c = write_lines(tmp_path / 'y.en', ['one'])
  with pytest.raises(DataError) as e:
    parallel.read_line_pair(a, c)
  message = str(e.value)
  assert '\n' not in message
  assert a in message and c in message and '2 lines' in message
  assert 'has 1' in message


def test_tsv_and_jsonl_columns(tmp_path):
  config = base_config().data
  config.source = 'tsv'
  config.source_column, config.target_column = 'de', 'en'
  tsv = write_lines(tmp_path / 'p.tsv', ['id\tde\ten', '1\tHallo\tHello'])
  assert parallel.read_columns(tsv, config) == (['Hallo'], ['Hello'])
  config.source = 'jsonl'
  jsonl = write_lines(
      tmp_path / 'p.jsonl.gz', ['{"de": "Ja", "en": "Yes", "x": 1}']
  )
  assert parallel.read_columns(jsonl, config) == (['Ja'], ['Yes'])
  config.target_column = 'fr'
  with pytest.raises(DataError, match="no 'fr' field"):
    parallel.read_columns(jsonl, config)


def write_jsonl(path, sources, targets):
  return write_lines(
      path,
      [
          json.dumps({'id': i, 'de': s, 'en': t})
          for i, (s, t) in enumerate(zip(sources, targets))
      ],
  )


def test_array_record_gives_the_same_datasets_as_the_jsonl(tmp_path):
  long = ' '.join(['anna'] * 30)
  train_src = ['anna bert', long, 'carl', 'dora emil fritz gert hans ida']
  train_tgt = ['anna bert', 'kurz', 'carl', 'dora', 'ida jan']
  train_src.append('emil jan')
  train = write_jsonl(tmp_path / 't.jsonl', train_src, train_tgt)
  valid = write_jsonl(tmp_path / 'v.jsonl', [long, 'anna'], ['kurz', 'NA'])
  rec = str(tmp_path / 'rec')
  for path, split in ((train, 'train'), (valid, 'validation')):
    records.convert(
        [path],
        'jsonl',
        rec,
        split,
        records.Columns(None, 'de', 'en', None),
        labels=None,
        progress=False,
    )
  config = base_config().data
  config.source_column, config.target_column = 'de', 'en'
  config.tokenizer, config.vocab_size = 'train', 60
  config.max_length, config.max_length_ratio = 12, 3.0
  config.source, config.path, config.validation_path = 'jsonl', train, valid
  direct = parallel.build_parallel_datasets(config, str(tmp_path / 'a'))
  config.source, config.path, config.validation_path = 'array_record', '', ''
  config.records_dir = rec
  stored = parallel.build_parallel_datasets(config, str(tmp_path / 'b'))
  assert stored.raw == direct.raw
  assert direct.raw['validation']['target'] == ['kurz', 'NA']
  for split in ('train', 'validation', 'test'):
    a, b = getattr(direct, split), getattr(stored, split)
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{split} {key}')
  kept = [
      [l for l in d.log if l.startswith('train: kept')]
      for d in (direct, stored)
  ]
  assert kept[0] == kept[1] and 'kept 3 of 5' in kept[0][0]
  assert direct.tokenizer.get_vocab() == stored.tokenizer.get_vocab()
  # Either direction: the metadata names the columns.
  config.source_column, config.target_column = 'en', 'de'
  back = parallel.build_parallel_datasets(config, str(tmp_path / 'c'))
  assert back.raw['validation'] == {
      'source': ['kurz', 'NA'],
      'target': [long, 'anna'],
  }


def test_array_record_without_the_columns_is_a_one_line_error(tmp_path):
  train = write_jsonl(tmp_path / 't.jsonl', ['anna'], ['bert'])
  rec = str(tmp_path / 'rec')
  records.convert(
      [train],
      'jsonl',
      rec,
      columns=records.Columns(None, 'de', None, None),
      labels=None,
      progress=False,
  )
  config = base_config().data
  config.source, config.records_dir = 'array_record', rec
  config.source_column, config.target_column = 'de', 'en'
  with pytest.raises(DataError) as e:
    parallel.build_parallel_datasets(config, str(tmp_path / 'w'))
  message = str(e.value)
  assert "no 'en' column" in message and '\n' not in message
  assert '--text_column=de --text_pair_column=en --labels=none' in message
  # Training pairs the converter dropped (a missing side) are counted.
  train = write_jsonl(
      tmp_path / 't2.jsonl', ['anna', '', 'carl', 'dora'], ['a', 'b', 'c', 'd']
  )
  records.convert(
      [train],
      'jsonl',
      str(tmp_path / 'rec2'),
      columns=records.Columns(None, 'de', 'en', None),
      labels=None,
      progress=False,
  )
  config.records_dir = str(tmp_path / 'rec2')
  config.tokenizer, config.vocab_size = 'train', 30
  config.validation_fraction = 0.34
  data = parallel.build_parallel_datasets(config, str(tmp_path / 'w2'))
  assert any(
      'records conversion dropped 1 missing text' in line for line in data.log
  ), data.log
  kept = data.raw['train']['source'] + data.raw['validation']['source']
  assert sorted(kept) == ['anna', 'carl', 'dora']


def test_filters_apply_to_training_pairs_only_and_are_counted(tmp_path):
  long = ' '.join(['anna'] * 30)
  train_src = ['anna bert', long, 'carl', '', 'dora emil fritz gert hans ida']
  train_tgt = ['anna bert', 'kurz', 'carl', 'leer', 'dora']
  write_lines(tmp_path / 't.de', train_src)
  write_lines(tmp_path / 't.en', train_tgt)
  write_lines(tmp_path / 'v.de', [long, 'anna'])
  write_lines(tmp_path / 'v.en', ['kurz', ''])
  config = base_config().data
  config.source = 'parallel'
  config.path = str(tmp_path / 't.{lang}')
  config.validation_path = str(tmp_path / 'v.{lang}')
  config.source_lang, config.target_lang = 'de', 'en'
  config.tokenizer = 'train'
  config.vocab_size = 60
  config.max_length = 12
  config.max_length_ratio = 3.0
  data = parallel.build_parallel_datasets(config, str(tmp_path / 'w'))
  assert data.raw['train']['source'] == ['anna bert', 'carl']
  line = next(l for l in data.log if l.startswith('train: kept'))
  assert 'kept 2 of 5' in line and '1 with an empty side' in line
  assert '1 longer than 12' in line and '1 with a token-length ratio' in line
  # Validation is used as given: the long pair and the empty target stay.
  assert data.raw['validation']['source'] == [long, 'anna']
  assert data.validation['attention_mask'].sum(1)[0] > 12
  assert data.test is data.validation or np.array_equal(
      data.test['input_ids'], data.validation['input_ids']
  )
  # Teacher forcing: the decoder reads the start token, then the target.
  row = data.train
  n = int(row['target_mask'][0].sum())
  assert row['target_ids'][0, n - 1] == data.specials.eos
  assert row['decoder_input_ids'][0, 0] == parallel.decoder_start(data.specials)
  np.testing.assert_array_equal(
      row['decoder_input_ids'][0, 1:n], row['target_ids'][0, : n - 1]
  )


def test_tokenizer_is_trained_saved_and_reused_not_retrained(
    copy_files, tmp_path
):
  workdir = str(tmp_path / 'run')
  config = copy_config(copy_files)
  first = parallel.build_parallel_datasets(config.data, workdir)
  path = os.path.join(workdir, 'tokenizer.json')
  assert first.tokenizer_path == path and os.path.isfile(path)
  assert any('trained joint bpe' in l for l in first.log)
  vocab = first.tokenizer.get_vocab()
  assert [vocab[s] for s in parallel.SPECIALS] == [0, 1, 2, 3]
  before = open(path, encoding='utf-8').read()
  # Different training text and vocab size: the saved tokenizer is reused.
  config.data.vocab_size = 30
  config.data.path = os.path.join(copy_files, 'valid.{lang}')
  config.data.validation_path = None
  again = parallel.build_parallel_datasets(config.data, workdir)
  assert any('reused' in l for l in again.log)
  assert not any('trained joint' in l for l in again.log), again.log
  assert open(path, encoding='utf-8').read() == before
  assert again.tokenizer.get_vocab() == vocab
  assert parallel.resolve_tokenizer_path(config.data, workdir) == path


# ------------------------------------------------------------ batching


def test_targets_are_cut_to_their_own_bucket():
  batch = {
      'input_ids': np.ones((2, 32), np.int32),
      'attention_mask': np.pad(np.ones((2, 10), np.int32), ((0, 0), (0, 22))),
      'target_ids': np.ones((2, 32), np.int32),
      'decoder_input_ids': np.ones((2, 32), np.int32),
      'target_mask': np.pad(np.ones((2, 3), np.int32), ((0, 0), (0, 29))),
  }
  cut = trim_to_bucket(batch, (4, 16, 32))
  assert cut['input_ids'].shape == (2, 16)
  assert cut['target_ids'].shape == cut['decoder_input_ids'].shape == (2, 4)


def test_length_grouped_batches_cover_each_epoch_and_resume():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 30, 64)
  mask = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
  table = {'attention_mask': mask, 'id': np.arange(64)}
  stream = TrainStream(table, 8, seed=3, group_by_length=2)
  epoch = [next(stream) for _ in range(8)]
  ids = np.concatenate([b['id'] for b in epoch])
  assert sorted(ids) == list(range(64))  # each example once an epoch
  # Within a chunk of 2 batches lengths are sorted: batches are narrower.
  spread = np.mean([np.ptp(lengths[b['id']]) for b in epoch])
  assert spread < 0.6 * np.ptp(lengths)
  state = stream.get_state()
  later = [next(stream)['id'] for _ in range(3)]
  again = TrainStream(table, 8, seed=3, group_by_length=2)
  again.set_state(state)
  for want in later:
    np.testing.assert_array_equal(next(again)['id'], want)


# ------------------------------------------------------------ end to end


@pytest.fixture(name='copy_run', scope='module')
def fixture_copy_run(copy_files, tmp_path_factory):
  enable_compilation_cache()
  workdir = str(tmp_path_factory.mktemp('copy_run'))
  return workdir, experiment.run(copy_config(copy_files), workdir)


def test_tiny_transformer_learns_to_copy(copy_run, copy_files):
  workdir, results = copy_run
  history = results['validation_history']
  bleus = [h['bleu'] for h in history]
  # A model that has not learnt (first evaluation) is far below; copying
  # 40 sentences of random names needs the source, so a broken model
  # (e.g. decoding without attention to it) cannot pass 60.
  assert bleus[-1] > 60, bleus
  assert bleus[0] < bleus[-1]
  assert results['validation']['bleu'] == max(bleus)
  # The best checkpoint is the one with the highest BLEU.
  best = max(history, key=lambda h: h['bleu'])['step']
  assert results['evaluated_step'] == best
  assert results['tokenizer'] == os.path.join(workdir, 'tokenizer.json')
  assert 'tok:13a' in results['sacrebleu_signatures']['bleu']
  # Translations: one line per validation line, in the file's order.
  path = os.path.join(workdir, 'translations', f'validation-{best}.txt')
  lines = open(path, encoding='utf-8').read().split('\n')[:-1]
  refs = open(os.path.join(copy_files, 'valid.tgt'), encoding='utf-8')
  refs = refs.read().split('\n')[:-1]
  assert len(lines) == len(refs) == 40
  assert np.mean([a == b for a, b in zip(lines, refs)]) > 0.5
  config = read_json(os.path.join(workdir, 'config.json'))
  assert config['data']['tokenizer'] == 'train'


def test_seq2seq_resumes_exactly(copy_files, copy_run, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'resumed')
  config = copy_config(copy_files)
  results = preempted_then_resumed(config, workdir, monkeypatch, step=200)
  reference, _ = copy_run
  (step_a, a), (step_b, b) = final_params(workdir), final_params(reference)
  assert step_a == step_b == 400
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert results['validation']['bleu'] == pytest.approx(
      read_json(os.path.join(reference, 'results.json'))['validation']['bleu']
  )
