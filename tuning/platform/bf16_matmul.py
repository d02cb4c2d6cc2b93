"""Dense and tied output layers' bfloat16 dots that XLA's CPU backend runs
on its bfloat16 matmul kernels, forward and backward (on CPU only).

XLA on CPU runs a dot on its bfloat16 kernels (YNNPACK's; about twice as
fast as float32 on CPUs with AVX-512 BF16) only where the dot takes
bfloat16 operands, accumulates in float32 (`preferred_element_type`), and
its left operand contracts its last axis in a row-major layout. Any other
bfloat16 dot is converted to float32 before it runs (XLA's operand
upcaster, checked against `IsDotSupportedByYnn`), so it is no faster than
float32. What JAX's autodiff builds for a Dense layer misses that twice:
its input gradient multiplies by the kernel through a transpose, which
reaches XLA as a column-major operand, and its weight gradient contracts
the rows axis, the first axis of the left operand. Measured on a 2-core
AVX-512 BF16 EPYC, 4096 x 384 x 1536: forward 12 ms, those two 25 ms each.

`dense` below is a Dense layer's matmul plus bias with a `custom_vjp`
whose backward dots both take that one fast form: the input gradient
contracts the kernel's output axis directly (dimension numbers, no
transpose), and the weight gradient multiplies a materialised transpose of
the input rows (one cheap copy) by the output gradient. Both backward dots
then run in 13 ms. The bias is added to the float32 accumulator before the
one rounding to bfloat16, and its gradient is summed in float32 (under
autodiff of a bfloat16 add, XLA sums it in bfloat16 through a slow
reduce-window). The weight and bias gradients come back in float32.

The models use plain `flax.linen.Dense`; `dense_options(dtype)` gives the
keyword arguments that route one through `dense` (its `promote_dtype` and
`dot_general`), only where tuning/platform/backend.py says the XLA:CPU
workarounds apply (the CPU backend) and the dtype is bfloat16; elsewhere
it gives none, so GPU and TPU run flax's own Dense, and float32 runs too.
`tied_logits` chooses the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from tuning.platform import backend

_F32 = jnp.float32
_BF16 = jnp.bfloat16


def _rows(a):
  """a [..., K] as bfloat16 rows [M, K]."""
  return a.reshape(-1, a.shape[-1]).astype(_BF16)


def materialised_transpose(rows):
  """rows.T [K, M] as a row-major copy that XLA keeps as a copy.

  A plain `rows.T` reaches XLA as a transpose with a column-major layout
  (a free relabelling); a dot that takes it is not on the bfloat16 kernels.
  The same permutation written over a split axis is computed as a copy."""
  m, k = rows.shape
  if k % 2 == 0:
    return jnp.transpose(rows.reshape(m, k // 2, 2), (1, 2, 0)).reshape(k, m)
  if m % 2 == 0:
    return jnp.transpose(rows.reshape(m // 2, 2, k), (2, 0, 1)).reshape(k, m)
  return rows.T  # both odd: correct, but this dot runs in float32.


def _dot(a, b, a_axis: int, b_axis: int):
  """a and b contracted over one axis each, in bfloat16, accumulated in
  float32 (the form XLA keeps on its bfloat16 kernels where `a` contracts
  its last axis, row-major)."""
  return lax.dot_general(
      a.astype(_BF16),
      b.astype(_BF16),
      (((a_axis,), (b_axis,)), ((), ())),
      preferred_element_type=_F32,
  )


def _rows_t_times(x, rows_g):
  """rows(x).T @ rows_g (a weight gradient), through a materialised
  transpose of x's rows."""
  return _dot(materialised_transpose(_rows(x)), rows_g, 1, 0)


@jax.custom_vjp
def dense(x, kernel, bias):
  """(x @ kernel + bias) in bfloat16: x bfloat16 [..., K], kernel [K, N]
  and bias [N] in their parameter dtype (float32); one float32
  accumulation, one rounding."""
  return (_dot(x, kernel, x.ndim - 1, 0) + bias.astype(_F32)).astype(_BF16)


def _forward(x, kernel, bias):
  return dense(x, kernel, bias), (x, kernel, bias)


