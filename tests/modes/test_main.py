"""End-to-end runs of main.py on tiny configs: in this process (`main.cli`,
what main.py runs) where the process is not the point, as a subprocess for
eight devices, a kill, a fresh process's bits and main.py's flag errors."""

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import (
    ROOT,
    TINY,
    assert_same_training,
    final_params,
    flat,
    main_command,
    read_json,
    run_main,
    run_main_in_process,
    subprocess_env,
    train_losses,
)


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
  """(work directory, stdout) of one run of the tiny config; tests that
  change the directory copy it."""
  workdir = str(tmp_path_factory.mktemp('default') / 'run')
  out = run_main_in_process(f'--config={TINY}', f'--workdir={workdir}').stdout
  return workdir, out


def test_run_writes_everything_a_workdir_holds(default_run):
  workdir, out = default_run
  assert 'steps/s' in out and 'examples/s' in out and 'ETA' in out
  assert 'validation at step 20' in out
  assert 'confusion matrix' in out
  for name in ('config.json', 'metrics.jsonl', 'results.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  config = read_json(os.path.join(workdir, 'config.json'))
  assert config['training']['total_steps'] == 40
  results = read_json(os.path.join(workdir, 'results.json'))
  test = results['test']
  # 40 steps of a dropout-0.5 MLP land near 0.5 (0.49-0.51 across dropout
  # bit generators); 10 classes: chance is 0.1.
  assert test['examples'] == 359 and 0.3 < test['accuracy'] <= 1
  assert len(test['confusion_matrix']) == 10
  assert np.sum(test['confusion_matrix']) == 359
  assert len(test['precision']) == len(test['recall']) == 10
  assert 0 < test['macro_f1'] <= 1
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert events and events[0].startswith('events.out.tfevents')
  # Only the latest and the best checkpoints are kept.
  kept = [
      s for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()
  ]
  assert 1 <= len(kept) <= 2 and '40' in kept


def test_tensorboard_events_hold_the_logged_scalars(default_run):
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  workdir, _ = default_run
  tb = os.path.join(workdir, 'tensorboard')
  data = open(os.path.join(tb, os.listdir(tb)[0]), 'rb').read()
  tags, pos = set(), 0
  while pos < len(data):  # TFRecord: length, crc, payload, crc
    length = int.from_bytes(data[pos : pos + 8], 'little')
    event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    tags.update(v.tag for v in event.summary.value)
    pos += 16 + length
  assert {'train/loss', 'train/learning_rate', 'validation/accuracy'} <= tags


def test_same_seed_same_numbers_bitwise(default_run, tmp_path):
  # The same numbers in a fresh process as in this one.
  a, b = default_run[0], str(tmp_path / 'b')
  run_main(f'--config={TINY}', f'--workdir={b}')
  assert train_losses(a) == train_losses(b)
  pa, pb = flat(final_params(a)[1]), flat(final_params(b)[1])
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k])
  c = str(tmp_path / 'c')
  run_main_in_process(f'--config={TINY}', f'--workdir={c}', '--config.seed=1')
  assert train_losses(a) != train_losses(c)


def test_eight_devices_match_one_device(default_run, tmp_path):
  one, eight = default_run[0], str(tmp_path / 'eight')
  out = run_main(f'--config={TINY}', f'--workdir={eight}', devices=8).stdout
  assert 'on 8 device(s) x 1 process(es)' in out
  assert_same_training(eight, one)


