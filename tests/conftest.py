"""Shared helpers: running main.py as a subprocess, reading run outputs."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny_config.py')


def main_command(*args):
  return [sys.executable, os.path.join(ROOT, 'main.py'), *args]


# Subprocesses share a persistent compilation cache: the same tiny models
# are compiled by many tests.
_CACHE = os.path.join(tempfile.gettempdir(), 'tuning-tests-jax-cache')


def subprocess_env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  return env


def run_main(*args, devices=1, check=True, timeout=300, cwd=ROOT):
  """Runs main.py; returns the CompletedProcess (text output)."""
  env = subprocess_env(devices)
  result = subprocess.run(main_command(*args), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f'main.py failed ({result.returncode}):\n'
                         f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
  return result


def run_main_processes(*args, processes=2, devices=1, timeout=300):
  """Runs main.py as `processes` JAX processes on 127.0.0.1 (gloo), each
  with `devices` devices; returns their outputs (stdout + stderr)."""
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      main_command(*args, f'--coordinator_address=127.0.0.1:{port}',
                   f'--num_processes={processes}', f'--process_id={i}'),
      cwd=ROOT, env=subprocess_env(devices), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(processes)]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0] * processes, ''.join(
      o[-2000:] for o in outputs)
  return outputs


def read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


@pytest.fixture
def tiny_config():
  return TINY


def tree_digest(workdir, names=('checkpoints', 'results.json',
                                'metrics.jsonl')):
  """{relative path: sha256} of a run's checkpoints and results (to check
  that a failed rerun left them untouched)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  digests = {}
  for name in names:
    top = os.path.join(workdir, name)
    paths = [top] if os.path.isfile(top) else [
        os.path.join(root, f) for root, _, files in os.walk(top)
        for f in files]
    for path in paths:
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, workdir)] = hashlib.sha256(
            f.read()).hexdigest()
  return digests


def error_lines(text):
  return [l for l in text.splitlines() if l.startswith('error:')]


def corrupt_largest_file(step_dir):
  """Flips bytes in the largest data file of an orbax checkpoint step."""
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir)
           for f in names if os.sep + 'd' + os.sep in os.path.join(root, f)]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    for i in range(len(data) // 3, len(data) // 3 + 64):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)
  return path


def enable_compilation_cache():
  """In-process runs (main.cli) use the subprocesses' compilation cache."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', _CACHE)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
