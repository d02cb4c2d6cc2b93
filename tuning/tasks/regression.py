"""Regression: a float target per example, mean-squared-error loss.

For numeric targets such as a similarity score (STS-B) or a property of a
molecule. The model has one output; evaluation accumulates on the device
the sums that give MSE, RMSE, MAE, R^2 and Pearson's r.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from tuning.tasks import base

_SUMS = (
    'squared_error',
    'absolute_error',
    'y',
    'y2',
    'p',
    'p2',
    'yp',
    'examples',
)


def _predictions(outputs):
  return outputs[..., 0].astype(jnp.float32)


class Regression(base.Task):
  """Float targets in `label`; the model outputs one value per example."""

  name = 'regression'
  labels = 'values'
  best_metric = 'loss'
  best_mode = 'min'
  table_columns = (
      ('rmse', 'rmse', 9, '.4f'),
      ('mae', 'mae', 9, '.4f'),
      ('loss', 'loss', 8, '.4f'),
      ('examples', 'examples', 9, 'd'),
  )
  validation_column = ('val loss', 'loss', 8, '.4f')

  def model_dims(self):
    return {
        'num_outputs': 1,
        'vocab_size': self.data.vocab_size(self.config.data),
    }

  @staticmethod
  def loss(outputs, batch):
    error = _predictions(outputs) - batch['label'].astype(jnp.float32)
    return jnp.square(error).sum(), {'mae': jnp.abs(error).sum()}

  @staticmethod
  def loss_weight(batch):
    return jnp.float32(batch['label'].shape[0])

  def eval_rows(self, outputs, batch):
    w = batch['weight'].astype(jnp.float32)
    p = _predictions(outputs)
    y = batch['label'].astype(jnp.float32)
    values = {
        'squared_error': jnp.square(p - y),
        'absolute_error': jnp.abs(p - y),
        'y': y,
        'y2': y * y,
        'p': p,
        'p2': p * p,
        'yp': y * p,
        'examples': jnp.ones_like(y),
    }
    return {k: v * w for k, v in values.items()}

  def metrics(self, totals):
    t = {k: float(totals[k]) for k in _SUMS}
    n = max(t['examples'], 1.0)
    mse = t['squared_error'] / n
    var_y = max(t['y2'] / n - (t['y'] / n) ** 2, 0.0)
    var_p = max(t['p2'] / n - (t['p'] / n) ** 2, 0.0)
    cov = t['yp'] / n - (t['y'] / n) * (t['p'] / n)
    return {
        'loss': mse,
        'mse': mse,
        'rmse': math.sqrt(mse),
        'mae': t['absolute_error'] / n,
        'r2': 1.0 - mse / var_y if var_y > 0 else 0.0,
        'pearson': cov / math.sqrt(var_y * var_p) if var_y * var_p > 0 else 0.0,
        'examples': int(round(t['examples'])),
    }

  def scalars(self, metrics):
    return {k: metrics[k] for k in ('loss', 'rmse', 'mae', 'r2', 'pearson')}

  def summary(self, metrics):
    return (
        f'mse {metrics["mse"]:.4f}  rmse {metrics["rmse"]:.4f}  mae '
        f'{metrics["mae"]:.4f}  r2 {metrics["r2"]:.4f}  pearson '
        f'{metrics["pearson"]:.4f}'
    )


TASK = Regression
