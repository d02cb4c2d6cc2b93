"""tuning/platform/bf16_matmul.py: a bfloat16 `nn.Dense` with its
`dense_options` (as the models build on CPU) gives the values and gradients
of a plain bfloat16 Dense, and XLA runs every one of its dots, forward and
backward, on bfloat16 operands (as the tied output layer's); without the
options, the backward dots run in float32."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import fresh_python_stdout
from tuning.platform import bf16_matmul


def _reference(x, kernel, bias):
  """What autodiff of a plain bfloat16 Dense computes (float32 params)."""
  y = x.astype(jnp.bfloat16) @ kernel.astype(jnp.bfloat16)
  return (y.astype(jnp.float32) + bias).astype(jnp.bfloat16)


def _loss(fn):
  def loss(x, kernel, bias):
    return (fn(x, kernel, bias).astype(jnp.float32) ** 2).sum()

  return loss


def _inputs(m_shape=(2, 5), k=16, n=8):
  x = jax.random.normal(jax.random.key(0), (*m_shape, k))
  kernel = 0.1 * jax.random.normal(jax.random.key(1), (k, n))
  bias = 0.1 * jax.random.normal(jax.random.key(2), (n,))
  return x, kernel, bias


def test_values_and_gradients_equal_a_plain_bfloat16_dense():
  for m_shape, k in (((2, 5), 16), ((3, 5), 7), ((4,), 9)):  # odd K, odd M
    x, kernel, bias = _inputs(m_shape, k)
    y = bf16_matmul.dense(x.astype(jnp.bfloat16), kernel, bias)
    assert y.dtype == jnp.bfloat16 and y.shape == (*m_shape, 8)
    np.testing.assert_allclose(
        y.astype(jnp.float32),
        _reference(x, kernel, bias).astype(jnp.float32),
        rtol=1e-2,
        atol=1e-2,
    )
    want = jax.grad(_loss(_reference), (0, 1, 2))(x, kernel, bias)
    got = jax.grad(_loss(bf16_matmul.dense), (0, 1, 2))(x, kernel, bias)
    for w, g in zip(want, got):
      assert g.dtype == jnp.float32 and g.shape == w.shape
      np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * np.abs(w).max())


def test_materialised_transpose_is_the_transpose():
  for shape in ((6, 4), (6, 3), (5, 3)):
    rows = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    np.testing.assert_array_equal(
        bf16_matmul.materialised_transpose(rows), rows.T
    )


def test_nn_dense_with_the_options_runs_dense_with_float32_gradients():
  x = jnp.ones((2, 3, 4))
  options = bf16_matmul.dense_options(jnp.bfloat16)
  assert set(options) == {'promote_dtype', 'dot_general'}  # on CPU
  mine = nn.Dense(5, dtype=jnp.bfloat16, **options)
  plain = nn.Dense(5, dtype=jnp.bfloat16)
  params = plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, mine.init(jax.random.key(0), x)) == (
      jax.tree.map(jnp.shape, params)
  )
  y = mine.apply(params, x)
  assert y.dtype == jnp.bfloat16
  # Exactly `dense` (its bias added before the one rounding).
  np.testing.assert_array_equal(
      y.astype(jnp.float32),
      bf16_matmul.dense(
          x, params['params']['kernel'], params['params']['bias']
      ).astype(jnp.float32),
  )
  np.testing.assert_allclose(
      y.astype(jnp.float32),
      plain.apply(params, x).astype(jnp.float32),
      rtol=1e-2,
  )
  grads = jax.grad(lambda p: mine.apply(p, x).astype(jnp.float32).sum())(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  # Without a bias, and float32 compute: no options, flax's own Dense.
  no_bias = nn.Dense(5, use_bias=False, dtype=jnp.bfloat16, **options)
  kernel = {'params': {'kernel': params['params']['kernel']}}
  np.testing.assert_array_equal(
      no_bias.apply(kernel, x).astype(jnp.float32),
      bf16_matmul.dense(x, kernel['params']['kernel'], jnp.zeros(5)).astype(
          jnp.float32
      ),
  )
  assert bf16_matmul.dense_options(jnp.float32) == {}
  assert bf16_matmul.dense_options(None) == {}


def _dot_operand_types(function: str, w_shape=(64, 96)) -> list:
  """(lhs, rhs) element types of every dot XLA compiles for the gradient
  of `function` (Python source of f(x, kernel, bias)) at MiniLM-like
  shapes, in a fresh process with YNNPACK's dots (what main.py picks for
  bfloat16 runs)."""
  code = (
      'from tuning.platform import xla_cpu; xla_cpu.choose("ynnpack"); '
      'import jax, jax.numpy as jnp; '
      'import flax.linen as nn; '
      'from tuning.platform import bf16_matmul; '
      'x = jnp.ones((4, 32, 64), jnp.bfloat16); '
      f'w = jnp.ones({w_shape}); b = jnp.ones((96,)); '
      f'f = {function}; '
      'loss = lambda x, w, b: (f(x, w, b).astype(jnp.float32) ** 2).sum(); '
      'grad = jax.jit(jax.grad(loss, (0, 1, 2))); '
      'print(grad.lower(x, w, b).compile().as_text()); '
      # Run it too: a bfloat16 dot that XLA kept but did not hand to
      # YNNPACK fails at run time ('Unsupported element type for DotThunk').
      'jax.block_until_ready(grad(x, w, b))'
  )
  text = fresh_python_stdout(code)
  types = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', text))
  return [
      (types[lhs], types[rhs])
      for lhs, rhs in re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', text)
  ]


def test_xla_runs_forward_and_backward_dots_on_bfloat16_operands():
  # A model's Dense layer: flax's, with the options (what a bfloat16
  # model builds on CPU).
  mine = _dot_operand_types(
      'lambda x, w, b: nn.Dense(96, dtype=jnp.bfloat16, '
      '**bf16_matmul.dense_options(jnp.bfloat16)).apply('
      '{"params": {"kernel": w, "bias": b}}, x)'
  )
  assert mine == [('bf16', 'bf16')] * 3, mine  # forward, dx, dW
  # Without it: a bfloat16 dot accumulating in float32 runs on bfloat16
  # kernels forward, but the two dots autodiff builds for its backward
  # pass are converted to float32.
  plain = _dot_operand_types(
      'lambda x, w, b: (jnp.matmul(x, w.astype(jnp.bfloat16), '
      'preferred_element_type=jnp.float32) + b).astype(jnp.bfloat16)'
  )
  assert sorted(plain) == [('bf16', 'bf16')] + [('f32', 'f32')] * 2, plain


def test_tied_logits_dots_on_bfloat16_operands():
  # w as an embedding table [V, D] = [96, 64].
  tied = _dot_operand_types(
      'lambda x, w, b: bf16_matmul.tied_logits(x, w, jnp.bfloat16) + b',
      w_shape=(96, 64),
  )
  assert tied == [('bf16', 'bf16')] * 3, tied


def test_tied_logits_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  table = jax.random.normal(jax.random.key(1), (24, 16))
  reference = lambda x, e: jnp.einsum(  # noqa: E731
      'btd,vd->btv', x.astype(jnp.bfloat16), e.astype(jnp.bfloat16)
  ).astype(jnp.float32)
  mine = lambda x, e: bf16_matmul.tied_logits(  # noqa: E731
      x.astype(jnp.bfloat16), e, jnp.bfloat16
  )
  assert mine(x, table).dtype == jnp.float32
  np.testing.assert_allclose(mine(x, table), reference(x, table), rtol=2e-2)
  loss = lambda f: lambda x, e: (jnp.sin(f(x, e)) ** 2).sum()  # noqa: E731
  want = jax.grad(loss(reference), (0, 1))(x, table)
  got = jax.grad(loss(mine), (0, 1))(x, table)
  for w, g in zip(want, got):
    assert g.shape == w.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=3e-2, atol=3e-2 * np.abs(w).max())
  # float32: the plain product.
  np.testing.assert_allclose(
      bf16_matmul.tied_logits(x, table, jnp.float32),
      jnp.einsum('btd,vd->btv', x, table),
      rtol=1e-6,
  )
