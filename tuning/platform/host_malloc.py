"""glibc malloc settings for a training process, set before it starts.

XLA:CPU allocates the temporaries of each execution as one block: 348 MB
for a MiniLM train step of 32 x 16 tokens, 1.4 GB at 32 x 128. glibc serves
a block that large with a fresh `mmap` and gives it back with `munmap` when
it is freed, so every step faults the whole block in again, 4 KiB at a
time. Measured on a 2-core EPYC (benchmarks/bert_throughput.py, issue #14):
85,000 page faults and 175 ms of kernel time in a 400 ms step at length
16; 346,000 faults and 630 ms in a 2.5 s step at length 128. PyTorch's
steps fault too (46,000 and 61,000), less.

With these glibc tunables the freed memory stays in the process and is
reused, and what is faulted in comes in 2 MiB pages where the kernel's
transparent huge pages allow it (`madvise` mode):

  glibc.malloc.hugetlb=1            malloc's memory madvise(MADV_HUGEPAGE)d
  glibc.malloc.mmap_max=0           large blocks from the heap, not mmap
  glibc.malloc.trim_threshold=...   the heap is not shrunk after a free
  glibc.malloc.arena_max=1          one heap for all threads (a thread's
                                    own arena cannot hold blocks this big)

Then the faults per step drop to about none (all four are needed: without
arena_max=1, a MiniLM step at length 128 still spent 745 ms in the kernel).
The costs: memory freed by the process is not returned to the system
until it exits, so the resident size stays at its peak, and that peak
varies from run to run: 10 float32 MiniLM steps (32 x 128) peaked at
2,394 or 3,580 MiB over six runs (2,511-2,517 with glibc's settings), 10
bfloat16 ones at 2,456-4,920 (2,527-2,572), where PyTorch's stayed at
2,124-2,197 (benchmarks/peak_memory.py). `--malloc=default` is the
choice where memory is tight;
and compiling under one arena is slower: the quickstart, a 30 s run that
is mostly compilation, took 31-35 s against 29-30 s (four runs).

glibc reads GLIBC_TUNABLES once, when a program starts, so main.py calls
`restart_with_tunables` first thing (through
tuning/platform/process_flags.py, from its `--malloc` flag; 'tuned' unless
given): it starts the same command again in the same process (`os.execv`,
same pid) with the variable set. Nothing happens where GLIBC_TUNABLES is
already set (by the user, or by that restart), off Linux/glibc, or with
`--malloc=default`. The benchmarks take the same `--malloc` flag
(`add_benchmark_flag`, `choice_from_argv`).
"""

from __future__ import annotations

import os
import platform
import sys

CHOICES = ('tuned', 'default')
TUNABLES = ':'.join(
    (
        'glibc.malloc.hugetlb=1',
        'glibc.malloc.mmap_max=0',
        f'glibc.malloc.trim_threshold={2**62}',
        'glibc.malloc.arena_max=1',
    )
)
_VARIABLE = 'GLIBC_TUNABLES'


def choice_from_argv(argv, flag: str = '--malloc') -> str:
  """The value of `flag` in argv ('tuned' when absent)."""
  for arg in argv:
    if arg.startswith(f'{flag}='):
      return arg.split('=', 1)[1]
  return 'tuned'


def applies(choice: str = 'tuned', environ=None) -> bool:
  """Whether `restart_with_tunables` would restart with `choice`."""
  environ = os.environ if environ is None else environ
  return (
      choice == 'tuned'
      and _VARIABLE not in environ
      and sys.platform.startswith('linux')
      and platform.libc_ver()[0] == 'glibc'
  )


def restart_with_tunables(choice: str = 'tuned') -> None:
  """Starts this program again with GLIBC_TUNABLES=TUNABLES (no return),
  where `applies(choice)`; else returns. Call it before anything else."""
  if not applies(choice):
    return
  os.environ[_VARIABLE] = TUNABLES
  try:
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
  except OSError:  # carry on with glibc's own settings
    del os.environ[_VARIABLE]


def add_benchmark_flag(parser) -> None:
  """Adds `--malloc=tuned|default` to a benchmark's argparse parser (the
  script restarts from `choice_from_argv(sys.argv, '--malloc')` first)."""
  parser.add_argument(
      '--malloc',
      choices=CHOICES,
      default='tuned',
      help="glibc malloc settings, as main.py's (tuning/platform/host_malloc.py); "
      'every framework in the process runs under them',
  )


def in_effect() -> bool:
  """Whether this process runs with `TUNABLES`."""
  return os.environ.get(_VARIABLE) == TUNABLES
