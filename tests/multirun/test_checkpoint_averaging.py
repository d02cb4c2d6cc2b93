"""Checkpoint averaging (mode=soup with soup.run): the mean of the last N
checkpoints of one run, evaluated through its task and written as a
checkpoint that main.py evaluates; checkpoint.keep and its errors."""

import os

import numpy as np
import pytest

import main
from conftest import TINY, enable_compilation_cache, error_lines, flat
from conftest import read_json
from tuning.multirun import soup


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A tiny classification run checkpointed at 10, 20, 30, 40, keeping 3."""
  enable_compilation_cache()
  workdir = str(tmp_path_factory.mktemp('averaging') / 'run')
  args = [
      'main.py',
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.training.checkpoint_every_steps=10',
      '--config.checkpoint.keep=3',
  ]
  assert main.cli(args) == 0
  return workdir


def _params(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state')
  )
  return flat(state['params'])


def test_average_of_last_two_is_their_mean(run_dir, tmp_path, capfd):
  steps = sorted(
      int(s) for s in os.listdir(os.path.join(run_dir, 'checkpoints'))
      if s.isdigit()
  )  # fmt: skip
  assert steps[-3:] == [20, 30, 40]  # keep=3 latest (the best may add one)
  workdir = str(tmp_path / 'avg')
  args = [
      'main.py',
      f'--config={TINY}',
      '--config.mode=soup',
      f'--config.soup.run={run_dir}',
      '--config.soup.last_checkpoints=2',
      f'--workdir={workdir}',
  ]
  assert main.cli(args) == 0
  out = capfd.readouterr().out
  assert 'test split, the last 2 checkpoints' in out
  assert 'step 30' in out and 'step 40' in out and 'average of 2' in out
  results = read_json(os.path.join(workdir, 'results.json'))
  assert results['averaged_steps'] == [30, 40]
  assert set(results['checkpoints']) == {'30', '40'}
  assert 0.0 <= results['test']['accuracy'] <= 1.0
  # The written checkpoint holds the element-wise mean of steps 30 and 40.
  a, b = _params(run_dir, 30), _params(run_dir, 40)
  written = _params(workdir, 0)
  assert written.keys() == a.keys()
  for k in a:
    assert not np.allclose(a[k], b[k])  # the test would not tell otherwise
    np.testing.assert_allclose(written[k], (a[k] + b[k]) / 2, rtol=1e-6)
  # main.py evaluates it like any run, with the same test metrics.
  assert main.cli(['main.py', f'--config={TINY}', '--config.mode=eval',
                   f'--workdir={workdir}']) == 0  # fmt: skip
  evaluated = read_json(os.path.join(workdir, 'results.json'))['test']
  assert evaluated['accuracy'] == results['test']['accuracy']
  np.testing.assert_allclose(evaluated['loss'], results['test']['loss'],
                             rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    'extra,words',
    [
        (('--config.soup.last_checkpoints=4',), ('kept only its latest 3',
                                                  'checkpoint.keep=4')),
        ((), ('needs config.soup.last_checkpoints',)),
        (('--config.soup.last_checkpoints=2',
          '--config.soup.members=("/x",)'), ('not both',)),
        (('--config.soup.last_checkpoints=0',), ('soup.last_checkpoints',)),
    ],
)  # fmt: skip
def test_one_line_errors(run_dir, tmp_path, capfd, extra, words):
  args = [
      'main.py',
      f'--config={TINY}',
      '--config.mode=soup',
      f'--config.soup.run={run_dir}',
      f'--workdir={tmp_path / "avg"}',
      *extra,
  ]
  assert main.cli(args) != 0
  err = capfd.readouterr().err
  lines = error_lines(err)
  assert len(lines) == 1, err
  for word in words:
    assert word in lines[0], lines[0]


def test_last_steps_needs_enough_checkpoints(tmp_path):
  for step in (5, 10):
    os.makedirs(tmp_path / str(step))
  assert soup.last_steps(str(tmp_path), 2, 2) == [5, 10]
  with pytest.raises(soup.FinishedRunError, match='holds 2 checkpoints'):
    soup.last_steps(str(tmp_path), 3, 5)