def test_resume_after_kill_ends_with_the_same_parameters(tmp_path):
  # Killed after the checkpoint of step 300, well before the end.
  total = 1000
  args = [
      f'--config={TINY}',
      f'--config.training.total_steps={total}',
      '--config.training.checkpoint_every_steps=100',
      '--config.training.eval_every_steps=1000',
  ]
  full = str(tmp_path / 'full')
  run_main_in_process(*args, f'--workdir={full}')

  killed = str(tmp_path / 'killed')
  env = subprocess_env()
  proc = subprocess.Popen(
      main_command(*args, f'--workdir={killed}'),
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  ckpts = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    steps = (
        [int(s) for s in os.listdir(ckpts) if s.isdigit()]
        if os.path.isdir(ckpts)
        else []
    )
    if steps and max(steps) >= 300:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, 'the run ended before the kill'
  step_at_kill, _ = final_params(killed)
  assert 300 <= step_at_kill < total

  out = run_main_in_process(*args, f'--workdir={killed}').stdout
  assert f'resumed from' in out
  full_step, full_params = final_params(full)
  resumed_step, resumed_params = final_params(killed)
  assert full_step == resumed_step == total
  pf, pr = flat(full_params), flat(resumed_params)
  for k in pf:
    np.testing.assert_array_equal(pr[k], pf[k])
  assert (
      read_json(os.path.join(full, 'results.json'))['test']
      == read_json(os.path.join(killed, 'results.json'))['test']
  )


def test_finetune_from_pretrained_reinitialises_the_head(tmp_path):
  source = str(tmp_path / 'source')
  run_main_in_process(
      f'--config={TINY}',
      f'--workdir={source}',
      '--config.data.classes=(0,1,2,3,4)',
  )
  target = str(tmp_path / 'target')
  out = run_main_in_process(
      f'--config={TINY}',
      f'--workdir={target}',
      '--config.data.classes=(5,6,7,8,9,0,1)',
      f'--config.init.checkpoint={source}',
      "--config.init.reinit=('head/.*',)",
      "--config.optimizer.frozen=('dense_.*',)",
  ).stdout
  assert 'init: loaded 4 parameters' in out
  assert 'init: re-initialised: head/bias, head/kernel' in out
  assert 'init: left out (in the checkpoint, not in the model): none' in out
  # The frozen body is exactly the pretrained one; the new head trained.
  src, tgt = flat(final_params(source)[1]), flat(final_params(target)[1])
  for k in ('dense_0/kernel', 'dense_0/bias', 'dense_1/kernel'):
    np.testing.assert_array_equal(tgt[k], src[k])
  assert tgt['head/kernel'].shape == (32, 7)
  assert (
      read_json(os.path.join(target, 'results.json'))['test']['accuracy']
      > 1 / 7
  )  # above chance


def test_changed_head_without_reinit_is_an_error_naming_both_shapes(tmp_path):
  source = str(tmp_path / 'source')
  run_main_in_process(
      f'--config={TINY}',
      f'--workdir={source}',
      '--config.training.total_steps=5',
      '--config.data.classes=(0,1,2,3,4)',
  )
  result = run_main_in_process(
      f'--config={TINY}',
      f'--workdir={tmp_path / "t"}',
      f'--config.init.checkpoint={source}',
      check=False,
  )
  assert result.returncode == 1
  err = result.stderr.strip().splitlines()[-1]
  assert 'head/kernel: checkpoint has (32, 5), model wants (32, 10)' in err
  assert 'head/bias: checkpoint has (5,), model wants (10,)' in err
  assert 'config.init.reinit' in err
  missing = run_main_in_process(
      f'--config={TINY}',
      f'--workdir={tmp_path / "m"}',
      f'--config.init.checkpoint={tmp_path / "nowhere"}',
      check=False,
  )
  assert missing.returncode == 1
  assert 'init checkpoint not found' in missing.stderr


@pytest.mark.parametrize(
    'flag,expected',
    [
        (
            '--config.optimizer.lrr=1e-3',
            "unknown config key --config.optimizer.lrr ('lrr' is not a field of "
            'optimizer); did you mean --config.optimizer.learning_rate?',
        ),
        ('--config=experiments/nope.py', 'config file not found'),
        (f'--config={TINY}:bogus=1', "unknown argument 'bogus'"),
    ],
)
def test_bad_config_flags_are_one_line_errors(flag, expected):
  result = run_main(flag, check=False, timeout=60)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], result.stderr


def test_eval_mode_on_an_existing_checkpoint(default_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(default_run[0], workdir)
  trained = read_json(os.path.join(workdir, 'results.json'))['test']
  os.remove(os.path.join(workdir, 'results.json'))
  out = run_main_in_process(
      f'--config={TINY}', f'--workdir={workdir}', '--config.mode=eval'
  ).stdout
  assert 'confusion matrix' in out
  assert read_json(os.path.join(workdir, 'results.json'))['test'] == trained
  empty = run_main_in_process(
      f'--config={TINY}',
      f'--workdir={tmp_path / "none"}',
      '--config.mode=eval',
      check=False,
  )
  assert empty.returncode == 1 and 'no checkpoint in' in empty.stderr


def test_own_csv_file_end_to_end(tmp_path):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  path = tmp_path / 'digits.csv'
  with open(path, 'w') as f:
    f.write(','.join(f'p{i}' for i in range(64)) + ',label\n')
    for x, y in zip(digits.data[:600], digits.target[:600]):
      f.write(','.join(str(int(v)) for v in x) + f',{y}\n')
    f.write(','.join(['1'] * 63) + ',,3\n')  # a missing value: cleaned
  out = run_main_in_process(
      f'--config={TINY}',
      f'--workdir={tmp_path / "run"}',
      '--config.data.source=csv',
      f'--config.data.path={path}',
  ).stdout
  assert 'train: dropped 1 rows (missing/NaN feature)' in out
  results = read_json(str(tmp_path / 'run' / 'results.json'))
  assert results['test']['examples'] == 120  # 20% of 600 rows (one dropped)
