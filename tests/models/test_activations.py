"""Shared activations (tuning/models/activations.py)."""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tuning.models.activations import exact_gelu


def test_exact_gelu_is_the_erf_form_within_float32_rounding():
  x = jnp.linspace(-12.0, 12.0, 100_001, dtype=jnp.float32)
  np.testing.assert_allclose(
      exact_gelu(x), nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6
  )
  # PyTorch's formula, in float64: x/2 (1 + erf(x / sqrt 2)).
  x64 = np.asarray(x, np.float64)[::100]
  erf = np.vectorize(math.erf)
  np.testing.assert_allclose(
      exact_gelu(x)[::100], 0.5 * x64 * (1 + erf(x64 / np.sqrt(2))), atol=2e-6
  )
  assert exact_gelu(jnp.bfloat16(1.0)).dtype == jnp.bfloat16
