"""Process settings as command-line flags, read once, before JAX starts.

Two settings act on the process, not on a run, and are flags of main.py
and of the commands, not config fields (a config field set in an
experiment file came too late to act):

  --malloc=tuned|default             glibc's malloc tunables
                                     (tuning/platform/host_malloc.py); glibc
                                     reads them when the program starts
  --xla_cpu_dots=auto|eigen|ynnpack  XLA:CPU's dot kernels
                                     (tuning/platform/xla_cpu.py; 'auto'
                                     follows the run's dtype); XLA reads
                                     them when JAX's backend starts

A command takes them in two steps, beside its other absl flags:

    from tuning.platform import process_flags

    process_flags.define()  # at import: --helpfull lists them, absl
                            # accepts them
    ...
    if __name__ == '__main__':
      try:  # before anything starts JAX
        process_flags.apply_from_argv(sys.argv, dtype=...)
      except process_flags.FlagError as e:
        ...  # one line, exit code 2
      app.run(main)

`apply_from_argv` reads the two flags from the raw command line (absl's
own parser, on flags of its own: absl's main parse comes later), restarts
the program with the malloc tunables where they apply (`os.execv`, same
pid, same argv: the restarted process reads the same flags and goes on),
then puts the dot-kernel choice into XLA_FLAGS. main.py's defaults are
`--malloc=tuned --xla_cpu_dots=auto`; a command that ran under glibc's own
malloc settings keeps them with `define(malloc_default='default')`.

The config fields they replace (`config.host_malloc`,
`config.xla_cpu_dots`) are rejected by name with their flag
(`MOVED_CONFIG_FIELDS`, read by tuning/config/loading.py).
"""

from __future__ import annotations

import dataclasses

from absl import flags

from tuning.platform import host_malloc
from tuning.platform import xla_cpu

MALLOC = 'malloc'
XLA_CPU_DOTS = 'xla_cpu_dots'

# Former config fields -> the flag that replaced each, with its values.
MOVED_CONFIG_FIELDS = {
    'host_malloc': f'--{MALLOC}={"|".join(host_malloc.CHOICES)}',
    'xla_cpu_dots': f'--{XLA_CPU_DOTS}={"|".join(xla_cpu.CHOICES)}',
}


class FlagError(ValueError):
  """A bad --malloc or --xla_cpu_dots value, worded for the user."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `apply_from_argv` read and chose."""

  malloc: str  # host_malloc.CHOICES
  xla_cpu_dots: str  # xla_cpu.CHOICES, as given
  dots: str  # what XLA_FLAGS now asks: 'eigen', 'ynnpack' or 'XLA_FLAGS'


def define(flag_values=None, *, malloc_default: str = 'tuned') -> None:
  """Defines --malloc and --xla_cpu_dots on `flag_values` (absl's FLAGS),
  once: where they are defined already (main.py and a command imported in
  one process), the first definition stays."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  if MALLOC in flag_values and XLA_CPU_DOTS in flag_values:
    return
  flags.DEFINE_enum(
      MALLOC,
      malloc_default,
      host_malloc.CHOICES,
      "glibc malloc settings for this process: 'tuned' keeps XLA's per-step "
      'blocks mapped (no page faults each step; freed memory stays in the '
      "process until it exits), 'default' is glibc's own "
      '(tuning/platform/host_malloc.py). Read before the program starts.',
      flag_values=flag_values,
  )
  flags.DEFINE_enum(
      XLA_CPU_DOTS,
      'auto',
      xla_cpu.CHOICES,
      "XLA:CPU's dot kernels: 'auto' = Eigen's for float32 (closer to "
      "float64 here), YNNPACK's for bfloat16; 'eigen' or 'ynnpack' force "
      'one (tuning/platform/xla_cpu.py). Read before JAX starts; other '
      'platforms ignore it.',
      flag_values=flag_values,
  )


def read_argv(argv, flag_values=None) -> tuple[str, str]:
  """(malloc, xla_cpu_dots) given in `argv`, else the defaults that
  `define` gave them on `flag_values` (absl's FLAGS); FlagError for a
  value that is not a choice."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  if MALLOC not in flag_values or XLA_CPU_DOTS not in flag_values:
    raise FlagError(
        'process_flags.apply_from_argv before process_flags.define(): '
        'define the flags first'
    )
  mine = flags.FlagValues()
  define(mine, malloc_default=flag_values[MALLOC].default)
  try:
    mine(list(argv), known_only=True)
  except flags.Error as e:
    raise FlagError(
        f'{" ".join(str(e).split())} (python main.py --helpfull lists '
        'the flags)'
    ) from None
  return mine[MALLOC].value, mine[XLA_CPU_DOTS].value


def apply_from_argv(argv, dtype: str = 'float32', flag_values=None) -> Settings:
  """Reads --malloc and --xla_cpu_dots from `argv` (`read_argv`), restarts
  the program with the malloc tunables where they apply (no return then),
  and chooses the dot kernels for a run computing in `dtype`. Call it
  before anything touches a device."""
  malloc, dots = read_argv(argv, flag_values)
  host_malloc.restart_with_tunables(malloc)
  return Settings(malloc, dots, xla_cpu.choose(dots, dtype))


def moved_config_field_error(field: str) -> str | None:
  """For a former config field (a top-level name), the one-line error
  naming the flag that replaced it; else None."""
  if field not in MOVED_CONFIG_FIELDS:
    return None
  return (
      f'config.{field} is now a flag: {MOVED_CONFIG_FIELDS[field]} '
      '(a process setting, read before JAX starts)'
  )
