"""XLA:CPU's dot kernels, chosen before JAX starts (tuning/platform/xla_cpu.py)."""

import os

import jax
import numpy as np
import pytest

from tests.conftest import fresh_python_stdout
from tuning.platform import xla_cpu


def test_wanted_follows_the_dtype_unless_forced():
  assert xla_cpu.wanted('auto', 'float32') == 'eigen'
  assert xla_cpu.wanted('auto', 'bfloat16') == 'ynnpack'
  assert xla_cpu.wanted('ynnpack', 'float32') == 'ynnpack'
  assert xla_cpu.wanted('eigen', 'bfloat16') == 'eigen'
  with pytest.raises(ValueError, match="unknown --xla_cpu_dots='mkl'"):
    xla_cpu.wanted('mkl')


def test_choose_edits_only_its_own_flag(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.setitem(xla_cpu._state, 'set_by_us', False)
  assert xla_cpu.choose('auto', 'float32') == 'eigen'
  assert os.environ['XLA_FLAGS'].split() == [
      '--xla_force_host_platform_device_count=2',
      f'{xla_cpu.FLAG}=',
  ]
  assert xla_cpu.choose('auto', 'bfloat16') == 'ynnpack'  # taken back
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2'
  # The user's own choice stays.
  monkeypatch.setenv('XLA_FLAGS', f'{xla_cpu.FLAG}=dot')
  assert xla_cpu.choose('eigen') == 'XLA_FLAGS'
  assert os.environ['XLA_FLAGS'] == f'{xla_cpu.FLAG}=dot'
  # main.py's dtype before the config file loads: --config.dtype's.
  argv = ['main.py', '--config=x.py', '--config.dtype=bfloat16']
  assert xla_cpu.dtype_in_argv(argv) == 'bfloat16'
  assert xla_cpu.dtype_in_argv(argv[:2]) == 'float32'


def test_choose_for_dtype_notes_a_choice_made_too_late(monkeypatch):
  # Once JAX is up, a different choice is only a note.
  jax.devices('cpu')
  assert xla_cpu.backend_started()
  note = xla_cpu.choose_for_dtype('auto', 'bfloat16', 'eigen')
  assert 'dots use eigen this run, not ynnpack' in note, note
  assert xla_cpu.choose_for_dtype('auto', 'float32', 'eigen') is None
  assert xla_cpu.choose_for_dtype('ynnpack', 'float32', 'XLA_FLAGS') is None
  # Before JAX starts, it chooses.
  monkeypatch.setattr(xla_cpu, 'backend_started', lambda: False)
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setitem(xla_cpu._state, 'set_by_us', False)
  assert xla_cpu.choose_for_dtype('auto', 'float32', 'ynnpack') is None
  assert os.environ['XLA_FLAGS'] == f'{xla_cpu.FLAG}='


def _dot_kernel(choice: str) -> str:
  """The compiled kernel of a float32 dot in a fresh process after
  `xla_cpu.choose(choice)`."""
  code = (
      'from tuning.platform import xla_cpu; import sys; '
      'xla_cpu.choose(sys.argv[1]); import jax, jax.numpy as jnp; '
      'x = jnp.ones((64, 64)); '
      'print(jax.jit(lambda a: a @ a).lower(x).compile().as_text())'
  )
  out = fresh_python_stdout(code, choice)
  return 'ynnpack' if 'ynn_fusion' in out else 'eigen'


def test_the_choice_reaches_xla():
  assert _dot_kernel('eigen') == 'eigen'
  assert _dot_kernel('ynnpack') == 'ynnpack'


def test_this_test_session_uses_eigen_dots():
  # conftest chose before JAX started, as main.py does for float32 runs.
  # Compiled for this process's CPU device, whatever the default backend:
  # with YNNPACK's dots (conftest's choice undone) the dot below is a
  # ynn_fusion (test_the_choice_reaches_xla).
  cpu = jax.devices('cpu')[0]
  x = jax.device_put(np.ones((64, 64), np.float32), cpu)
  compiled = jax.jit(lambda a: a @ a).lower(x).compile()
  assert compiled.input_shardings[0][0].device_set == {cpu}
  text = compiled.as_text()
  assert ' dot(' in text or 'dot.' in text, text  # a dot was compiled
  assert 'ynn_fusion' not in text
