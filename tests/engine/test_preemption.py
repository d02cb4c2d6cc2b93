"""SIGTERM saves and exits cleanly; half-written checkpoints are ignored."""

import os
import shutil
import signal
import subprocess
import time

from conftest import ROOT, TINY, main_command, subprocess_env
from conftest import run_main_in_process


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(tmp_path):
  workdir = str(tmp_path / 'run')
  args = [
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.training.total_steps=5000',
      '--config.training.checkpoint_every_steps=100',
      '--config.training.eval_every_steps=2500',
  ]
  proc = subprocess.Popen(
      main_command(*args),
      cwd=ROOT,
      env=subprocess_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  ckpts = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'SIGTERM: saved a checkpoint at step' in out
  step = int(out.split('SIGTERM: saved a checkpoint at step ')[1].split(';')[0])
  assert 100 <= step < 5000
  assert str(step) in os.listdir(ckpts)
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  # A checkpoint killed mid-save is left as a temporary folder: a rerun
  # ignores it and resumes from the last complete checkpoint.
  shutil.copytree(
      os.path.join(ckpts, str(step)),
      os.path.join(ckpts, f'{step + 50}.orbax-checkpoint-tmp'),
  )
  out = run_main_in_process(*args).stdout
  assert f'at step {step}' in out  # resumed from the complete one
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert not any('tmp' in s for s in os.listdir(ckpts))
