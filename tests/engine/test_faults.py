"""Faults survived, nothing lost: kills mid-write, a full disk, a read-only
work directory, a corrupt checkpoint, two runs on one work directory.

Each ends the same way: the run finishes, or stops with one `error:` line;
the rerun resumes from the last complete checkpoint and ends with results
equal to an uninterrupted run's.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import main
from conftest import (
    ROOT,
    TINY,
    corrupt_largest_file,
    enable_compilation_cache,
    error_lines,
    read_json,
    run_main,
    run_main_in_process,
    subprocess_env,
)
from tuning.engine import workdir_lock

ARGS = [
    f'--config={TINY}',
    '--config.training.total_steps=60',
    '--config.training.eval_every_steps=20',
    '--config.training.checkpoint_every_steps=1',
]

# main.py with orbax's commit (the rename of a finished checkpoint) and the
# checksum sealing slowed down, so that kills land inside checkpoint writes.
SLOW_WRITES = f"""
import asyncio, runpy, sys, time
sys.path.insert(0, {ROOT!r})
from orbax.checkpoint._src.path import atomicity
from tuning.engine import checkpoints
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def slow_finalize(self):
  await asyncio.sleep(0.02)
  await finalize(self)
  await asyncio.sleep(0.02)
atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
seal = checkpoints.seal
def slow_seal(step_dir):
  time.sleep(0.01)
  seal(step_dir)
checkpoints.seal = slow_seal
sys.argv[0] = {os.path.join(ROOT, 'main.py')!r}
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _same_results(workdir, reference):
  got = read_json(os.path.join(workdir, 'results.json'))
  want = read_json(os.path.join(reference, 'results.json'))
  for key in (
      'test',
      'validation',
      'validation_history',
      'evaluated_step',
      'steps',
  ):
    assert got[key] == want[key], key


@pytest.fixture(scope='module', autouse=True)
def compilation_cache():
  """In-process runs share the subprocesses' compilation cache."""
  enable_compilation_cache()


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  run_main_in_process(*ARGS, f'--workdir={workdir}')
  history = read_json(os.path.join(workdir, 'results.json'))[
      'validation_history'
  ]
  assert [h['step'] for h in history] == [20, 40, 60]
  return workdir


def test_sigkill_inside_checkpoint_writes_then_the_rerun_matches(
    reference, tmp_path
):
  seed = random.randrange(10**6)
  rng = random.Random(seed)
  script = tmp_path / 'slow_writes.py'
  script.write_text(SLOW_WRITES)
  workdir = str(tmp_path / 'run')
  ckpts = os.path.join(workdir, 'checkpoints')
  kills = []
  for _ in range(2):
    proc = subprocess.Popen(
        [sys.executable, str(script), *ARGS, f'--workdir={workdir}'],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    before = set(os.listdir(ckpts)) if os.path.isdir(ckpts) else set()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      names = set(os.listdir(ckpts)) if os.path.isdir(ckpts) else set()
      if names - before:  # this process is writing checkpoints
        break
      time.sleep(0.01)
    delay = rng.uniform(0, 0.4)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f'ended before the kill ({seed})'
    kills.append(round(delay, 3))
  out = run_main_in_process(*ARGS, f'--workdir={workdir}').stdout
  assert 'resumed from' in out, (seed, kills)
  assert 'Traceback' not in out
  _same_results(workdir, reference)
  # A kill leaves no half-written checkpoint behind once a run has resumed.
  assert not [n for n in os.listdir(ckpts) if 'tmp' in n], os.listdir(ckpts)


def _mount(path, options):
  os.makedirs(path, exist_ok=True)
  done = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', path],
      capture_output=True,
      check=False,
  )
  return done.returncode == 0


