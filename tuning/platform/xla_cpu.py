"""Which kernels XLA:CPU runs dots with; chosen before JAX starts.

jaxlib 0.10 hands most CPU dots to YNNPACK fusions. Measured on a 2-core
AVX-512 EPYC (benchmarks/bert_throughput.py, one run each way, MiniLM-L6,
batch 32, length 128), against XLA's own (Eigen) dots:

  * float32: YNNPACK is slower (train 4.93 vs 4.64 CPU s a step, eval 1.32
    vs 1.16) and rounds worse: SmolLM2's float32 logits sit 1.2e-4 from a
    float64 reference with YNNPACK dots and 5.8e-5 with Eigen's
    (transformers': 4.1e-5), because YNNPACK's accumulation order loses
    more where a few activations are large (one MLP down-projection:
    4.5e-4 against 1.5e-4 off).
  * bfloat16: YNNPACK is much faster (eval 0.79 vs 1.14 CPU s): Eigen has
    no native bfloat16 dot on this CPU.

Since the dense layers run on [B*L, hidden] rows, YNNPACK's float32 dots
measured as fast as Eigen's or faster (MiniLM training at length 16: 135
vs 109 ex/s; at 128: 17.9 vs 16.7; one process each): Eigen stays the
float32 default for its rounding; `ynnpack` takes the speed.

So `--xla_cpu_dots=auto` (the default; a flag of main.py and the
commands, tuning/platform/process_flags.py) turns YNNPACK's fusions off
for float32 runs and leaves them on for bfloat16; 'eigen' and 'ynnpack'
force either. XLA reads its flags once, when JAX's backend starts, so
`choose` must run before anything touches a device: main.py calls it from
its command line before loading the config (with `--config.dtype` if
given) and again with the loaded config's dtype (`choose_for_dtype`; a
config whose loading started JAX keeps the first choice, with a note),
the other commands and the tests call it first. A choice already made in
XLA_FLAGS by the user is left alone. Other platforms ignore the flag.
"""

from __future__ import annotations

import os

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CHOICES = ('auto', 'eigen', 'ynnpack')


def wanted(dots: str = 'auto', dtype: str = 'float32') -> str:
  """'eigen' or 'ynnpack' for a run computing in `dtype`."""
  if dots not in CHOICES:
    raise ValueError(
        f'unknown --xla_cpu_dots={dots!r}: use one of {", ".join(CHOICES)}'
    )
  if dots == 'auto':
    return 'ynnpack' if dtype == 'bfloat16' else 'eigen'
  return dots


_OURS = f'{FLAG}='
_state = {'set_by_us': False}


def choose(dots: str = 'auto', dtype: str = 'float32') -> str:
  """Puts `wanted(dots, dtype)` into XLA_FLAGS (replacing only a choice
  made here before) and returns it, or 'XLA_FLAGS' where the user's
  XLA_FLAGS already names the flag (left alone). No effect once JAX's
  backend has started (`backend_started`)."""
  choice = wanted(dots, dtype)
  tokens = os.environ.get('XLA_FLAGS', '').split()
  if _state['set_by_us'] and _OURS in tokens:
    tokens.remove(_OURS)
    _state['set_by_us'] = False
  if any(t.startswith(FLAG) for t in tokens):
    return 'XLA_FLAGS'
  if choice == 'eigen':
    tokens.append(_OURS)
    _state['set_by_us'] = True
  os.environ['XLA_FLAGS'] = ' '.join(tokens)
  return choice


def dtype_in_argv(argv, default: str = 'float32') -> str:
  """The value of `--config.dtype=` in argv (main.py's dtype before its
  config file is loaded: loading one may start JAX, e.g. to convert a
  checkpoint)."""
  for arg in argv:
    if arg.startswith('--config.dtype='):
      return arg.split('=', 1)[1]
  return default


def backend_started() -> bool:
  """Whether JAX's backends are already up (flags set now are too late)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def choose_for_dtype(dots: str, dtype: str, first: str) -> str | None:
  """`choose(dots, dtype)` for a loaded config's dtype, where JAX has not
  started yet; else, where `first` (the choice made from the command line)
  differs from that one, the note to print."""
  try:
    wanted_now = wanted(dots, dtype)
  except ValueError:
    return None  # the config check names the bad dtype
  if not backend_started():
    choose(wanted_now)
  elif first not in (wanted_now, 'XLA_FLAGS'):
    return (
        f'note: JAX started while the config loaded, so XLA:CPU dots use '
        f'{first} this run, not {wanted_now} (give --config.dtype=... or '
        f'--xla_cpu_dots={wanted_now} on the command line to choose)'
    )
  return None
