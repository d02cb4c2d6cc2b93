"""config.task=preference end to end: a tiny random Llama with LoRA learns
which of two replies is preferred (DPO, and reference-free SimPO), the
reference log-probs are those of the base model and are cached, a resumed
run equals the uninterrupted one, and bad set-ups are one-line errors."""

import json
import math
import os

import numpy as np
import pytest

from conftest import final_params, flat, preempted_then_resumed
from tuning.modes import experiment
from tuning.multirun import preference_reference
from tuning.tasks import preference
from tuning.tasks.registry import task_class
import tiny_config

# The word-level tokenizer and tiny Llama of the causal_lm tests.
from test_causal_lm import write_model_folder  # pylint: disable=g-bad-import-order

VERBS = {'cat': 'sat on', 'dog': 'ran to', 'bird': 'flew over'}


def write_pairs(path, rows=240, seed=0):
  """Prompt 'the <animal>', chosen: the animal's verb, rejected: another's."""
  rng = np.random.default_rng(seed)
  with open(path, 'w', encoding='utf-8') as f:
    for _ in range(rows):
      animal, other = rng.choice(list(VERBS), 2, replace=False)
      place = rng.choice(['mat', 'park', 'tree'])
      f.write(
          json.dumps(
              {
                  'prompt': f'the {animal}',
                  'chosen': f' {VERBS[animal]} the {place}',
                  'rejected': f' {VERBS[other]} the {place}',
              }
          )
          + '\n'
      )
  return str(path)


def preference_config(folder, pairs, loss='dpo', steps=30):
  c = tiny_config.get_config()
  c.task = 'preference'
  c.preference.loss = loss
  c.preference.beta = 0.5
  c.data.path = pairs
  c.data.tokenizer = folder
  c.data.max_length = 10
  c.data.length_buckets = (10,)
  c.model.name = 'llama'
  c.model.hf_config = folder
  c.model.dropout = 0.0
  c.lora.rank = 4
  c.lora.alpha = 8.0
  c.lora.train_head = False  # the base, so the reference, stays as loaded
  c.optimizer.learning_rate = 2e-2
  c.optimizer.warmup_steps = 0
  c.training.batch_size = 8
  c.training.eval_batch_size = 16
  c.training.total_steps = steps
  c.training.eval_every_steps = 10
  c.training.checkpoint_every_steps = 10
  c.training.log_every_steps = 10
  c.training.eval_at_start = True
  return c


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('preference')
  return write_model_folder(root / 'model'), write_pairs(root / 'pairs.jsonl')


@pytest.fixture(scope='module')
def uninterrupted(files, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('runs') / 'straight')
  return workdir, experiment.run(preference_config(*files), workdir)


def test_dpo_learns_the_preferred_reply(uninterrupted):
  workdir, results = uninterrupted
  assert results['task'] == 'preference' and results['loss_kind'] == 'dpo'
  history = results['validation_history']
  assert [h['step'] for h in history] == [0, 10, 20, 30]
  # LoRA starts as the base, which is the reference: every implicit reward
  # is 0, so the DPO loss is log 2 and no pair is ranked right yet.
  before = history[0]
  assert before['loss'] == pytest.approx(math.log(2.0), abs=1e-5)
  assert before['margin'] == pytest.approx(0.0, abs=1e-5)
  assert before['accuracy'] == 0.0
  after = history[-1]
  assert after['accuracy'] > 0.9 and after['loss'] < 0.5, after
  assert results['test']['accuracy'] > 0.9
  assert results['test']['examples'] == 48  # 20% of 240 carved
  assert os.path.exists(os.path.join(workdir, preference_reference.FILE))
  assert task_class('preference').best_metric == 'accuracy'


def test_reference_logps_are_the_base_models(files, uninterrupted):
  """The cached reference equals the base (the adapters-off tree) scored
  directly; training did not move it."""
  from tuning.engine.run import Run  # pylint: disable=g-import-not-at-top
  from tuning.methods import lora  # pylint: disable=g-import-not-at-top

  workdir, _ = uninterrupted
  config = preference_config(*files)
  run = Run(config, workdir)
  _, trained = final_params(workdir)
  base = lora.without_adapters(trained)
  table = run.data.validation
  chosen, rejected = preference_reference.split_logps(run.model, base, table, 7)
  with np.load(os.path.join(workdir, preference_reference.FILE)) as cache:
    np.testing.assert_allclose(cache['validation_chosen'], chosen, atol=1e-5)
    np.testing.assert_allclose(
        cache['validation_rejected'], rejected, atol=1e-5
    )
  policy, _ = preference_reference.split_logps(run.model, trained, table, 16)
  assert np.abs(policy - chosen).max() > 0.1  # the adapters moved


def test_resumed_run_equals_uninterrupted(
    files, uninterrupted, tmp_path, monkeypatch
):
  workdir, results = uninterrupted
  resumed = preempted_then_resumed(
      preference_config(*files), str(tmp_path / 'r'), monkeypatch, step=10
  )
  assert resumed['test'] == results['test']
  a = flat(final_params(workdir)[1])
  b = flat(final_params(str(tmp_path / 'r'))[1])
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_simpo_needs_no_reference(files, tmp_path):
  config = preference_config(*files, loss='simpo', steps=20)
  config.preference.beta = 2.0
  results = experiment.run(config, str(tmp_path / 'simpo'))
  assert results['validation_history'][-1]['accuracy'] > 0.9
  assert not os.path.exists(tmp_path / 'simpo' / preference_reference.FILE)


def test_bad_setups_are_one_line_errors(files, tmp_path):
  folder, pairs = files
  config = preference_config(folder, pairs)
  config.model.name = 'bert'
  with pytest.raises(ValueError, match='task=preference needs a decoder'):
    experiment.run(config, str(tmp_path / 'a'))
  config = preference_config(folder, pairs)
  config.data.tokenizer = 'whitespace'
  with pytest.raises(ValueError, match="tokenized by the model's tokenizer"):
    experiment.run(config, str(tmp_path / 'b'))
  # A cache of other pairs in the work directory.
  other = write_pairs(tmp_path / 'other.jsonl', seed=1)
  workdir = str(tmp_path / 'c')
  os.makedirs(workdir)
  experiment.run(preference_config(folder, other, steps=1), workdir + '/x')
  os.replace(
      os.path.join(workdir, 'x', preference_reference.FILE),
      os.path.join(workdir, preference_reference.FILE),
  )
  with pytest.raises(ValueError, match='reference log-probs of other'):
    experiment.run(preference_config(folder, pairs), workdir)
  task = preference.Preference(preference_config(folder, pairs), None)
  with pytest.raises(ValueError, match='needs the reference log-probs'):
    task.loss(
        np.zeros((2, 3, 24), np.float32),
        {
            f'{s}_{c}': np.ones((1, 3), np.int32)
            for s in preference.SIDES
            for c in preference.COLUMNS
        },
    )


def test_eval_mode_reads_the_cached_reference(files, uninterrupted, tmp_path):
  workdir, results = uninterrupted
  config = preference_config(*files)
  config.mode = 'eval'
  again = experiment.run(config, workdir)
  assert again['test'] == results['test']
  with pytest.raises(ValueError, match='holds no reference_logps.npz'):
    experiment.run(config, str(tmp_path / 'empty'))
