"""Peak resident memory of MiniLM training steps, one framework per process.

  python benchmarks/peak_memory.py --framework=jax|torch [--batch=32]
      [--length=128] [--steps=10] [--dtype=float32] [--prng_impl=hash]

Runs `--steps` train steps of MiniLM-L6 (tuning's default pmapped step, or
PyTorch's `BertForSequenceClassification` with AdamW) and prints one line:
`peak_rss_mib=<peak resident memory of this process, MiB>` (VmHWM from
/proc/self/status: ru_maxrss would report the parent's resident size when
that was larger, as Linux keeps it across fork and exec). benchmarks/bert_throughput.py
--memory runs it once per framework. `--dtype=bfloat16` trains in bfloat16 compute
(PyTorch: under `torch.autocast`); with --framework=jax, `--prng_impl`
picks the dropout bits, and XLA:CPU's dots are main.py's for
that dtype (tuning/platform/xla_cpu.py) unless XLA_FLAGS chose them. glibc's
malloc settings are the parent's (GLIBC_TUNABLES is inherited;
tuning/platform/host_malloc.py). Measured (float32, batch 32, length 128, 10 steps,
AMD EPYC): tuning 2,699 MiB with glibc's malloc, 2,574 MiB with main.py's
tuned settings; PyTorch 2,179 / 2,190 MiB. Measured again later (one
process each): glibc's settings, tuning 2,511-2,517 float32 and
2,527-2,572 bfloat16, PyTorch 2,186 and 1,910 (autocast); tuned, tuning's
peak varied from run to run (float32 2,394 or 3,580 over six runs,
bfloat16 2,456-4,920), PyTorch's did not (2,124-2,197; 1,888).
"""

import argparse
import os
import resource
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--framework', choices=('jax', 'torch'), required=True)
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--prng_impl', default='hash')
  args = parser.parse_args()
  # pylint: disable=g-import-not-at-top
  if args.framework == 'torch':
    from benchmarks import torch_reference

    train_once = torch_reference.steps(
        args.model_dir, args.batch, args.length, args.dtype
    )[0]
  else:
    from tuning.platform import xla_cpu

    xla_cpu.choose('auto', args.dtype)  # main.py's dots, before JAX starts
    import bert_throughput

    train_once = bert_throughput.jax_train(
        args.model_dir,
        args.batch,
        args.length,
        dtype=args.dtype,
        prng_impl=args.prng_impl,
    )
  for _ in range(args.steps):
    np.asarray(train_once()).sum()
  print(f'peak_rss_mib={peak_rss_mib():.0f}')


def peak_rss_mib() -> float:
  try:
    with open('/proc/self/status') as status:
      for line in status:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == '__main__':
  main()
