"""Timing helpers shared by the throughput benchmarks: seconds per call,
the machine's matmul peak (the denominator of MFU) in XLA and PyTorch, and
XLA's FLOP count of a jitted function."""

import statistics
import time

import jax
import jax.numpy as jnp


def timed(fn, steps: int, warmup: int = 2) -> float:
  """Median seconds per call over `steps` calls after `warmup` calls
  (results fetched each call). The median, not the mean: a step now and
  then runs twice as long (memory growth, the OS), and with a few timed
  calls one such call moved a mean by a third."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def peak_matmul_flops(n: int = 2048) -> float:
  """FLOP/s of an n x n float32 matmul in XLA (jitted)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / timed(lambda: f(a), 5)


def torch_peak_matmul_flops(n: int = 2048) -> float | None:
  """The same matmul in PyTorch (its oneDNN/MKL or cuBLAS kernels); None
  without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  a = torch.ones((n, n), dtype=torch.float32, device=device)
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  for _ in range(2):
    a @ a
  sync()
  start = time.perf_counter()
  for _ in range(5):
    a @ a
  sync()
  return 2 * n**3 / ((time.perf_counter() - start) / 5)


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of one call of `fn(*args)` (compiled for them)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def torch_timed(fn, steps: int, warmup: int = 2) -> float:
  """Median seconds per call of a (synchronous) PyTorch function, as
  `timed`."""
  for _ in range(warmup):
    fn()
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)
