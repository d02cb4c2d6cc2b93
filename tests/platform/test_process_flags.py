"""Process settings as flags (tuning/platform/process_flags.py): --malloc and
--xla_cpu_dots are read from the command line before JAX starts, main.py
accepts them, and the config fields they replaced are rejected by name."""

import os
import subprocess
import sys

from absl import flags
import pytest

from conftest import ROOT, error_lines, main_command, subprocess_env
from tuning.config import loading
from tuning.config.defaults import base_config
from tuning.platform import process_flags
from tuning.platform import xla_cpu


def _defined(malloc_default='tuned'):
  values = flags.FlagValues()
  process_flags.define(values, malloc_default=malloc_default)
  return values


def test_flags_are_read_from_the_raw_command_line_with_their_defaults():
  values = _defined()
  assert process_flags.read_argv(['main.py'], values) == ('tuned', 'auto')
  argv = ['main.py', '--config=x.py', '--malloc=default', '--config.seed=1']
  assert process_flags.read_argv(argv, values) == ('default', 'auto')
  argv = ['main.py', '--xla_cpu_dots', 'ynnpack', '--malloc', 'default']
  assert process_flags.read_argv(argv, values) == ('default', 'ynnpack')
  # A command that keeps glibc's own malloc settings unless asked.
  assert process_flags.read_argv(['gen'], _defined('default'))[0] == 'default'
  # Defining twice (main.py and a command in one process) keeps the first.
  process_flags.define(values, malloc_default='default')
  assert values['malloc'].default == 'tuned'


def test_a_bad_value_or_undefined_flags_are_one_line():
  with pytest.raises(process_flags.FlagError) as e:
    process_flags.read_argv(['main.py', '--malloc=huge'], _defined())
  assert '--malloc' in str(e.value) and 'tuned' in str(e.value)
  assert '\n' not in str(e.value)
  with pytest.raises(process_flags.FlagError, match='define the flags'):
    process_flags.read_argv(['main.py'], flags.FlagValues())


def test_apply_chooses_the_dots_for_the_dtype(monkeypatch):
  # GLIBC_TUNABLES set: no restart (host_malloc.applies).
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2')
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setitem(xla_cpu._state, 'set_by_us', False)
  values = _defined()
  got = process_flags.apply_from_argv(['main.py'], 'bfloat16', values)
  assert got == process_flags.Settings('tuned', 'auto', 'ynnpack')
  assert os.environ['XLA_FLAGS'] == ''
  got = process_flags.apply_from_argv(
      ['main.py', '--malloc=default'], 'float32', values
  )
  assert got == process_flags.Settings('default', 'auto', 'eigen')
  assert os.environ['XLA_FLAGS'] == f'{xla_cpu.FLAG}='


def test_the_former_config_fields_name_their_flag():
  with pytest.raises(loading.ConfigError) as e:
    loading.check_override(base_config(), 'host_malloc')
  assert str(e.value) == (
      '--config.host_malloc is now a flag: --malloc=tuned|default (a '
      'process setting, read before JAX starts)'
  )
  with pytest.raises(loading.ConfigError, match='now a flag: --xla_cpu_dots='):
    loading.check_override(base_config(), 'xla_cpu_dots')
  assert 'host_malloc' not in base_config()
  assert 'xla_cpu_dots' not in base_config()


def test_a_config_file_setting_a_former_field_fails_naming_the_flag(tmp_path):
  path = tmp_path / 'exp.py'
  path.write_text(
      'from tuning.config.defaults import base_config\n'
      'def get_config():\n'
      '  c = base_config()\n'
      "  c.xla_cpu_dots = 'ynnpack'\n"
      '  return c\n'
  )
  with pytest.raises(loading.ConfigError) as e:
    loading.load_config_file(str(path))
  assert str(e.value) == (
      f'{path}: config.xla_cpu_dots is now a flag: '
      '--xla_cpu_dots=auto|eigen|ynnpack (a process setting, read before '
      'JAX starts); remove it from the config and give the flag'
  )


def _main(*args):
  return subprocess.run(
      main_command(*args),
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=120,
  )


def test_main_takes_the_flags_and_rejects_the_old_override():
  # absl's parse accepts them: main() is reached (and stops at the
  # stray argument, before any run).
  result = _main(
      '--malloc=default',
      '--xla_cpu_dots=eigen',
      '--config=tests/tiny_config.py',
      'stray',
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert error_lines(result.stderr) == [
      'error: unexpected arguments: stray (flags are --name=value; python '
      'main.py --helpfull lists them)'
  ]
  result = _main('--config.host_malloc=default')
  assert result.returncode == 2
  assert error_lines(result.stderr) == [
      'error: --config.host_malloc is now a flag: --malloc=tuned|default (a '
      'process setting, read before JAX starts)'
  ]
  result = _main('--xla_cpu_dots=mkl')
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert '--xla_cpu_dots' in line and 'ynnpack' in line, line
