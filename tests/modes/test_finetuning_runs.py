"""Fine-tuning methods end to end (main.py's run in this process, digits MLP):
gradient accumulation and the non-finite guard (LoRA, EMA and early
stopping: test_lora_ema_runs.py)."""

import os

import numpy as np

from conftest import (
    TINY,
    final_params,
    flat,
    read_json,
    run_main_in_process,
    train_losses,
)


def test_batch_32_as_4_x_8_accumulation_matches_batch_32(tmp_path):
  args = [
      f'--config={TINY}',
      '--config.training.total_steps=12',
      '--config.training.log_every_steps=1',
      '--config.training.eval_every_steps=12',
  ]
  direct, accumulated = str(tmp_path / 'direct'), str(tmp_path / 'accum')
  run_main_in_process(*args, f'--workdir={direct}')
  out = run_main_in_process(
      *args,
      f'--workdir={accumulated}',
      '--config.training.accumulation_steps=4',
  ).stdout
  assert 'gradient accumulation 4 x 8 examples per optimizer step' in out
  ld, la = train_losses(direct), train_losses(accumulated)
  assert ld.keys() == la.keys() == set(range(1, 13))
  np.testing.assert_allclose(
      [la[k] for k in sorted(la)], [ld[k] for k in sorted(ld)], rtol=1e-5
  )
  pd, pa = flat(final_params(direct)[1]), flat(final_params(accumulated)[1])
  for k in pd:
    np.testing.assert_allclose(pa[k], pd[k], rtol=1e-4, atol=1e-6)
  bad = run_main_in_process(
      *args,
      f'--workdir={tmp_path / "bad"}',
      '--config.training.accumulation_steps=5',
      check=False,
  )
  assert bad.returncode == 1
  assert 'config.training.accumulation_steps=5' in bad.stderr.splitlines()[-1]


# Adam at LR 1e30 without clipping: step 1 is finite but makes the weights
# huge, so that the loss of step 2 overflows.
EXPLODE = [
    '--config.optimizer.learning_rate=1e30',
    '--config.optimizer.clip_norm=0',
    '--config.optimizer.warmup_steps=0',
    '--config.training.eval_every_steps=1',
    '--config.training.total_steps=6',
]


def test_nonfinite_loss_stops_keeping_the_last_good_checkpoint_or_skips(
    tmp_path,
):
  stopped = str(tmp_path / 'stop')
  result = run_main_in_process(
      f'--config={TINY}', f'--workdir={stopped}', *EXPLODE, check=False
  )
  assert result.returncode == 1
  error = result.stderr.strip().splitlines()[-1]
  assert 'non-finite loss' in error and 'at step 2' in error, error
  assert 'last good checkpoint is step 1' in error
  step, params = final_params(stopped)
  assert step == 1
  assert all(np.isfinite(v).all() for v in flat(params).values())

  skipped = str(tmp_path / 'skip')
  out = run_main_in_process(
      f'--config={TINY}',
      f'--workdir={skipped}',
      *EXPLODE,
      '--config.training.on_nonfinite=skip',
  ).stdout
  assert 'step 2: non-finite loss or gradients; update skipped' in out
  results = read_json(os.path.join(skipped, 'results.json'))
  assert results['skipped_steps'] == 5  # every step after the first
  step, params = final_params(skipped)
  assert step == 6
  assert all(np.isfinite(v).all() for v in flat(params).values())
