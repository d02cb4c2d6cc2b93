"""Scale-out: two processes (gloo) train like one; checkpoints move between
device counts."""

import os
import subprocess

import portpicker

from conftest import (ROOT, TINY, main_command, read_json, run_main,
                      subprocess_env)
from test_main import assert_same_training


def test_two_processes_match_one_process(tmp_path):
  single = str(tmp_path / 'single')
  run_main(f'--config={TINY}', f'--workdir={single}')
  multi = str(tmp_path / 'multi')
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      main_command(f'--config={TINY}', f'--workdir={multi}',
                   f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}'),
      cwd=ROOT, env=subprocess_env(devices=1), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + \
      outputs[1][-2000:]
  assert 'on 1 device(s) x 2 process(es), global batch 32' in outputs[0]
  assert 'test (' not in outputs[1]  # only process 0 prints and writes
  assert_same_training(multi, single)


def test_checkpoints_move_between_device_counts(tmp_path):
  """Saved on 8 devices, resumed on 2, evaluated on 1: same numbers."""
  workdir = str(tmp_path / 'run')
  run_main(f'--config={TINY}', f'--workdir={workdir}', devices=8)
  out = run_main(f'--config={TINY}', f'--workdir={workdir}',
                 '--config.training.total_steps=60', devices=2).stdout
  assert 'resumed from' in out and 'at step 40' in out
  assert 'on 2 device(s)' in out
  results = read_json(os.path.join(workdir, 'results.json'))
  assert results['steps'] == 60
  out = run_main(f'--config={TINY}', f'--workdir={workdir}',
                 '--config.mode=eval', devices=1).stdout
  assert read_json(os.path.join(workdir, 'results.json'))['test'] == \
      results['test']
