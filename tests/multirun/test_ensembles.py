"""Ensembles and model soups: unit checks and runs through main.py."""

import os

import numpy as np
import pytest

from conftest import TINY, read_json, run_main_in_process
from tuning.multirun import ensemble
from tuning.multirun import soup


def test_combinations_by_hand():
  a = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  b = np.array([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])
  c = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 4.0]])
  np.testing.assert_allclose(
      ensemble.combine([a, b], 'mean_logits'), (a + b) / 2
  )
  probs = (ensemble.softmax(a) + ensemble.softmax(b)) / 2
  np.testing.assert_allclose(
      ensemble.combine([a, b], 'mean_probs'), np.log(probs)
  )
  # Row 0: one vote each for classes 0, 1, 2 -> the tie goes to the class
  # with the highest mean probability (1: b's softmax is the most peaked).
  votes = ensemble.combine([a, b, c], 'vote').argmax(-1)
  mean = ensemble.combine([a, b, c], 'mean_probs').argmax(-1)
  assert votes[0] == mean[0] == 1
  assert votes[1] == 1  # two of three vote for class 1 ...
  assert mean[1] == 2  # ... though the mean probability prefers class 2


def test_average_and_architecture_check():
  t1 = {'dense': {'kernel': np.ones((2, 3), np.float32)}}
  t2 = {'dense': {'kernel': np.full((2, 3), 3.0, np.float32)}}
  avg = soup.average([t1, t2])
  assert avg['dense']['kernel'].dtype == np.float32
  np.testing.assert_array_equal(avg['dense']['kernel'], 2.0)
  np.testing.assert_array_equal(
      soup.average([t1])['dense']['kernel'], t1['dense']['kernel']
  )
  t3 = {'dense': {'kernel': np.ones((2, 4), np.float32)}}
  with pytest.raises(
      ensemble.EnsembleError,
      match=r'dense/kernel is ' r'\(2, 3\) in a but \(2, 4\) in b',
  ):
    soup.check_same_architecture(['a', 'b'], [t1, t3])
  assert soup.greedy_order([0.5, 0.9, 0.7, 0.9]) == [1, 3, 2, 0]


@pytest.fixture(scope='module')
def members(tmp_path_factory):
  """Two tiny runs (seeds 0 and 1) and one of another width."""
  root = tmp_path_factory.mktemp('members')
  dirs = {}
  for name, flags in (
      ('seed0', ()),
      ('seed1', ('--config.seed=1',)),
      ('wide', ('--config.model.hidden=(48,48)',)),
  ):
    dirs[name] = str(root / name)
    run_main_in_process(f'--config={TINY}', f'--workdir={dirs[name]}', *flags)
  return root, dirs


def test_ensemble_of_identical_members_equals_the_member(members):
  root, dirs = members
  workdir = str(root / 'same')
  result = run_main_in_process(
      f'--config={TINY}',
      '--config.mode=ensemble',
      f'--config.ensemble.members=({dirs["seed0"]!r},' f'{dirs["seed0"]!r})',
      f'--workdir={workdir}',
  )
  assert 'ensemble: mean_probs' in result.stdout
  single = read_json(os.path.join(dirs['seed0'], 'results.json'))['test']
  results = read_json(os.path.join(workdir, 'results.json'))
  for how in ensemble.COMBINATIONS:
    got = results['ensemble'][how]['test']
    assert got['accuracy'] == single['accuracy'], how
    assert got['confusion_matrix'] == single['confusion_matrix'], how
    np.testing.assert_allclose(got['loss'], single['loss'], rtol=1e-5)


