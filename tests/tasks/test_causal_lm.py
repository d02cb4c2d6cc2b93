"""The causal_lm task: next-token cross-entropy on plain text, through the
task seam (a tiny random Llama, a word-level tokenizer, a small CSV)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (
    TINY,
    TINY_LLAMA,
    final_params,
    flat,
    preempted_then_resumed,
    read_json,
    run_main,
)
from tuning.modes import experiment
from tuning.methods import optimizers
from tuning.data.datasets import build_datasets
from tuning.data.preprocessing import PretrainedTokenizer
from tuning.data.tables import DataError
from tuning.engine.run import Run
from tuning.tasks import causal_lm
from tuning.tasks.registry import task_class
import tiny_config

WORDS = 'the cat sat on mat dog ran to park a bird flew over tree'.split()
LLAMA = {**TINY_LLAMA, 'vocab_size': 24}


def write_model_folder(folder):
  """config.json and a word-level tokenizer.json (<pad> 0, <s> 1, </s> 2)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {'<pad>': 0, '<s>': 1, '</s>': 2, '<unk>': 3}
  vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  os.makedirs(folder, exist_ok=True)
  tokenizer.save(os.path.join(folder, 'tokenizer.json'))
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(LLAMA, f)
  return str(folder)


def write_text_csv(path, rows=300, seed=0):
  """Documents of 2-3 predictable sentences, one document a row: the
  animal fixes the verb and preposition, the place is random."""
  rng = np.random.default_rng(seed)
  verbs = {'cat': 'sat on', 'dog': 'ran to', 'bird': 'flew over'}
  with open(path, 'w', encoding='utf-8') as f:
    f.write('text\n')
    for _ in range(rows):
      sentences = []
      for _ in range(rng.integers(2, 4)):
        animal = rng.choice(list(verbs))
        place = rng.choice(['mat', 'park', 'tree'])
        sentences.append(f'the {animal} {verbs[animal]} the {place}')
      f.write(' '.join(sentences) + '\n')
  return str(path)


def causal_config(folder, csv, steps=40):
  c = tiny_config.get_config()
  c.task = 'causal_lm'
  c.data.source = 'csv'
  c.data.path = csv
  c.data.text_column = 'text'
  c.data.tokenizer = folder
  c.data.max_length = 24
  c.data.length_buckets = (24,)
  c.model.name = 'llama'
  c.model.hf_config = folder
  c.model.dropout = 0.0
  c.optimizer.learning_rate = 1e-2
  c.training.batch_size = 16
  c.training.total_steps = steps
  c.training.eval_every_steps = 10
  c.training.checkpoint_every_steps = 10
  return c


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('causal')
  return (
      write_model_folder(root / 'model'),
      write_text_csv(root / 'text.csv'),
  )


@pytest.fixture(scope='module')
def uninterrupted(files, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('runs') / 'straight')
  return workdir, experiment.run(causal_config(*files), workdir)


