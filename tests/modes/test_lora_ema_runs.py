"""LoRA export, EMA evaluation and early stopping end to end (main.py's
run in this process, `main.cli`, digits MLP)."""

import os

import numpy as np
import orbax.checkpoint as ocp

from conftest import TINY, final_params, flat, read_json
from conftest import run_main_in_process
import tiny_config
from tuning.engine.run import Run


def run_main_here(*args, check=True):
  """main.py's run in this process: (exit code, stdout, the last line of
  stderr)."""
  result = run_main_in_process(f'--config={TINY}', *args, check=check)
  err = result.stderr.strip().splitlines() or ['']
  return result.returncode, result.stdout, err[-1]


def test_lora_run_exports_a_plain_checkpoint_with_the_same_predictions(
    tmp_path,
):
  adapted = str(tmp_path / 'lora')
  _, out, _ = run_main_here(
      f'--workdir={adapted}',
      '--config.lora.rank=4',
      "--config.lora.targets=('dense_.*',)",
      '--config.optimizer.learning_rate=1e-2',
  )
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
  _, out, _ = run_main_here(
      f'--workdir={plain}',
      f'--config.init.checkpoint={merged}',
      '--config.optimizer.learning_rate=0',
      '--config.optimizer.warmup_steps=0',
      '--config.training.total_steps=1',
  )
  assert 'init: loaded 6 parameters' in out
  plain_test = read_json(os.path.join(plain, 'results.json'))['test']
  assert plain_test['confusion_matrix'] == results['test']['confusion_matrix']
  np.testing.assert_allclose(
      plain_test['loss'], results['test']['loss'], rtol=1e-5
  )


def _saved_params(workdir, step):
  """(raw, EMA) parameters of a run's checkpoint at `step`, read with
  orbax directly (not through the code under test)."""
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state')
  )
  return state['params'], state['ema_params']


def test_evaluate_ema_scores_the_ema_parameters(tmp_path):
  # A learning rate above 0: the EMA parameters differ from the raw ones.
  workdir = str(tmp_path / 'run')
  _, out, _ = run_main_here(
      f'--workdir={workdir}',
      '--config.training.ema_decay=0.9',
      '--config.training.evaluate_ema=True',
  )
  assert 'EMA decay 0.9 (evaluated: EMA params)' in out
  results = read_json(os.path.join(workdir, 'results.json'))
  config = tiny_config.get_config()
  config.training.ema_decay = 0.9
  scoring = Run(config, str(tmp_path / 'scoring'))
  # Validation during training (the last one: step 40), and the final test
  # evaluation (of the best checkpoint): (raw, EMA) losses.
  last = [
      scoring.evaluate(p, 'validation')['loss']
      for p in _saved_params(workdir, 40)
  ]
  best = [
      scoring.evaluate(p, 'test')['loss']
      for p in _saved_params(workdir, results['evaluated_step'])
  ]
  scoring.checkpoints.close()
  assert results['validation_history'][-1]['step'] == 40
  logged = results['validation_history'][-1]['loss']
  np.testing.assert_allclose(logged, last[1], rtol=1e-6)
  assert abs(last[0] - logged) > 1e-3  # the control: raw params differ
  tested = results['test']['loss']
  np.testing.assert_allclose(tested, best[1], rtol=1e-6)
  assert abs(best[0] - tested) > 1e-3  # the control


def test_ema_evaluation_and_early_stopping(tmp_path):
  workdir = str(tmp_path / 'run')
  # LR 0: the metric never improves after the first evaluation.
  _, out, _ = run_main_here(
      f'--workdir={workdir}',
      '--config.optimizer.learning_rate=0',
      '--config.training.eval_every_steps=5',
      '--config.training.early_stopping_patience=2',
      '--config.training.ema_decay=0.9',
      '--config.training.evaluate_ema=True',
  )
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
  code, _, error = run_main_here(
      f'--workdir={tmp_path / "bad"}',
      '--config.training.evaluate_ema=True',
      check=False,
  )
  assert code == 1 and 'ema_decay' in error