def test_full_disk_then_read_only_then_the_rerun_matches(reference, tmp_path):
  """A real full disk and read-only remount (a small tmpfs, as root), else
  a simulated one: checkpoint writes failing with ENOSPC."""
  disk = str(tmp_path / 'disk')
  if not _mount(disk, 'size=160k'):
    _simulated_full_disk(reference, tmp_path)
    return
  try:
    workdir = os.path.join(disk, 'run')
    full = run_main(*ARGS, f'--workdir={workdir}', check=False)
    _assert_one_line(
        full,
        'No space left on device',
        'the disk is full',
        'rerun the same command',
    )
    assert (
        subprocess.run(
            ['mount', '-o', 'remount,ro', disk], check=False
        ).returncode
        == 0
    )
    read_only = run_main(*ARGS, f'--workdir={workdir}', check=False)
    _assert_one_line(read_only, 'is not writable', 'choose a writable')
    assert (
        subprocess.run(
            ['mount', '-o', 'remount,rw,size=64m', disk], check=False
        ).returncode
        == 0
    )
    out = run_main_in_process(*ARGS, f'--workdir={workdir}').stdout
    assert 'resumed from' in out
    _same_results(workdir, reference)
  finally:
    subprocess.run(['umount', '-l', disk], check=False)


def _assert_one_line(result, *words):
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  lines = error_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  for word in words:
    assert word in lines[0], lines[0]
  assert 'Traceback' not in result.stdout + result.stderr


# main.py whose checkpoint writes fail with ENOSPC from the 3rd checkpoint
# on (where no tmpfs can be mounted).
FAILING_WRITES = f"""
import errno, runpy, sys
sys.path.insert(0, {ROOT!r})
from tuning.engine import checkpoints
seal = checkpoints.seal
calls = []
def failing_seal(step_dir):
  calls.append(step_dir)
  if len(calls) >= 3:
    raise OSError(errno.ENOSPC, 'No space left on device', step_dir)
  seal(step_dir)
checkpoints.seal = failing_seal
sys.argv[0] = {os.path.join(ROOT, 'main.py')!r}
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _simulated_full_disk(reference, tmp_path):
  script = tmp_path / 'failing_writes.py'
  script.write_text(FAILING_WRITES)
  workdir = str(tmp_path / 'run')
  full = subprocess.run(
      [sys.executable, str(script), *ARGS, f'--workdir={workdir}'],
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  _assert_one_line(full, 'the disk is full', 'rerun the same command')
  out = run_main_in_process(*ARGS, f'--workdir={workdir}').stdout
  assert 'resumed from' in out
  _same_results(workdir, reference)


def test_corrupt_latest_checkpoint_falls_back_and_keeps_it(tmp_path, capfd):
  args = [
      'main.py',
      f'--config={TINY}',
      f'--workdir={tmp_path / "run"}',
      '--config.checkpoint.best_mode=min',
  ]  # best (20) != latest (40)
  assert main.cli(args) == 0
  capfd.readouterr()
  ckpts = tmp_path / 'run' / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == ['20', '40']
  uninterrupted = read_json(str(tmp_path / 'run' / 'results.json'))
  corrupt_largest_file(str(ckpts / '40'))
  assert main.cli(args) == 0
  out, err = capfd.readouterr()
  assert 'checkpoint: step 40' in out and 'does not match its checksum' in out
  assert 'resumed from' in out and 'at step 20' in out
  moved = [n for n in os.listdir(ckpts) if n.startswith('40.corrupt-')]
  assert len(moved) == 1 and f'moved it to {ckpts / moved[0]}' in out
  assert not error_lines(err)
  results = read_json(str(tmp_path / 'run' / 'results.json'))
  for key in ('test', 'validation', 'validation_history'):
    assert results[key] == uninterrupted[key], key


HOLD_LOCK = f"""
import sys, time
sys.path.insert(0, {ROOT!r})
from tuning.engine import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_held_workdir_is_one_line(tmp_path, capfd):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen(
      [sys.executable, '-c', HOLD_LOCK, workdir],
      stdout=subprocess.PIPE,
      text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    code = main.cli(['main.py', f'--config={TINY}', f'--workdir={workdir}'])
    out, err = capfd.readouterr()
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert f'pid {holder.pid}' in lines[0]
    assert os.path.join(workdir, '.lock') in lines[0]
    assert 'in use by another run' in lines[0]
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
    assert not os.path.exists(os.path.join(workdir, 'config.json'))
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is stale, and taken over.
  with workdir_lock.WorkdirLock(workdir) as lock:
    assert f'pid {holder.pid}' in lock.taken_over
  assert 'took over' in capfd.readouterr().out
  # Released cleanly: the next one takes it without a word.
  with workdir_lock.WorkdirLock(workdir) as lock:
    assert lock.taken_over is None


def test_workdir_lock_is_exclusive_in_one_process(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirError, match='in use'):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
