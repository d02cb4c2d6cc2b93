"""Sweeps: tiny grids of real main.py runs, and a stand-in main.py (no JAX)
for sampling and pruning, which only need metrics.jsonl and results.json."""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest

from tuning.sweep import space as sweep_space
from tuning.sweep import study as sweep_study
from tuning.sweep import trials as sweep_trials

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
CONFIG = os.path.join(ROOT, 'experiments', 'digits_mlp.py')
SHORT = '--config.training.total_steps=20'

# Writes one validation line per step (accuracy = the learning rate), then
# results.json; like main.py it appends to metrics.jsonl.
FAKE_MAIN = """
import json, os, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
workdir = args['workdir']
lr = float(args['config.optimizer.learning_rate'])
with open(os.path.join(workdir, 'config.json'), 'w') as f:
  json.dump({'training': {'total_steps': 8}}, f)
metrics = {'accuracy': lr, 'macro_f1': lr, 'loss': 1 - lr}
with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
  for step in range(1, 9):
    time.sleep(0.25)
    f.write(json.dumps({'step': step, 'split': 'validation', **metrics}) + '\\n')
    f.flush()
with open(os.path.join(workdir, 'results.json'), 'w') as f:
  json.dump({'test': metrics, 'validation': metrics, 'steps': 8}, f)
"""


