"""The command-line style of every command besides main.py.

Flags are absl's, as main.py's (--name=value, --noname for a boolean,
--flagfile=FILE, --help). Each command defines its own on a `FlagValues` of
its own, made afresh for each parse, so that commands imported together (in
one test process) do not clash over a name such as --batch_size, and a
command run twice in one process starts from its defaults each time.

The commands that read a run's work directory share `--checkpoint` and
`--step` (`define_checkpoint_flags`; `parse_step` reads --step). Every
command takes main.py's process settings, `--malloc=tuned|default` and
`--xla_cpu_dots=auto|eigen|ynnpack` (tuning/platform/process_flags.py),
applied before the command starts JAX; the commands ran under glibc's own
malloc settings, and still do unless `--malloc=tuned` is given.

One error path (`run`): a bad flag is one line `error: ...` on stderr and
exit code 2; an error the command raises is one line `error: ...` and exit
code 1 (2 for a `UsageError`, such as an argument that is not a flag or a
bad --step, and for the classes a command names as command-line mistakes),
with `TUNING_TRACEBACK=1` showing the traceback instead. The line is
tuning/terminal/errors.py's `describe`, less the class name for this
project's own error classes, whose messages are written for the user.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging

from tuning.platform import process_flags
from tuning.terminal import console
from tuning.terminal import errors


class UsageError(ValueError):
  """A command line the command cannot take (exit code 2)."""


def no_positional(positional: list[str]):
  """UsageError for arguments that are not flags."""
  if positional:
    raise UsageError(
        f'unexpected arguments: {" ".join(positional)} (flags are '
        '--name=value)'
    )


STEP_HELP = "A run work directory's checkpoint: best | latest | a step number."


def define_checkpoint_flags(flag_values: flags.FlagValues, what: str):
  """--checkpoint (`what` it may name besides a run work directory) and
  --step (which checkpoint of a run work directory)."""
  flags.DEFINE_string(
      'checkpoint',
      None,
      f"{what}, or a run's work directory (main.py --workdir).",
      flag_values=flag_values,
  )
  flags.DEFINE_string('step', 'best', STEP_HELP, flag_values=flag_values)


def parse_step(text) -> str | int:
  """--step's value: 'best', 'latest' or a step number (an int)."""
  # Here, not at the top: convert and to_records read no run.
  from tuning.multirun import finished_run  # pylint: disable=g-import-not-at-top

  text = str(text).strip()
  if text in finished_run.WHICH:
    return text
  if text.isdigit():
    return int(text)
  raise UsageError(f'--step={text!r}: use best, latest or a step number')


def error_line(e: BaseException) -> str:
  """The one line of an error (without 'error: ')."""
  text = errors.describe(e)
  if type(e).__module__.startswith('tuning.'):
    text = text.removeprefix(f'{type(e).__name__}: ')
  return text


def run(
    prog: str,
    doc: str,
    define: Callable[[flags.FlagValues], None],
    main: Callable[[flags.FlagValues, list[str]], int | None],
    argv: Sequence[str] | None = None,
    usage_errors: tuple[type[BaseException], ...] = (),
    apply_process_flags: bool = True,
) -> int:
  """Parses `argv` (the arguments after the program name; None:
  sys.argv[1:]) into the flags `define` declares, applies the process
  settings (unless `apply_process_flags` is False: a command that passes
  them on to the processes it starts), then returns `main(flag_values,
  positional arguments)`'s exit code (None: 0).

  Errors: see the module doc; `usage_errors` exit with 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  flag_values = flags.FlagValues()
  define(flag_values)
  process_flags.define(flag_values, malloc_default='default')
  flags.DEFINE_integer(
      'verbosity',
      None,
      'absl logging level of the libraries (default: errors only; 0: info).',
      flag_values=flag_values,
  )
  if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv):
    print(f'{doc.strip()}\n\nflags:\n{flag_values.get_help()}')
    return 0
  try:
    positional = flag_values([prog] + argv)[1:]
  except flags.Error as e:
    console.error(f'{" ".join(str(e).split())} ({prog} --help lists the flags)')
    return 2
  if not flags.FLAGS.is_parsed():
    # Libraries that read absl's global flags (grain's loaders) find them
    # parsed.
    flags.FLAGS.mark_as_parsed()
  if apply_process_flags:
    # Before anything starts JAX: the malloc tunables restart the program
    # (where --malloc=tuned asks for them), the dot kernels go to XLA_FLAGS
    # for the command's compute dtype.
    dtype = flag_values['dtype'].value if 'dtype' in flag_values else None
    process_flags.apply_from_argv(
        [prog] + argv, dtype=dtype or 'float32', flag_values=flag_values
    )
  verbosity = flag_values.verbosity
  # Errors only by default: orbax logs every file it writes.
  logging.set_verbosity(logging.ERROR if verbosity is None else verbosity)
  try:
    return main(flag_values, positional) or 0
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get('TUNING_TRACEBACK'):
      raise
    console.error(error_line(e))
    return 2 if isinstance(e, (UsageError, *usage_errors)) else 1
