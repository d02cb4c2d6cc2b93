"""The one loader of finished runs (tuning/multirun/finished_run.py): which
folders are runs, which checkpoint is chosen, EMA parameters where the run
evaluated with them, and the errors that name the setting to fix."""

import dataclasses
import json
import os

import numpy as np
import optax
import pytest

from tuning.config.defaults import base_config
from tuning.engine.checkpoints import RunCheckpoints
from tuning.engine.train_step import initial_state
from tuning.multirun import finished_run


def _params(value: float) -> dict:
  return {'dense': {'kernel': np.full((2, 3), value, np.float32)}}


def write_run(path, steps_losses, evaluate_ema=False):
  """A run work directory: config.json (best = lowest loss) and one
  checkpoint per (step, validation loss), params = the step's number, EMA
  params = ten times it."""
  config = base_config()
  config.checkpoint.best_metric, config.checkpoint.best_mode = 'loss', 'min'
  config.checkpoint.keep = len(steps_losses)
  config.training.ema_decay = 0.9 if evaluate_ema else None
  config.training.evaluate_ema = evaluate_ema
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f)
  checkpoints = RunCheckpoints(
      os.path.join(path, 'checkpoints'), 'loss', 'min', keep=len(steps_losses)
  )
  for step, loss in steps_losses:
    state = dataclasses.replace(
        initial_state(_params(step), optax.sgd(0.1), ema=True),
        ema_params=_params(10 * step),
    )
    checkpoints.save(step, state, {}, metrics={'loss': loss})
  checkpoints.wait()
  checkpoints.close()
  return str(path), finished_run.run_config(str(path))


def kernel(params) -> float:
  return float(params['dense']['kernel'][0, 0])


def test_which_folders_are_run_work_directories(tmp_path):
  run, _ = write_run(tmp_path / 'run', [(1, 1.0)])
  assert finished_run.is_run_workdir(run)
  config_only = tmp_path / 'not_trained'  # a run's config, no checkpoint yet
  config_only.mkdir()
  (config_only / 'config.json').write_text(
      json.dumps({'task': 'causal_lm', 'model': {}, 'training': {}})
  )
  assert finished_run.is_run_workdir(str(config_only))
  converted = tmp_path / 'converted'  # python -m tuning.convert's folder
  (converted / 'params').mkdir(parents=True)
  (converted / 'config.json').write_text('{"model_type": "marian"}')
  assert not finished_run.is_run_workdir(str(converted))
  hugging_face = tmp_path / 'hf'
  hugging_face.mkdir()
  (hugging_face / 'config.json').write_text('{"model_type": "bert"}')
  assert not finished_run.is_run_workdir(str(hugging_face))
  assert not finished_run.is_run_workdir(str(tmp_path / 'nowhere'))


def test_best_latest_and_a_step_restore_against_the_target(tmp_path):
  run, config = write_run(tmp_path / 'run', [(1, 3.0), (2, 1.0), (3, 2.0)])
  target = _params(0.0)
  for which, step in (('best', 2), ('latest', 3), (1, 1)):
    params, chosen = finished_run.restore(run, config, target, which)
    assert chosen == step and kernel(params) == step
  with pytest.raises(ValueError, match='checkpoint has .2, 3., model wants'):
    finished_run.restore(
        run, config, {'dense': {'kernel': np.zeros((3, 3), np.float32)}}
    )


def test_ema_parameters_where_the_run_evaluated_with_them(tmp_path):
  run, config = write_run(tmp_path / 'ema', [(1, 3.0), (2, 1.0)], True)
  params, step = finished_run.restore(run, config, _params(0.0), 'best')
  assert step == 2 and kernel(params) == 20.0
  plain, plain_config = write_run(tmp_path / 'plain', [(1, 3.0), (2, 1.0)])
  params, _ = finished_run.restore(plain, plain_config, _params(0.0), 2)
  assert kernel(params) == 2.0


def test_errors_name_the_setting_to_fix(tmp_path):
  run, config = write_run(tmp_path / 'run', [(1, 3.0), (2, 1.0)])
  target = _params(0.0)
  with pytest.raises(
      finished_run.FinishedRunError,
      match=r'no checkpoint step 7 in .* \(steps there: 1, 2\): set '
      'config.soup.last_checkpoints to one of them',
  ):
    finished_run.restore(
        run, config, target, 7, setting='config.soup.last_checkpoints'
    )
  with pytest.raises(
      finished_run.FinishedRunError,
      match="--step='last': use best, latest or a step number",
  ):
    finished_run.restore(run, config, target, 'last')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(
      finished_run.FinishedRunError,
      match='no checkpoint in .*: train first, or point --workdir at',
  ):
    finished_run.restore(str(empty), config, target, where='--workdir')
  with pytest.raises(
      finished_run.FinishedRunError,
      match='train it first, or point config.ensemble.members at',
  ):
    finished_run.restore(
        str(empty), config, target, where='config.ensemble.members'
    )
