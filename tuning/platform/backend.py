"""Which backend the XLA:CPU workarounds are for: chosen here, by backend.

Two code paths exist only because of how XLA:CPU compiles what JAX gives
it, and were measured only there:

  * the bfloat16 Dense and tied output layers' custom-VJP dots
    (tuning/platform/bf16_matmul.py), which keep forward and backward dots
    on XLA:CPU's bfloat16 kernels;
  * the pmapped train step's optimizer update on `[1, ...]` views of the
    state (tuning/engine/train_step.with_device_axis), without which
    XLA:CPU copies every parameter and moment before the update.

`cpu_workarounds()` says whether they apply: on the CPU backend only. On
GPU and TPU the models are plain `flax.linen.Dense` and the step is plain
autodiff and optax, with no custom VJP of ours. The choice is made when a
function is traced (jax.default_backend(), which starts JAX's backends:
trace only after tuning/platform/xla_cpu.py's choice is made).

`plain()` turns them off in the CPU process (what GPU and TPU run; for
tests). The choice acts at trace time, which JAX's trace caches do not
key on, so `plain()` clears those caches on the way in and out: a
function jitted before is traced again.
"""

from __future__ import annotations

import contextlib

import jax

# The backends (jax.default_backend() names) the workarounds are for.
WORKAROUND_BACKENDS = ('cpu',)

_state = {'plain': False}


def workarounds_for(backend_name: str) -> bool:
  """Whether the XLA:CPU workarounds apply on `backend_name` ('cpu',
  'gpu', 'tpu', ...; `plain()` aside)."""
  return backend_name in WORKAROUND_BACKENDS


def cpu_workarounds() -> bool:
  """Whether code traced now takes the XLA:CPU workarounds: on the CPU
  backend, outside `plain()`."""
  return not _state['plain'] and workarounds_for(jax.default_backend())


@contextlib.contextmanager
def plain():
  """Within it, code traced takes no XLA:CPU workaround (GPU and TPU's
  forms): plain flax Dense layers, the update without a device axis.
  Clears JAX's caches on entry and exit (what was traced is traced again)."""
  before = _state['plain']
  _state['plain'] = True
  jax.clear_caches()
  try:
    yield
  finally:
    _state['plain'] = before
    jax.clear_caches()