def _backward(saved, g):
  x, kernel, bias = saved
  rows_g = _rows(g)
  dx = _dot(rows_g, kernel, 1, 1)  # g @ kernel.T, the kernel's axis in place
  dw = _rows_t_times(x, rows_g)
  db = rows_g.astype(_F32).sum(0)
  return (
      dx.astype(x.dtype).reshape(x.shape),
      dw.astype(kernel.dtype),
      db.astype(bias.dtype),
  )


dense.defvjp(_forward, _backward)


def _tied_forward(x, embedding):
  table = embedding.astype(_BF16)  # converted once; the backward reuses it
  logits = _dot(x, table, x.ndim - 1, 1)
  return logits, (x, table, jnp.zeros((0,), embedding.dtype))


@jax.custom_vjp
def _tied_logits(x, embedding):
  return _tied_forward(x, embedding)[0]


def _tied_backward(saved, g):
  x, table, param_dtype = saved
  rows_g = _rows(g)
  dx = _dot(rows_g, table, 1, 0)
  # dE.T = x_rows.T @ g_rows: the small operand is the one transposed.
  de = materialised_transpose(_rows_t_times(x, rows_g))  # (not a plain .T)
  return dx.astype(x.dtype).reshape(x.shape), de.astype(param_dtype.dtype)


_tied_logits.defvjp(_tied_forward, _tied_backward)


def tied_logits(x, embedding, dtype):
  """x [..., D] @ embedding.T ([V, D], an input embedding table used as the
  output layer), computed in `dtype`, returned in float32. For bfloat16 the
  logits keep their float32 accumulation instead of being rounded, and on
  XLA:CPU (`backend.cpu_workarounds()`) the dots run on the bfloat16
  kernels forward and backward (as `dense`); elsewhere they are one plain
  dot and its autodiff."""
  if jnp.dtype(dtype) == _BF16:
    if backend.cpu_workarounds():
      return _tied_logits(x, embedding)
    return lax.dot_general(
        x.astype(_BF16),
        embedding.astype(_BF16),
        (((x.ndim - 1,), (1,)), ((), ())),
        preferred_element_type=_F32,
    )
  return lax.dot_general(
      x.astype(dtype),
      embedding.astype(dtype),
      (((x.ndim - 1,), (1,)), ((), ())),
  ).astype(_F32)


class KernelAndBias(NamedTuple):
  """A Dense layer's float32 kernel and bias, handed to its `dot_general`
  together (`dense_options`)."""

  kernel: jax.Array
  bias: jax.Array


def _promote_for_dense(inputs, kernel, bias, *, dtype=None):
  """`flax.linen.Dense`'s `promote_dtype` for `dense`: nothing is cast here
  (`dense` casts to bfloat16 inside its custom VJP, so the kernel and bias
  gradients come back in float32), and the bias goes to the dot with the
  kernel, to be added to the float32 accumulator before the one rounding
  (flax would add it after, in bfloat16). Flax then adds no bias of its
  own (it gets None)."""
  del dtype
  if bias is None:
    bias = jnp.zeros((kernel.shape[-1],), _F32)
  return inputs, KernelAndBias(kernel, bias), None


def _dense_dot_general(inputs, kernel_and_bias, dimension_numbers, **unused):
  """`flax.linen.Dense`'s `dot_general` for `dense` (after
  `_promote_for_dense`): Dense's contraction of the inputs' last axis
  with the kernel's first."""
  del unused  # precision: `dense` fixes its own
  if dimension_numbers != (((inputs.ndim - 1,), (0,)), ((), ())):
    raise ValueError(
        f"bf16_matmul: a Dense dot_general with {dimension_numbers}; "
        "expected the last input axis against the kernel's first"
    )
  return dense(inputs, *kernel_and_bias)


def dense_options(dtype) -> dict:
  """Keyword arguments for `flax.linen.Dense(..., dtype=dtype,
  **dense_options(dtype))`: for bfloat16 compute where the XLA:CPU
  workarounds apply (`backend.cpu_workarounds()`), the `promote_dtype` and
  `dot_general` that run the layer through `dense`; else none (flax's own
  Dense). Call it where the layer is built (at trace time)."""
  if (
      dtype is None
      or jnp.dtype(dtype) != _BF16
      or not backend.cpu_workarounds()
  ):
    return {}
  return dict(promote_dtype=_promote_for_dense, dot_general=_dense_dot_general)
