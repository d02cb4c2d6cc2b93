"""glibc malloc settings (tuning/platform/host_malloc.py): when a program
restarts with them (main.py's --malloc flag, tuning/platform/process_flags.py),
and that they stop XLA's per-step page faults."""

import os
import platform
import subprocess
import sys

import pytest

from tuning.platform import host_malloc

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
GLIBC = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def test_only_tuned_and_only_where_glibc_tunables_are_unset():
  assert host_malloc.applies('tuned', {}) == GLIBC
  assert not host_malloc.applies('default', {})
  assert not host_malloc.applies('tuned', {'GLIBC_TUNABLES': 'glibc.x=1'})
  # The benchmarks' --malloc (main.py's: test_process_flags.py).
  assert host_malloc.choice_from_argv(['b.py', '--malloc=default']) == (
      'default'
  )
  assert host_malloc.choice_from_argv(['b.py']) == 'tuned'


# Each call of `step` needs a fresh 256 MiB temporary (XLA:CPU allocates an
# execution's temporaries as one block); prints the minor page faults of
# the last three calls.
_FAULTS = """
import resource, sys
sys.path.insert(0, {root!r})
from tuning.platform import host_malloc
host_malloc.restart_with_tunables(sys.argv[1])
import jax, jax.numpy as jnp
step = jax.jit(lambda x: (jnp.sin(x) * jnp.cos(x[::-1])).sum())
x = jnp.ones((64 << 20,), jnp.float32)
for _ in range(2):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  step(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(host_malloc.in_effect(), after - before)
"""


def _faults(choice):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  out = subprocess.run(
      [sys.executable, '-c', _FAULTS.format(root=ROOT), choice],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout.split()
  return out[0] == 'True', int(out[1])


@pytest.mark.skipif(not GLIBC, reason='glibc tunables exist on Linux/glibc')
def test_the_restart_keeps_xla_temporaries_mapped():
  tuned, tuned_faults = _faults('tuned')
  default, default_faults = _faults('default')
  assert tuned and not default
  # glibc's own settings map and unmap the block every call: about 65,000
  # 4 KiB pages per call; tuned, it stays mapped.
  assert default_faults > 3 * 30_000, default_faults
  assert tuned_faults < default_faults / 20, (tuned_faults, default_faults)
