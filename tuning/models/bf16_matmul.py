"""A Dense `dot_general` for bfloat16 compute that XLA's CPU backend runs
on its bfloat16 matmul kernels, forward and backward.

XLA on CPU runs a bfloat16 x bfloat16 -> bfloat16 dot as a float32 one
(converting around it): no faster than float32. A dot of bfloat16 operands
accumulating into float32 (`preferred_element_type=float32`) runs on the
bfloat16 kernels, about twice as fast as float32 on CPUs with AVX-512 BF16;
but JAX's transposes of such a dot, in the backward pass, mix a float32
cotangent with bfloat16 operands and fall back to float32 again.
`dot_general` below is that forward dot with a `custom_vjp` whose two
backward dots also take bfloat16 operands and accumulate in float32. The
numbers are those of bfloat16 matmuls with float32 accumulation, rounded to
bfloat16 (as the plain bfloat16 dot gives them).

Only the Dense layout is handled (contract the input's last axis with the
kernel's first, no batch axes); other dimension numbers fall back to
`lax.dot_general`. (Under a per-example `vmap` the custom backward would
be vmapped as written and build every example's own weight gradient:
measured 7.5 CPU s per MiniLM step against 5.2 with plain bfloat16 dots.
The train step no longer vmaps the model; tuning/models/dropout.py.)
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

_F32 = jnp.float32


@jax.custom_vjp
def _matmul(x, w):
  return jnp.matmul(x, w, preferred_element_type=_F32).astype(x.dtype)


def _forward(x, w):
  return _matmul(x, w), (x, w)


def _backward(saved, g):
  x, w = saved
  g = g.astype(x.dtype)
  dx = jnp.matmul(g, w.T, preferred_element_type=_F32).astype(x.dtype)
  rows = x.reshape(-1, x.shape[-1])
  dw = jnp.matmul(
      rows.T, g.reshape(-1, g.shape[-1]), preferred_element_type=_F32
  ).astype(w.dtype)
  return dx, dw


_matmul.defvjp(_forward, _backward)


def dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None
):
  """`lax.dot_general`, on bfloat16 kernels for Dense's bfloat16 matmuls."""
  (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
  dense = (
      tuple(contract_l) == (lhs.ndim - 1,)
      and tuple(contract_r) == (0,)
      and not batch_l
      and not batch_r
      and rhs.ndim == 2
      and lhs.dtype == rhs.dtype == jnp.bfloat16
      and preferred_element_type in (None, jnp.bfloat16)
  )
  if not dense:
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
  return _matmul(lhs, rhs)