def run_sweep(*args, check=True, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'tuning.sweep', *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  if check and result.returncode != 0:
    raise AssertionError(
        f'sweep failed ({result.returncode}):\n'
        f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    )
  return result


def report_rows(workdir):
  with open(os.path.join(workdir, 'report.csv'), encoding='utf-8') as f:
    return list(csv.DictReader(f))


def study_trials(workdir):
  return sweep_study.load_study(workdir).get_trials()


@pytest.fixture
def fake_main(tmp_path):
  path = tmp_path / 'fake_main.py'
  path.write_text(FAKE_MAIN)
  return str(path)


def test_grid_runs_in_parallel_and_a_rerun_runs_nothing_again(tmp_path):
  workdir = str(tmp_path / 'sweep')
  args = [
      f'--config={CONFIG}',
      f'--workdir={workdir}',
      '--sweep=optimizer.learning_rate=3e-3,3e-2',
      SHORT,
      '--parallel=2',
  ]
  out = run_sweep(*args).stdout
  assert out.count(': started') == 2 and out.count(': done in') == 2
  rows = report_rows(workdir)
  assert sorted(r['trial'] for r in rows) == [
      'learning_rate=0.003',
      'learning_rate=0.03',
  ]
  assert all(r['state'] == 'complete' for r in rows)
  values = [float(r['best_validation_accuracy']) for r in rows]
  assert values == sorted(values, reverse=True)  # best first
  for row in rows:
    assert 0 < float(row['test_accuracy']) <= 1 and row['steps'] == '20'
    assert float(row['wall_time_s']) > 0
    with open(os.path.join(workdir, row['trial'], 'results.json')) as f:
      results = json.load(f)
    assert results['test']['accuracy'] == float(row['test_accuracy'])
  with open(os.path.join(workdir, 'report.md'), encoding='utf-8') as f:
    assert 'learning_rate=0.03' in f.read()
  assert os.path.getsize(os.path.join(workdir, 'report.png')) > 1000

  logs = sorted(glob.glob(os.path.join(workdir, '*', 'log.txt')))
  before = {p: os.path.getmtime(p) for p in logs}
  out = run_sweep(*args).stdout
  assert 'none left to run' in out and ': started' not in out
  assert {p: os.path.getmtime(p) for p in logs} == before
  assert len(study_trials(workdir)) == 2
  # The report on demand, from the study alone.
  out = run_sweep('report', f'--workdir={workdir}').stdout
  assert 'trials: 2 complete' in out and 'learning_rate=0.003' in out


def test_a_failing_trial_is_reported_and_the_others_complete(tmp_path):
  workdir = str(tmp_path / 'sweep')
  out = run_sweep(
      f'--config={CONFIG}',
      f'--workdir={workdir}',
      '--sweep=optimizer.name=adam,nope',
      SHORT,
      '--parallel=2',
  ).stdout
  assert 'FAILED' in out
  rows = {r['trial']: r for r in report_rows(workdir)}
  assert rows['name=adam']['state'] == 'complete'
  assert rows['name=nope']['state'] == 'failed'
  assert "unknown config.optimizer.name 'nope'" in rows['name=nope']['error']
  assert list(rows) == ['name=adam', 'name=nope']  # no value: last


def test_a_killed_sweep_resumes_its_trial_from_the_checkpoint(tmp_path):
  workdir = str(tmp_path / 'sweep')
  args = [
      f'--config={CONFIG}',
      f'--workdir={workdir}',
      '--sweep=optimizer.learning_rate=3e-3',
      '--config.training.total_steps=600',
  ]
  proc = subprocess.Popen(
      [sys.executable, '-m', 'tuning.sweep', *args],
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  trial_dir = os.path.join(workdir, 'learning_rate=0.003')
  checkpoints = os.path.join(trial_dir, 'checkpoints')
  deadline = time.time() + 120
  while not (
      os.path.isdir(checkpoints)
      and any(  # a finished checkpoint
          name.isdigit() for name in os.listdir(checkpoints)
      )
  ):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  with open(os.path.join(trial_dir, 'trial.json'), encoding='utf-8') as f:
    child = json.load(f)['pid']
  for pid in (proc.pid, child):  # as if the machine went down
    os.kill(pid, signal.SIGKILL)
  proc.wait()
  time.sleep(0.5)

  out = run_sweep(*args).stdout
  assert 'trial 0 was left running by a stopped sweep' in out
  assert '(resuming trial 0)' in out
  with open(os.path.join(trial_dir, 'log.txt'), encoding='utf-8') as f:
    assert 'resumed from' in f.read()
  rows = report_rows(workdir)
  assert [(r['trial'], r['state'], r['steps']) for r in rows] == [
      ('learning_rate=0.003', 'complete', '600')
  ]


def test_dry_run_prints_the_exact_commands_and_runs_nothing(tmp_path):
  workdir = str(tmp_path / 'sweep')
  out = run_sweep(
      f'--config={CONFIG}', f'--workdir={workdir}', '--dry_run', SHORT
  ).stdout
  commands = [line for line in out.splitlines() if not line.startswith('#')]
  expected = []
  for lr in ('0.001', '0.01'):
    for hidden, dropout, name in (
        ('(32,)', '0.0', '32,dropout=0'),
        ('(64, 64)', '0.2', '64-64,dropout=0.2'),
    ):
      expected.append(
          f'{sys.executable} {ROOT}/main.py --config={CONFIG} '
          f'--workdir={workdir}/learning_rate={lr},hidden={name} {SHORT} '
          f'--config.optimizer.learning_rate={lr} '
          f"'--config.model.hidden={hidden}' --config.model.dropout={dropout}"
      )
  assert commands == expected
  assert not os.path.exists(workdir)
  out = run_sweep(
      f'--config={CONFIG}:tpe',
      f'--workdir={workdir}',
      '--dry_run',
      '--parallel=2',
  ).stdout
  assert out.splitlines()[1] == (
      f'cd {ROOT} && {sys.executable} -m tuning.sweep --config={CONFIG}:tpe '
      f'--workdir={workdir} --storage=sqlite:///{workdir}/study.db '
      '--study_name=sweep --parallel=2'
  )


def test_an_unknown_swept_key_is_a_one_line_error(tmp_path):
  result = run_sweep(
      f'--config={CONFIG}',
      f'--workdir={tmp_path}/s',
      '--sweep=optimizer.learnig_rate=1e-3,1e-2',
      check=False,
  )
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1
  assert 'did you mean --config.optimizer.learning_rate' in result.stderr
  result = run_sweep(
      f'--config={CONFIG}',
      f'--workdir={tmp_path}/s',
      '--config.training.totl_steps=3',
      check=False,
  )
  assert result.returncode == 2 and result.stderr.count('\n') == 1
  assert not os.path.exists(f'{tmp_path}/s')


def test_command_line_sweeps_parse_to_a_spec():
  spec = sweep_space.parse_cli(
      'optimizer.learning_rate=1e-3,3e-3;model.hidden=(32,),(64,64);'
      'optimizer.name=adam,sgd;model.dropout=uniform(0,0.5)'
  )
  assert spec['grid'] == {
      'optimizer.learning_rate': (1e-3, 3e-3),
      'model.hidden': ((32,), (64, 64)),
      'optimizer.name': ('adam', 'sgd'),
  }
  assert spec['space'] == {'model.dropout': ('uniform', 0, 0.5)}
  with pytest.raises(sweep_space.SweepError, match='not both'):
    sweep_space.normalize(spec)
  spec = sweep_space.normalize(
      sweep_space.parse_cli(
          'seed=0,1', 'model.hidden=(32,),(64,);' 'model.dropout=0.0,0.1'
      )
  )
  assert spec['trials'] == 4 and spec['direction'] == 'maximize'
  assert sweep_space.grid_points(spec)[1] == {
      'seed': '0',
      'model.hidden': '(64,)',
      'model.dropout': '0.1',
  }
  with pytest.raises(sweep_space.SweepError, match='one length'):
    sweep_space.normalize(
        sweep_space.parse_cli(None, 'seed=0,1;model.dropout=0.0')
    )
  with pytest.raises(sweep_space.SweepError, match='trial budget'):
    sweep_space.normalize({'space': {'seed': ('int', 0, 9)}})


def test_random_sampler_runs_its_trial_budget(tmp_path, fake_main):
  workdir = str(tmp_path / 'sweep')
  spec = {
      'space': {'optimizer.learning_rate': ('loguniform', 0.01, 0.5)},
      'trials': 3,
      'sampler': 'random',
      'pruner': None,
  }
  s = sweep_study.prepare(CONFIG, workdir, spec, main=fake_main)
  sweep_trials.run(s, parallel=2, devices='none', out=lambda _: None)
  rows = report_rows(workdir)
  assert sorted(r['trial'] for r in rows) == [
      'trial_000',
      'trial_001',
      'trial_002',
  ]
  values = [float(r['optimizer.learning_rate']) for r in rows]
  assert all(0.01 <= v <= 0.5 for v in values)
  assert values == sorted(values, reverse=True)  # accuracy = learning rate


def test_median_pruning_stops_a_trial_that_trails(tmp_path, fake_main):
  workdir = str(tmp_path / 'sweep')
  # GridSampler shuffles the grid by its seed: seed 1 runs 0.9 first.
  spec = {
      'grid': {'optimizer.learning_rate': (0.9, 0.1)},
      'pruner': 'median',
      'pruner_args': {'n_startup_trials': 1},
      'seed': 1,
  }
  s = sweep_study.prepare(CONFIG, workdir, spec, main=fake_main)
  study = sweep_trials.run(s, parallel=1, devices='none', out=lambda _: None)
  assert study.trials[0].params == {'optimizer.learning_rate': 0.9}
  states = {t.user_attrs['trial_dir']: t.state for t in study.trials}
  assert states == {
      'learning_rate=0.9': optuna.trial.TrialState.COMPLETE,
      'learning_rate=0.1': optuna.trial.TrialState.PRUNED,
  }
  with open(os.path.join(workdir, 'learning_rate=0.1', 'metrics.jsonl')) as f:
    lines = f.readlines()
  assert len(lines) < 8  # stopped early
  assert {r['trial']: r['state'] for r in report_rows(workdir)} == {
      'learning_rate=0.9': 'complete',
      'learning_rate=0.1': 'pruned',
  }


def test_a_stopped_sweep_resumes_each_trial_in_its_directory(
    tmp_path, fake_main
):
  workdir = str(tmp_path / 'sweep')
  spec = {'grid': {'optimizer.learning_rate': (0.2, 0.4)}}
  s = sweep_study.prepare(CONFIG, workdir, spec, main=fake_main)
  lines = []

  def out(line):  # Ctrl-C half a second after both trials have started
    lines.append(line)
    if sum(': started' in l for l in lines) == 2 and ': started' in line:
      threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()

  with pytest.raises(
      sweep_trials.Interrupted
  ):  # Ctrl-C: runs stopped, re-queued
    sweep_trials.run(s, parallel=2, devices='none', out=out)
  assert sum('stopped; rerun' in line for line in lines) == 2
  lines.clear()
  study = sweep_trials.run(s, parallel=2, devices='none', out=lines.append)
  assert sum('(resuming trial' in line for line in lines) == 2
  assert {r['trial']: r['state'] for r in report_rows(workdir)} == {
      'learning_rate=0.4': 'complete',
      'learning_rate=0.2': 'complete',
  }
  assert len(study.trials) == 4  # 2 stopped, 2 resumed: each pair one dir
  for name in ('learning_rate=0.2', 'learning_rate=0.4'):
    with open(os.path.join(workdir, name, 'log.txt')) as f:
      assert f.read().count('=== trial') == 2


def test_process_flags_are_passed_on_to_every_trial(tmp_path, capsys):
  from tuning.cli import sweep as sweep_cli  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / 'sweep')
  args = [f'--config={CONFIG}', f'--workdir={workdir}', '--dry_run', SHORT]
  assert sweep_cli.main(args + ['--malloc=default']) == 0
  commands = [
      line
      for line in capsys.readouterr().out.splitlines()
      if not line.startswith('#')
  ]
  assert len(commands) == 4
  assert all(f'{SHORT} --malloc=default --config.' in c for c in commands)
  assert sweep_cli.main(args) == 0  # not given: main.py's own defaults
  assert '--malloc' not in capsys.readouterr().out
