"""LoRA export and EMA + early stopping end to end (main.py subprocesses,
digits MLP)."""

import os

import numpy as np

from conftest import TINY, final_params, flat, read_json, run_main


def test_lora_run_exports_a_plain_checkpoint_with_the_same_predictions(
    tmp_path,
):
  adapted = str(tmp_path / 'lora')
  out = run_main(
      f'--config={TINY}',
      f'--workdir={adapted}',
      '--config.lora.rank=4',
      "--config.lora.targets=('dense_.*',)",
      '--config.optimizer.learning_rate=1e-2',
  ).stdout
  assert (
      'lora: rank 4, alpha 16.0 (scale 4), dropout 0.0, 2 adapted Dense '
      'layers, 640 adapter parameters' in out
  )
  # Adapters (64x4 + 4x32, 32x4 + 4x32) and the head (32x10 + 10) train.
  assert 'trainable 970 / frozen 3,136 parameters' in out
  results = read_json(os.path.join(adapted, 'results.json'))
  assert results['trainable_parameters'] == 970
  merged = results['merged_checkpoint']
  assert merged == os.path.join(adapted, 'merged')
  saved = flat(final_params(adapted)[1])
  assert 'dense_0/lora_a' in saved and 'head/kernel' in saved
  # The plain model loads the merged checkpoint; with a zero learning rate
  # it predicts exactly as the LoRA model did.
  plain = str(tmp_path / 'plain')
  out = run_main(
      f'--config={TINY}',
      f'--workdir={plain}',
      f'--config.init.checkpoint={merged}',
      '--config.optimizer.learning_rate=0',
      '--config.optimizer.warmup_steps=0',
      '--config.training.total_steps=1',
  ).stdout
  assert 'init: loaded 6 parameters' in out
  plain_test = read_json(os.path.join(plain, 'results.json'))['test']
  assert plain_test['confusion_matrix'] == results['test']['confusion_matrix']
  np.testing.assert_allclose(
      plain_test['loss'], results['test']['loss'], rtol=1e-5
  )


def test_ema_evaluation_and_early_stopping(tmp_path):
  workdir = str(tmp_path / 'run')
  # LR 0: the metric never improves after the first evaluation.
  out = run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.optimizer.learning_rate=0',
      '--config.training.eval_every_steps=5',
      '--config.training.early_stopping_patience=2',
      '--config.training.ema_decay=0.9',
      '--config.training.evaluate_ema=True',
  ).stdout
  assert 'EMA decay 0.9 (evaluated: EMA params)' in out
  assert (
      'early stopping at step 15: validation accuracy has not improved '
      'for 2 evaluations (best' in out
  )
  results = read_json(os.path.join(workdir, 'results.json'))
  assert results['early_stopped_at_step'] == 15
  # The final evaluation used a best checkpoint (all tie at LR 0).
  assert results['evaluated_step'] in (5, 10, 15)
  assert results['validation']['accuracy'] == max(
      h['accuracy'] for h in results['validation_history']
  )
  assert [h['step'] for h in results['validation_history']] == [5, 10, 15]
  step, _ = final_params(workdir)
  assert step == 15
  bad = run_main(
      f'--config={TINY}',
      f'--workdir={tmp_path / "bad"}',
      '--config.training.evaluate_ema=True',
      check=False,
  )
  assert bad.returncode == 1 and 'ema_decay' in bad.stderr.splitlines()[-1]
