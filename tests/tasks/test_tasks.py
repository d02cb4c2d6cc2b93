"""The task seam: a second task (regression, a mean-squared-error loss)
trains, checkpoints, resumes exactly and runs under pmap and the mesh with
nothing outside its own module knowing it."""

import os

import numpy as np
import pytest

from conftest import TINY, preempted_then_resumed, read_json, run_main
from tuning.modes import experiment
from tuning.engine.checkpoints import RunCheckpoints
from tuning.tasks import classification, regression
from tuning.tasks.registry import task_class
import tiny_config


def write_regression_csv(path, rows=400, seed=0):
  """y = 2 x1 - x2 + 0.5 x3 + noise, four numeric features."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, 4))
  y = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] + 0.1 * rng.normal(size=rows)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('x1,x2,x3,x4,y\n')
    for features, target in zip(x, y):
      f.write(','.join(f'{v:.6f}' for v in features) + f',{target:.6f}\n')
  return float(np.var(y))


def regression_config(csv):
  c = tiny_config.get_config()
  c.task = 'regression'
  c.data.source = 'csv'
  c.data.path = str(csv)
  c.data.label_column = 'y'
  c.model.dropout = 0.0
  c.training.total_steps = 40
  c.training.eval_every_steps = 10
  c.training.checkpoint_every_steps = 10
  return c


@pytest.fixture(scope='module')
def csv(tmp_path_factory):
  path = tmp_path_factory.mktemp('data') / 'regression.csv'
  return path, write_regression_csv(path)


@pytest.fixture(scope='module')
def uninterrupted(csv, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('runs') / 'straight')
  return workdir, experiment.run(regression_config(csv[0]), workdir)


def test_regression_learns_and_reports_its_own_metrics(csv, uninterrupted):
  _, variance = csv
  workdir, results = uninterrupted
  assert results['task'] == 'regression'
  test = results['test']
  assert {'mse', 'rmse', 'mae', 'r2', 'pearson', 'examples'} <= set(test)
  assert test['examples'] == 80  # test_fraction 0.2 of 400 rows
  assert test['mse'] < 0.3 * variance and test['r2'] > 0.7
  np.testing.assert_allclose(test['rmse'] ** 2, test['mse'], rtol=1e-6)
  # The best checkpoint is chosen by the task's metric: validation loss.
  assert read_json(os.path.join(workdir, 'config.json'))['task'] == 'regression'
  history = results['validation_history']
  assert [h['step'] for h in history] == [10, 20, 30, 40]
  best = min(history, key=lambda h: h['loss'])['step']
  checkpoints = RunCheckpoints(
      os.path.join(workdir, 'checkpoints'), 'loss', 'min', read_only=True
  )
  assert checkpoints.best_step() == best
  checkpoints.close()


def test_regression_resumes_exactly(csv, uninterrupted, tmp_path, monkeypatch):
  """SIGTERM after the step-20 checkpoint; the rerun ends as if never
  stopped."""
  results = preempted_then_resumed(
      regression_config(csv[0]), str(tmp_path / 'resumed'), monkeypatch
  )
  expected = uninterrupted[1]
  assert results['test'] == expected['test']
  assert results['validation'] == expected['validation']


def test_regression_under_the_mesh_equals_pmap(csv, uninterrupted, tmp_path):
  workdir = str(tmp_path / 'mesh')
  run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.task=regression',
      '--config.data.source=csv',
      f'--config.data.path={csv[0]}',
      '--config.data.label_column=y',
      '--config.model.dropout=0.0',
      '--config.training.total_steps=40',
      '--config.training.eval_every_steps=10',
      '--config.training.checkpoint_every_steps=10',
      '--config.parallelism=mesh',
      '--config.mesh.fsdp=2',
      devices=4,
  )
  results = read_json(os.path.join(workdir, 'results.json'))
  expected = uninterrupted[1]
  assert results['task'] == 'regression'
  for key in ('mse', 'mae', 'r2'):
    np.testing.assert_allclose(
        results['test'][key], expected['test'][key], rtol=1e-4
    )


def test_tasks_own_their_defaults():
  assert task_class('classification') is classification.Classification
  assert task_class('regression') is regression.Regression
  assert (classification.TASK.best_metric, classification.TASK.best_mode) == (
      'accuracy',
      'max',
  )
  assert (regression.TASK.best_metric, regression.TASK.best_mode) == (
      'loss',
      'min',
  )
  with pytest.raises(
      ValueError,
      match="unknown config.task 'ranking': "
      'choose one of causal_lm, classification, grpo, preference, '
      'regression, seq2seq',
  ):
    task_class('ranking')


def test_classification_totals_on_the_device_equal_the_host_metrics():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 3)).astype(np.float32)
  labels = rng.integers(0, 3, 50)
  weight = (np.arange(50) < 45).astype(np.float32)  # 5 padding rows

  class Data:
    num_classes, class_names = 3, ['a', 'b', 'c']

  class Config:

    class model:  # pylint: disable=invalid-name
      get = staticmethod(lambda key, default=None: None)

  task = classification.Classification(Config, Data)
  batch = {'label': jnp.asarray(labels), 'weight': jnp.asarray(weight)}
  totals = {
      k: np.asarray(v).sum(0)
      for k, v in task.eval_rows(jnp.asarray(logits), batch).items()
  }
  totals.update(task.eval_counts(jnp.asarray(logits), batch))
  got = task.metrics({k: np.asarray(v) for k, v in totals.items()})
  expected = classification.metrics_from_logits(logits[:45], labels[:45], 3)
  for key in (
      'accuracy',
      'macro_f1',
      'confusion_matrix',
      'precision',
      'recall',
      'examples',
  ):
    assert got[key] == expected[key], key
  np.testing.assert_allclose(got['loss'], expected['loss'], rtol=1e-6)
