"""tuning/models/bf16_matmul.py: the bfloat16 Dense matmul gives the
values and gradients of a plain bfloat16 dot."""

import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import bf16_matmul

DENSE = (((2,), (0,)), ((), ()))


def _loss(dot):
  def loss(x, w):
    y = dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    return (y.astype(jnp.float32) ** 2).sum()

  return loss


def test_values_and_gradients_equal_a_plain_bfloat16_dot():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  w = 0.1 * jax.random.normal(jax.random.key(1), (16, 8))
  plain = lambda a, b: jax.lax.dot_general(a, b, DENSE)  # noqa: E731
  mine = lambda a, b: bf16_matmul.dot_general(a, b, DENSE)  # noqa: E731
  y = mine(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 8)
  np.testing.assert_array_equal(
      y, plain(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  )
  expected = jax.grad(_loss(plain), (0, 1))(x, w)
  got = jax.grad(_loss(mine), (0, 1))(x, w)
  for e, g in zip(expected, got):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, e, rtol=2e-2, atol=2e-2 * np.abs(e).max())


def test_other_dimension_numbers_fall_back_to_lax():
  a = jnp.ones((3, 4, 5), jnp.bfloat16)
  b = jnp.ones((3, 5, 2), jnp.bfloat16)
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(
      bf16_matmul.dot_general(a, b, batched),
      jax.lax.dot_general(a, b, batched),
  )
