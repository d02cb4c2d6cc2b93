"""Fine-tuning experiments from the command line.

  python main.py --config=experiments/<name>.py[:args] --workdir=DIR \\
      [--config.a.b=value ...]

With no flags it runs the quickstart experiment in ./workdirs/quickstart.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tuning import config_loading
from tuning import console
from tuning import experiment
from tuning import multihost

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              'experiments', 'quickstart.py')

if __name__ == '__main__':
  # Before the config flag is defined (it applies overrides right away):
  # a missing config file or an unknown key is one line, not a traceback.
  try:
    config_loading.check_config_flags(sys.argv, DEFAULT_CONFIG)
  except config_loading.ConfigError as e:
    console.error(str(e))
    sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file(
    'config', DEFAULT_CONFIG, 'Experiment config file, optionally :arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Work directory (default: ./workdirs/<experiment>).')
multihost.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it writes
  multihost.initialize_from_flags()
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      'workdirs', os.path.splitext(os.path.basename(
          flags.FLAGS['config'].config_filename))[0])
  workdir = os.path.abspath(workdir)
  console.info(f'work directory: {workdir}')
  try:
    experiment.run(config, workdir)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    # Errors raised for the user carry their own one-line explanation;
    # TUNING_TRACEBACK=1 shows the full traceback instead.
    if os.environ.get('TUNING_TRACEBACK'):
      raise
    console.error(f'{type(e).__name__}: {e}')
    sys.stdout.flush()
    # Checkpoint saves were waited for on the way out; skip interpreter
    # teardown, where orbax's helper threads would bury this line under
    # tracebacks of their own.
    os._exit(1)  # pylint: disable=protected-access
  console.info(f'done; outputs in {workdir}')


if __name__ == '__main__':
  app.run(main)
