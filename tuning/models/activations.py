"""Activation functions shared by the models."""

import jax
import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))


def exact_gelu(x):
  """Hugging Face's "gelu": x/2 (1 + erf(x / sqrt 2)), PyTorch's formula.

  `flax.linen.gelu(x, approximate=False)` computes x/2 erfc(-x / sqrt 2),
  which keeps tiny negative outputs below x = -5 (where this form gives
  0, as PyTorch does) but runs 2.6x slower on XLA:CPU (6.9 against 2.6 ms
  CPU on [4096, 1536] float32); the two differ by at most 1e-6.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF.astype(x.dtype)))