def test_ensemble_of_seeds_lists_members_beside_it(members):
  root, dirs = members
  workdir = str(root / 'seeds')
  result = run_main_in_process(
      f'--config={TINY}',
      '--config.mode=ensemble',
      f'--config.ensemble.members=({dirs["seed0"]!r},'
      f'{dirs["seed1"]!r},{dirs["wide"]!r})',
      f'--workdir={workdir}',
  )
  results = read_json(os.path.join(workdir, 'results.json'))
  assert set(results['members']) == {'seed0', 'seed1', 'wide'}
  for name in ('seed0', 'seed1', 'wide'):  # each member as it was evaluated
    own = read_json(os.path.join(dirs[name], 'results.json'))['test']
    assert results['members'][name]['test']['accuracy'] == own['accuracy']
    assert f'  {name} ' in result.stdout
  for how in ensemble.COMBINATIONS:
    assert results['ensemble'][how]['test']['examples'] == own['examples']


def test_soup_of_one_is_the_member_and_a_normal_checkpoint(members):
  root, dirs = members
  workdir = str(root / 'soup1')
  run_main_in_process(
      f'--config={TINY}',
      '--config.mode=soup',
      f'--config.soup.members=({dirs["seed0"]!r},)',
      f'--workdir={workdir}',
  )
  single = read_json(os.path.join(dirs['seed0'], 'results.json'))['test']
  results = read_json(os.path.join(workdir, 'results.json'))
  for method in soup.METHODS:
    assert (
        results['soups'][method]['test']['confusion_matrix']
        == single['confusion_matrix']
    )
  # main.py evaluates the written soup like any run ...
  run_main_in_process(
      f'--config={TINY}', '--config.mode=eval', f'--workdir={workdir}'
  )
  evaluated = read_json(os.path.join(workdir, 'results.json'))['test']
  assert evaluated['confusion_matrix'] == single['confusion_matrix']
  np.testing.assert_allclose(evaluated['loss'], single['loss'], rtol=1e-6)
  # ... and fine-tunes from it.
  tuned = str(root / 'from_soup')
  out = run_main_in_process(
      f'--config={TINY}',
      f'--config.init.checkpoint={workdir}',
      '--config.training.total_steps=10',
      f'--workdir={tuned}',
  )
  assert 'init: loaded 6 parameters' in out.stdout


def test_soup_of_two_seeds_and_architecture_error(members):
  root, dirs = members
  workdir = str(root / 'soup2')
  out = run_main_in_process(
      f'--config={TINY}',
      '--config.mode=soup',
      '--config.soup.method=uniform',
      f'--config.soup.members=({dirs["seed0"]!r},' f'{dirs["seed1"]!r})',
      f'--workdir={workdir}',
  )
  assert 'soup: uniform' in out.stdout and 'soup: greedy' in out.stdout
  results = read_json(os.path.join(workdir, 'results.json'))
  assert results['method'] == 'uniform'
  assert 1 <= len(results['greedy_members']) <= 2
  run_main_in_process(
      f'--config={TINY}', '--config.mode=eval', f'--workdir={workdir}'
  )
  evaluated = read_json(os.path.join(workdir, 'results.json'))['test']
  assert (
      evaluated['confusion_matrix']
      == results['soups']['uniform']['test']['confusion_matrix']
  )

  bad = run_main_in_process(
      f'--config={TINY}',
      '--config.mode=soup',
      f'--config.soup.members=({dirs["seed0"]!r},' f'{dirs["wide"]!r})',
      f'--workdir={root / "bad"}',
      check=False,
  )
  assert bad.returncode == 1
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith(
      'error: EnsembleError: soup members must share an '
      'architecture: parameter'
  ), bad.stderr
  assert 'is (32,) in seed0 but (48,) in wide' in last


def test_member_that_is_not_a_run(tmp_path):
  bad = run_main_in_process(
      f'--config={TINY}',
      '--config.mode=ensemble',
      f'--config.ensemble.members=({str(tmp_path)!r},)',
      f'--workdir={tmp_path / "ens"}',
      check=False,
  )
  assert bad.returncode == 1
  assert (
      'has no config.json: a member must be the work directory of a '
      'trained run' in bad.stderr.strip().splitlines()[-1]
  )
