"""Timing and peak-FLOP helpers shared by the throughput benchmarks."""

import time

import jax
import jax.numpy as jnp


def timed(fn, steps: int, warmup: int = 2) -> float:
  """Seconds per call after `warmup` calls (results fetched each call)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / steps


def peak_matmul_flops(n: int = 2048) -> float:
  """FLOP/s of a large float32 jnp.dot: the denominator of MFU."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / timed(lambda: f(a), 5)


def torch_peak_matmul_flops(n: int = 2048) -> float | None:
  """The same float32 matmul in PyTorch (its oneDNN/MKL kernels)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  a = torch.ones((n, n), dtype=torch.float32)
  for _ in range(2):
    a @ a  # pylint: disable=pointless-statement
  start = time.perf_counter()
  for _ in range(5):
    a @ a  # pylint: disable=pointless-statement
  return 2 * n**3 / ((time.perf_counter() - start) / 5)


def torch_timed(fn, steps: int, warmup: int = 2) -> float:
  """Seconds per call of a (synchronous) PyTorch function."""
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps
