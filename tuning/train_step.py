"""The jitted, data-parallel (`jax.pmap`) train and eval steps.

Randomness is derived inside the step: the step key is
`fold_in(key(seed), step)` and each example's dropout key folds in the
example's position in the *global* batch. The model is applied to one
example at a time under `vmap`, so the dropout masks, and so the results,
do not depend on how many devices or hosts share the batch.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

AXIS = 'batch'
NON_FEATURES = ('label', 'weight', 'index')


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any


def features_of(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k not in NON_FEATURES}


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def per_example_logits(model, params, features, index, rng, train: bool):
  """Applies `model` example by example (vmap) with per-example dropout."""
  def one(feat, i):
    rngs = {'dropout': jax.random.fold_in(rng, i)} if train else {}
    out = model.apply({'params': params},
                      **{k: v[None] for k, v in feat.items()},
                      train=train, rngs=rngs)
    return out[0]
  return jax.vmap(one)(features, index)


def make_train_step(model, tx, schedule, seed: int):
  """Returns a pmapped `(state, batch) -> (state, metrics)`.

  `batch` arrays have a leading device axis; gradients are averaged over
  devices with `pmean`.
  """
  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      logits = per_example_logits(model, params, features_of(batch),
                                  batch['index'], rng, train=True)
      return cross_entropy(logits, batch['label']).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = (logits.argmax(-1) == batch['label']).mean()
    metrics = {
        'loss': jax.lax.pmean(loss, AXIS),
        'accuracy': jax.lax.pmean(correct, AXIS),
        'grad_norm': optax.global_norm(grads),
        'param_norm': optax.global_norm(params),
        'learning_rate': schedule(state.step),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


def make_eval_step(model):
  """Returns a pmapped `(params, batch) -> logits` (float32)."""
  def step(params, batch):
    return model.apply({'params': params}, **features_of(batch), train=False)
  return jax.pmap(step, axis_name=AXIS)
