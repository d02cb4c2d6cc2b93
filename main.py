"""Fine-tuning experiments from the command line.

  python main.py --config=experiments/<name>.py[:args] --workdir=DIR \\
      [--config.a.b=value ...]

With no flags it runs the quickstart experiment in ./workdirs/quickstart.
Process settings are flags, read before the program and JAX start
(tuning/platform/process_flags.py): --malloc=tuned|default (glibc's malloc
tunables; tuned unless given) and --xla_cpu_dots=auto|eigen|ynnpack
(XLA:CPU's dot kernels; auto follows config.dtype).
"""

import os
import sys

from tuning.platform import process_flags
from tuning.platform import xla_cpu

process_flags.define()  # --malloc, --xla_cpu_dots

if __name__ == '__main__':
  # Process settings, read before the program and JAX start
  # (tuning/platform/process_flags.py): glibc reads its malloc settings
  # when a program starts, so this restarts main.py with them, once; XLA
  # reads its dot kernels when JAX starts, and loading a config may start
  # it (the dtype: --config.dtype's, until the config is loaded).
  try:
    PROCESS = process_flags.apply_from_argv(
        sys.argv, dtype=xla_cpu.dtype_in_argv(sys.argv)
    )
  except process_flags.FlagError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tuning.config import loading as config_loading
from tuning.terminal import console
from tuning.terminal import errors
from tuning.modes import experiment
from tuning.engine import multihost

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'experiments', 'quickstart.py'
)

if __name__ == '__main__':
  # Before the config flag is defined (it applies overrides right away):
  # a missing config file or an unknown key is one line, not a traceback.
  try:
    config_loading.parse_config_flags(sys.argv, DEFAULT_CONFIG)
  except config_loading.ConfigError as e:
    console.error(str(e))
    sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    DEFAULT_CONFIG,
    'Experiment config file, optionally :arg.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Work directory (default: ./workdirs/<experiment>).'
)
multihost.define_flags()


def main(argv):
  if len(argv) > 1:
    console.error(
        f'unexpected arguments: {" ".join(argv[1:])} (flags are '
        '--name=value; python main.py --helpfull lists them)'
    )
    sys.exit(2)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it writes
  errors.quiet_library_tracebacks()
  note = xla_cpu.choose_for_dtype(
      PROCESS.xla_cpu_dots, _CONFIG.value.dtype, PROCESS.dots
  )
  if note:
    console.info(note)
  try:
    multihost.initialize_from_flags()
  except flags.ValidationError as e:
    console.error(str(e))
    sys.exit(2)
  code = run(
      _CONFIG.value, _WORKDIR.value, flags.FLAGS['config'].config_filename
  )
  if code:
    sys.stdout.flush()
    # Checkpoint saves were waited for on the way out; skip interpreter
    # teardown, where orbax's helper threads would bury the error line
    # under tracebacks of their own.
    os._exit(code)  # pylint: disable=protected-access


def run(config, workdir, config_filename) -> int:
  """Runs the experiment; returns the exit code (an error: one line)."""
  workdir = os.path.abspath(
      workdir
      or os.path.join(
          'workdirs',
          os.path.splitext(os.path.basename(config_filename.split(':')[0]))[0],
      )
  )
  console.info(f'work directory: {workdir}')
  try:
    experiment.run(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    # One line naming the problem and its fix (tuning/terminal/errors.py);
    # TUNING_TRACEBACK=1 shows the full traceback instead.
    if os.environ.get('TUNING_TRACEBACK'):
      raise
    console.error(errors.describe(e))
    return 1
  console.info(f'done; outputs in {workdir}')
  return 0


def cli(argv) -> int:
  """main.py with `argv`, in this process (tests): prints what main.py
  prints and returns its exit code (single process; no absl flags)."""
  try:
    config = config_loading.parse_config_flags(argv, DEFAULT_CONFIG)
  except config_loading.ConfigError as e:
    console.error(str(e))
    return 2
  spec, workdir = DEFAULT_CONFIG, None
  for arg in argv[1:]:
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg.startswith('--workdir='):
      workdir = arg.split('=', 1)[1]
  return run(config, workdir, spec)


def _parse_flags(argv):
  """absl's flag parsing, its errors one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    console.error(
        f'{" ".join(str(e).split())} (python main.py --helpfull '
        'lists the flags)'
    )
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
