"""Scale-out: two processes (gloo) train like one; checkpoints move between
device counts."""

import os

from conftest import (
    TINY,
    assert_same_training,
    read_json,
    run_main,
    run_main_processes,
)


def test_two_processes_match_one_process(tmp_path):
  single = str(tmp_path / 'single')
  run_main(f'--config={TINY}', f'--workdir={single}')
  multi = str(tmp_path / 'multi')
  outputs = run_main_processes(f'--config={TINY}', f'--workdir={multi}')
  assert 'on 1 device(s) x 2 process(es), global batch 32' in outputs[0]
  assert 'test (' not in outputs[1]  # only process 0 prints and writes
  assert_same_training(multi, single)


def test_checkpoints_move_between_device_counts(tmp_path):
  """Saved on 8 devices, resumed on 2, evaluated on 1: same numbers."""
  workdir = str(tmp_path / 'run')
  run_main(f'--config={TINY}', f'--workdir={workdir}', devices=8)
  out = run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.training.total_steps=60',
      devices=2,
  ).stdout
  assert 'resumed from' in out and 'at step 40' in out
  assert 'on 2 device(s)' in out
  results = read_json(os.path.join(workdir, 'results.json'))
  assert results['steps'] == 60
  # mode=eval writes results.json afresh: compare what it wrote, not what
  # training left there.
  os.remove(os.path.join(workdir, 'results.json'))
  out = run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.mode=eval',
      devices=1,
  ).stdout
  evaluated = read_json(os.path.join(workdir, 'results.json'))
  assert 'steps' not in evaluated  # written by mode=eval, not by training
  assert evaluated['evaluated_step'] == results['evaluated_step']
  assert evaluated['test'] == results['test']
