"""Exponential moving average (EMA) of the parameters.

The train step keeps `state.ema_params` (saved and restored with the rest
of the state) when `config.training.ema_decay` is set; with
`config.training.evaluate_ema=True` validation, the choice of the best
checkpoint and the final test evaluation use the EMA parameters.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def check_config(training_config):
  """Raises a one-line error for an unusable EMA setting."""
  decay = training_config.ema_decay
  if decay is not None and not 0.0 < decay < 1.0:
    raise ValueError(
        f'config.training.ema_decay={decay}: use a value in '
        '(0, 1), e.g. 0.999, or leave it unset'
    )
  if training_config.evaluate_ema and decay is None:
    raise ValueError(
        'config.training.evaluate_ema=True needs '
        'config.training.ema_decay (e.g. 0.999)'
    )


def load_ema_params(checkpoint_dir: str, step: int, target_params):
  """The EMA parameters saved with a run's checkpoint at `step`."""
  path = os.path.join(checkpoint_dir, str(step), 'state')
  metadata = ocp.PyTreeCheckpointer().metadata(path)
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, dict) or not tree.get('ema_params'):
    raise ValueError(
        f'config.training.evaluate_ema=True but the checkpoint '
        f'at step {step} holds no EMA parameters (train with '
        'config.training.ema_decay set)'
    )
  item = {
      'ema_params': jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
          target_params,
      )
  }
  restored = ocp.PyTreeCheckpointer().restore(
      path,
      args=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
      ),
  )
  return jax.tree.map(np.asarray, restored['ema_params'])
