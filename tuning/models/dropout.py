"""Dropout with one key per example, for a model applied to a whole batch.

The train step's default `dropout_keys='per_example'` wants every example's
dropout masks to depend on that example's key alone, so that results do
not depend on how many devices share the batch nor on how it is cut into
micro-batches. It used to get that by applying the model one example at a
time under `vmap`. That made every dense layer's weight gradient a
contraction over two axes (examples and positions), which XLA:CPU runs as
strided reductions and transposes, slower than the matmuls themselves at
short lengths (issue #14). Instead the model now runs on the whole batch,
and only the mask bits are drawn per example:

    with dropout.per_example(index):   # index: the rows' global positions
      model.apply(..., rngs={'dropout': step_key})

Inside, `Dropout` (and LoRA's input dropout, through `keep_mask`) derives
its key as usual (`make_rng`), folds in each row's global index, and draws
that row's mask from its own key. An input's leading axis must be the
batch's rows, or rows times something in row-major order (a [rows *
length, features] view of [rows, length, features]): each row then gets
the mask it would get from the [rows, length, features] view. Outside the
context, `Dropout` is Flax's.
"""

from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

_INDEX = contextvars.ContextVar('dropout_example_index', default=None)


@contextlib.contextmanager
def per_example(index):
  """Inside, dropout masks are drawn per row of `index` (int [rows])."""
  token = _INDEX.set(index)
  try:
    yield
  finally:
    _INDEX.reset(token)


def keep_mask(key, keep_prob: float, shape) -> jnp.ndarray:
  """Bernoulli(keep_prob) mask of `shape`: from `key` alone, or inside
  `per_example`, row by row from `fold_in(key, index[row])`."""
  index = _INDEX.get()
  if index is None:
    return jax.random.bernoulli(key, keep_prob, shape)
  rows = index.shape[0]
  size = int(np.prod(shape, dtype=np.int64))
  if not shape or shape[0] % rows:
    raise ValueError(
        f'per-example dropout: an input of shape {tuple(shape)} does not '
        f'start with the batch of {rows} rows; use '
        "config.training.dropout_keys='per_shard' for this model"
    )
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
  masks = jax.vmap(
      lambda k: jax.random.bernoulli(k, keep_prob, (size // rows,))
  )(keys)
  return masks.reshape(shape)


class Dropout(nn.Dropout):
  """`flax.linen.Dropout` whose masks follow `per_example` when it is on."""

  def __call__(self, inputs, deterministic=None, rng=None):
    if (
        _INDEX.get() is None
        or self.rate == 0
        or nn.merge_param('deterministic', self.deterministic, deterministic)
    ):
      return super().__call__(inputs, deterministic, rng)
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    keep_prob = 1.0 - self.rate
    mask = jnp.broadcast_to(keep_mask(rng, keep_prob, shape), inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