def test_loss_is_token_weighted_next_token_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  ids = np.array([[1, 4, 5, 6, 2], [1, 3, 2, 0, 0]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
  batch = {'input_ids': ids, 'attention_mask': mask, 'weight': np.ones(2)}
  total, count, correct = 0.0, 0, 0
  for b in range(2):
    for t in range(4):
      if mask[b, t + 1]:
        row = logits[b, t].astype(np.float64)
        log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
        total += log_z - row[ids[b, t + 1]]
        count += 1
        correct += int(np.argmax(row) == ids[b, t + 1])
  task = causal_lm.CausalLM
  loss_sum, sums = task.loss(jnp.asarray(logits), batch)
  assert count == 6 and float(task.loss_weight(batch)) == count
  np.testing.assert_allclose(float(loss_sum), total, rtol=1e-6)
  assert float(sums['token_accuracy']) == correct
  rows = task(None, None).eval_rows(jnp.asarray(logits), batch)
  metrics = task(None, None).metrics(
      jax.tree.map(lambda v: np.asarray(v).sum(0), rows)
  )
  np.testing.assert_allclose(metrics['loss'], total / count, rtol=1e-6)
  np.testing.assert_allclose(metrics['perplexity'], np.exp(total / count))
  assert metrics['tokens'] == 6 and metrics['examples'] == 2
  # Padding rows (weight 0) add nothing.
  half = dict(batch, weight=np.array([1.0, 0.0]))
  rows = task(None, None).eval_rows(jnp.asarray(logits), half)
  assert float(rows['tokens'].sum()) == 4


def test_documents_end_with_eos_unless_cut(files):
  folder, _ = files
  enc = PretrainedTokenizer(folder, 6, append_eos=True).encode(
      ['the cat sat', 'the dog ran to the park the end']
  )
  np.testing.assert_array_equal(
      enc['input_ids'], [[4, 5, 6, 2, 0, 0], [4, 9, 10, 11, 4, 12]]
  )
  np.testing.assert_array_equal(enc['attention_mask'][0], [1, 1, 1, 1, 0, 0])
  plain = PretrainedTokenizer(folder, 6).encode(['the cat sat'])
  np.testing.assert_array_equal(plain['input_ids'][0], [4, 5, 6, 0, 0, 0])


def test_training_lowers_validation_perplexity(uninterrupted):
  workdir, results = uninterrupted
  assert results['task'] == 'causal_lm'
  history = results['validation_history']
  assert [h['step'] for h in history] == [10, 20, 30, 40]
  first, last = history[0]['perplexity'], history[-1]['perplexity']
  assert last < 0.7 * first, (first, last)
  # Repetitive text: far below the uniform 24-token perplexity.
  assert results['test']['perplexity'] < 6.0
  assert results['test']['tokens'] > 0
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert task_class('causal_lm').best_metric == 'loss'


def test_causal_lm_resumes_exactly(files, uninterrupted, tmp_path, monkeypatch):
  results = preempted_then_resumed(
      causal_config(*files), str(tmp_path / 'resumed'), monkeypatch
  )
  expected = uninterrupted[1]
  assert results['test'] == expected['test']
  assert results['validation'] == expected['validation']


@pytest.fixture(scope='module')
def lora_run(files, tmp_path_factory):
  """A tiny LoRA causal_lm run of 10 steps, evaluated (with greedy
  samples through the merged model) before it starts and at the end."""
  config = causal_config(*files, steps=10)
  config.lora.rank = 4
  config.training.samples = 2
  config.training.eval_at_start = True
  workdir = str(tmp_path_factory.mktemp('runs') / 'lora')
  return config, workdir, experiment.run(config, workdir)


def test_lora_on_the_decoder_trains_adapters_and_head_only(lora_run, tmp_path):
  config, workdir, results = lora_run
  with open(os.path.join(workdir, 'samples.jsonl'), encoding='utf-8') as f:
    lines = [json.loads(line) for line in f]
  assert [l['step'] for l in lines] == [0, 0, 10, 10]
  assert results['samples'] == [
      {k: l[k] for k in ('prompt', 'continuation')} for l in lines[2:]
  ]
  assert all(l['prompt'].startswith('the ') for l in lines)
  run = Run(config, str(tmp_path / 'init'))
  start = flat(run.init_params())
  run.checkpoints.close()
  end = flat(final_params(workdir)[1])
  assert set(start) == set(end)
  changed = {k for k in start if not np.array_equal(start[k], end[k])}
  frozen = set(start) - changed
  # lora_b starts at zero and lora_a moves with it; the family's head
  # (lm_head, final norm) trains; every pretrained weight stays.
  assert changed, 'nothing trained'
  for name in changed:
    assert '/lora_' in name or name.startswith(
        ('lm_head/', 'decoder/final_norm/')
    ), name
  assert any(k.endswith('query/lora_b') for k in changed)
  assert 'lm_head/kernel' in changed
  assert {k for k in start if '/lora_' not in k} - {
      'lm_head/kernel',
      'decoder/final_norm/scale',
  } <= frozen
  adapters = sum(v.size for k, v in start.items() if '/lora_' in k)
  # Rank 4 on q, k, v, out, gate, up, down of 2 layers (hidden 32, kv 16,
  # intermediate 48), plus lm_head 32x24 and the final norm's 32.
  assert adapters == 2 * (256 + 192 + 192 + 256 + 3 * 320)
  assert results['trainable_parameters'] == adapters + 32 * 24 + 32


def test_causal_lm_under_the_mesh_equals_pmap(files, uninterrupted, tmp_path):
  folder, csv = files
  workdir = str(tmp_path / 'mesh')
  run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.task=causal_lm',
      '--config.data.source=csv',
      f'--config.data.path={csv}',
      '--config.data.text_column=text',
      f'--config.data.tokenizer={folder}',
      '--config.data.max_length=24',
      '--config.data.length_buckets=(24,)',
      '--config.model.name=llama',
      f'--config.model.hf_config={folder}',
      '--config.model.dropout=0.0',
      '--config.optimizer.learning_rate=1e-2',
      '--config.training.batch_size=16',
      '--config.training.total_steps=40',
      '--config.training.eval_every_steps=10',
      '--config.training.checkpoint_every_steps=10',
      '--config.parallelism=mesh',
      '--config.mesh.fsdp=2',
      devices=4,
  )
  results = read_json(os.path.join(workdir, 'results.json'))
  expected = uninterrupted[1]
  assert results['task'] == 'causal_lm'
  assert results['test']['tokens'] == expected['test']['tokens']
  for key in ('loss', 'perplexity', 'token_accuracy'):
    np.testing.assert_allclose(
        results['test'][key], expected['test'][key], rtol=1e-4
    )


def test_packing_fills_rows_with_documents_and_their_ends(files):
  folder, csv = files
  config = causal_config(folder, csv)
  # Rows of 48 tokens: room for two or three documents (of 13-20 tokens).
  config.data.max_length = 48
  plain = build_datasets(config.data, labels=None, append_eos=True)
  config.data.pack = True
  packed = build_datasets(config.data, labels=None, append_eos=True)
  assert any('packed documents into rows of 48 tokens' in l for l in packed.log)
  rows = len(packed.train['input_ids'])
  assert rows < len(plain.train['input_ids'])
  assert any(l.startswith(f'examples: train {rows},') for l in packed.log)
  for name in ('train', 'validation', 'test'):
    before, after = plain.split(name), packed.split(name)
    stream = before['input_ids'][before['attention_mask'] > 0]
    np.testing.assert_array_equal(
        after['input_ids'][after['attention_mask'] > 0], stream
    )
    # Whole documents, in order: a row is full unless the next document
    # does not fit in what is left of it.
    lengths = before['attention_mask'].sum(axis=1)
    filled = after['attention_mask'].sum(axis=1)
    first = (after['segment_ids'] == 1).sum(axis=1)
    assert (filled[:-1] + first[1:] > 48).all()
    assert set(after) == {
        'input_ids',
        'attention_mask',
        'loss_mask',
        'segment_ids',
        'positions',
    }
    starts = after['positions'] == 0
    assert starts.sum() - (after['attention_mask'] == 0).sum() == len(lengths)
  config.task = 'classification'
  with pytest.raises(DataError, match='config.data.pack packs unlabelled'):
    build_datasets(config.data, labels='classes')


def test_causal_lm_needs_a_decoder(files, tmp_path):
  config = causal_config(*files)
  config.model.name = 'lstm'
  with pytest.raises(ValueError, match='needs a decoder, not config.model'):
    Run(config, str(tmp_path / 'lstm'))


def test_eval_at_start_is_the_initial_parameters_validation(lora_run, tmp_path):
  config, _, results = lora_run
  history = results['validation_history']
  assert [h['step'] for h in history] == [0, 10]
  assert results['validation_at_start'] == history[0]
  run = Run(config, str(tmp_path / 'init'))
  start = run.evaluate(run.init_params(), 'validation')
  run.checkpoints.close()
  np.testing.assert_allclose(
      history[0]['perplexity'], start['perplexity'], rtol=1e-5
  )
  assert history[1]['perplexity'] < 0.8 * history[0]['perplexity']


def test_generate_from_a_run_workdir_uses_its_merged_final_params(
    files, lora_run, tmp_path
):
  from tuning.cli import generate  # pylint: disable=g-import-not-at-top
  from tuning.decoding import sampling as generation  # pylint: disable=g-import-not-at-top
  from tuning.methods import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from tuning.models import decoder_hf  # pylint: disable=g-import-not-at-top

  folder, _ = files
  config, workdir, _ = lora_run
  step, params = final_params(workdir)
  merged = lora_lib.merge(params, config.lora)
  prompts = ['the cat', 'the bird flew']
  for which in ('best', 'latest', str(step)):
    loaded = generate.load(workdir, step=which)
    assert set(flat(loaded.params)) == set(flat(merged))
    for k, v in flat(merged).items():
      np.testing.assert_allclose(flat(loaded.params)[k], v, rtol=1e-6)
  got = generate.complete(loaded, prompts, max_new_tokens=6, chat=False)
  # The same greedy tokens straight from generation.generate.
  tokenizer = loaded.tokenizer
  encoded = [tokenizer.encode(p).ids for p in prompts]
  ids = np.zeros((2, 16), np.int32)
  mask = np.zeros_like(ids)
  for row, tokens in enumerate(encoded):
    ids[row, 16 - len(tokens) :] = tokens
    mask[row, 16 - len(tokens) :] = 1
  model = decoder_hf.from_hf_config(folder)
  out = generation.generate(
      model, merged, ids, mask, max_new_tokens=6, stop_tokens=(2,), pad_id=2
  )
  for row, result in enumerate(got):
    new = out.tokens[row, : out.lengths[row]].tolist()
    assert result['new_tokens'] == len(new)
    assert result['completion'] == tokenizer.decode([t for t in new if t != 2])
  assert any(r['new_tokens'] for r in got)


def test_generate_from_a_workdir_one_line_errors(files, lora_run, tmp_path):
  from tuning.cli import generate  # pylint: disable=g-import-not-at-top

  _, workdir, _ = lora_run
  empty = tmp_path / 'not_trained'
  empty.mkdir()
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    (empty / 'config.json').write_text(f.read())
  with pytest.raises(ValueError, match='no checkpoint in .*train it first'):
    generate.load(str(empty))
  with pytest.raises(ValueError, match='no checkpoint step 7 in .*set --step'):
    generate.load(workdir, step='7')
  with pytest.raises(ValueError, match="--step='last': use best, latest"):
    generate.load(workdir, step='last')
  classifier = tmp_path / 'classifier'
  classifier.mkdir()
  (classifier / 'config.json').write_text(
      json.dumps({'task': 'classification', 'model': {}, 'training': {}})
  )
  with pytest.raises(ValueError, match='is a classification run: generation'):
    generate.load(str(classifier))


def test_freezing_layer_decay_ema_accumulation_and_bf16_together(
    files, tmp_path
):
  """The methods of the fine-tuning issue on a decoder in one run: frozen
  embeddings stay bitwise, layer-wise decay scales the layers' rates by
  depth, the EMA is what is evaluated, two micro-batches a step, bfloat16
  compute; validation perplexity still falls."""
  config = causal_config(*files, steps=10)
  config.optimizer.frozen = (r'decoder/embed/.*',)
  config.optimizer.layer_decay = 0.5
  config.training.ema_decay = 0.5
  config.training.evaluate_ema = True
  config.training.accumulation_steps = 2
  config.training.eval_at_start = True
  config.dtype = 'bfloat16'
  workdir = str(tmp_path / 'methods')
  results = experiment.run(config, workdir)
  start_loss = results['validation_at_start']['loss']
  assert results['validation']['loss'] < 0.8 * start_loss, results
  run = Run(config, str(tmp_path / 'init'))
  start = flat(run.init_params())
  settings = optimizers.parameter_settings(
      run.init_params(), config.optimizer, config.lora, run.naming
  )
  run.checkpoints.close()
  end = flat(final_params(workdir)[1])
  embed = [k for k in start if k.startswith('decoder/embed/')]
  assert embed and all(np.array_equal(start[k], end[k]) for k in embed)
  moved = [k for k in start if k not in embed]
  assert all(not np.array_equal(start[k], end[k]) for k in moved)
  mult = {k: s.lr_mult for k, s in settings.items()}
  layer0 = mult['decoder/layer_0/attention/query/kernel']
  layer1 = mult['decoder/layer_1/attention/query/kernel']
  assert layer0 == pytest.approx(0.5 * layer1)
