"""Streaming input pipeline (ArrayRecord) vs the MiniLM train step, and memory.

  python benchmarks/input_pipeline.py [--batches=300] [--train_steps=3] [--factor=10]

For MiniLM on SST-2 (../shared/data/sst2, batch 32, max_length 64, length
buckets 16/32/64 as in experiments/minilm_sst2.py), in one run:
  * converts train.tsv (+ dev.tsv as validation and test) into ArrayRecord
    twice, once keeping raw text and once tokenized at conversion;
  * input pipeline: batches/s of `TrainStream` reading the records (random
    access through grain, 1 and 2 read threads), for both tokenization
    modes, and over the in-memory table for reference;
  * train step: seconds per MiniLM train step (bert_throughput's pmapped
    step on random tokens) at each bucket length, weighted by how often the
    stream produced that length -> steps/s, and the ratio pipeline/step;
  * peak memory (VmHWM) of a fresh process that builds the data and pulls
    batches, for the data set of N rows and of factor x N rows (SST-2
    repeated), streamed and in memory; and of the conversion itself.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import minilm_sst2
from tuning.data import records

BATCH = 32


def peak_rss_mib() -> float:
  with open('/proc/self/status', encoding='utf-8') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def config(records_dir=None, train=None):
  """The MiniLM/SST-2 data config: dev.tsv as validation and test."""
  c = minilm_sst2.get_config('full')
  dev = c.data.validation_path
  if records_dir:
    c.data.source = 'array_record'
    c.data.records_dir = records_dir
  else:
    c.data.path = train or c.data.path
    c.data.test_path = dev
  return c


def convert(train_tsv, out, tokenizer=None):
  c = minilm_sst2.get_config('full')
  columns = records.Columns('label', 'sentence')
  kwargs = dict(
      columns=columns, tokenizer=tokenizer, max_length=64, progress=False
  )
  start = time.perf_counter()
  entry = records.convert([train_tsv], 'tsv', out, 'train', **kwargs)
  seconds = time.perf_counter() - start
  for split in ('validation', 'test'):
    records.convert([c.data.validation_path], 'tsv', out, split, **kwargs)
  return entry['num_examples'], seconds


def pipeline_rate(train, batches: int, threads: int = 1):
  """Batches/s of a TrainStream over `train`, and the bucket lengths."""
  from tuning.data.pipeline import TrainStream

  stream = TrainStream(
      train, BATCH, seed=0, buckets=(16, 32, 64), read_threads=threads
  )
  for _ in range(5):
    next(stream)
  lengths = []
  start = time.perf_counter()
  for _ in range(batches):
    lengths.append(next(stream)['input_ids'].shape[1])
  return batches / (time.perf_counter() - start), lengths


def train_step_seconds(lengths, steps: int) -> dict:
  from benchmarks import bert_throughput
  from benchmarks import timing

  out = {}
  for length in sorted(set(lengths)):
    train_once = bert_throughput.jax_train(
        minilm_sst2.minilm_source(), BATCH, length
    )
    out[length] = timing.timed(train_once, steps)
    print(
        f'  train step at length {length:3d}: {out[length]:.3f} s', flush=True
    )
  return out


def memory_child(args):
  """In a fresh process: build the data, pull batches, print peak RSS."""
  from tuning.data.datasets import build_datasets
  from tuning.data.pipeline import TrainStream

  c = config(args.records_dir or None, args.train or None)
  data = build_datasets(c.data)
  stream = TrainStream(data.train, BATCH, seed=0, buckets=(16, 32, 64))
  for _ in range(args.batches):
    next(stream)
  print(
      json.dumps(
          {
              'peak_mib': peak_rss_mib(),
              'train': len(data.train)
              if not isinstance(data.train, dict)
              else len(data.train['label']),
          }
      )
  )


def convert_child(args):
  n, _ = convert(args.train, args.records_dir, args.tokenizer or None)
  print(json.dumps({'peak_mib': peak_rss_mib(), 'train': n}))


def child(*flags) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), *flags],
      capture_output=True,
      text=True,
      env=env,
      check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', type=int, default=300)
  parser.add_argument('--train_steps', type=int, default=3)
  parser.add_argument('--factor', type=int, default=10)
  parser.add_argument('--skip_in_memory_10x', action='store_true')
  parser.add_argument('--child', choices=['memory', 'convert'])
  parser.add_argument('--records_dir', default='')
  parser.add_argument('--train', default='')
  parser.add_argument('--tokenizer', default='')
  args = parser.parse_args()
  if args.child == 'memory':
    return memory_child(args)
  if args.child == 'convert':
    return convert_child(args)

  from tuning.data.datasets import build_datasets

  train_tsv = minilm_sst2.get_config('full').data.path
  tokenizer = minilm_sst2.minilm_source()
  tmp = tempfile.mkdtemp(prefix='input_pipeline_')
  dirs = {
      'on the fly': os.path.join(tmp, 'raw'),
      'at conversion': os.path.join(tmp, 'tokenized'),
  }
  print(f'SST-2 train: {train_tsv}; records in {tmp}')
  for mode, out in dirs.items():
    n, seconds = convert(
        train_tsv, out, tokenizer if mode == 'at conversion' else None
    )
    print(
        f'  converted {n} rows (tokenize {mode}) in {seconds:.1f} s '
        f'({n / seconds:,.0f} rows/s)'
    )

  print(f'\ninput pipeline, batch {BATCH}, {args.batches} batches:')
  rates, lengths = {}, None
  for mode, out in dirs.items():
    data = build_datasets(config(out).data)
    for threads in (1, 2):
      rates[f'records, tokenized {mode}, {threads} thr'], lengths = (
          pipeline_rate(data.train, args.batches, threads)
      )
  data = build_datasets(config().data)
  rates['in-memory table (reference)'], _ = pipeline_rate(
      data.train, args.batches
  )
  for name, rate in rates.items():
    print(f'  {name:40s} {rate:8.1f} batches/s')

  counts = {l: lengths.count(l) / len(lengths) for l in sorted(set(lengths))}
  print(
      '\nMiniLM train step (float32, CPU, batch 32), bucket mix '
      + ', '.join(f'{l}: {100 * f:.0f}%' for l, f in counts.items())
      + ':'
  )
  seconds = train_step_seconds(lengths, args.train_steps)
  mean = sum(f * seconds[l] for l, f in counts.items())
  fastest = min(seconds.values())
  print(
      f'  {1 / mean:.2f} steps/s on the SST-2 bucket mix '
      f'(fastest bucket: {1 / fastest:.2f} steps/s)'
  )
  for name, rate in rates.items():
    if name.startswith('records'):
      print(
          f'  pipeline / train step, {name}: {rate * mean:,.0f}x '
          f'(vs the fastest bucket: {rate * fastest:,.0f}x; target >= 10x)'
      )

  big = os.path.join(tmp, f'train_x{args.factor}.tsv')
  with open(train_tsv, encoding='utf-8') as f:
    header, *rows = f.readlines()
  with open(big, 'w', encoding='utf-8') as f:
    f.write(header)
    for _ in range(args.factor):
      f.writelines(rows)
  print(
      f'\npeak memory (VmHWM of a fresh process; data built, '
      f'{args.batches} batches pulled):'
  )
  for mode, tok in (('on the fly', ''), ('at conversion', tokenizer)):
    for label, source in (('N', train_tsv), (f'{args.factor}N', big)):
      out = os.path.join(tmp, f'{label}_{"tok" if tok else "raw"}')
      conv = child(
          '--child=convert',
          f'--train={source}',
          f'--records_dir={out}',
          f'--tokenizer={tok}',
      )
      run = child(
          '--child=memory', f'--records_dir={out}', f'--batches={args.batches}'
      )
      print(
          f'  records, tokenized {mode:13s} {label:>3s} = '
          f'{run["train"]:7d} rows: training {run["peak_mib"]:6.0f} MiB, '
          f'conversion {conv["peak_mib"]:6.0f} MiB',
          flush=True,
      )
  for label, source in (('N', train_tsv), (f'{args.factor}N', big)):
    if label != 'N' and args.skip_in_memory_10x:
      continue
    run = child(
        '--child=memory', f'--train={source}', f'--batches={args.batches}'
    )
    print(
        f'  in-memory table (reference) {label:>3s} = {run["train"]:7d} '
        f'rows: training {run["peak_mib"]:6.0f} MiB',
        flush=True,
    )


if __name__ == '__main__':
  main()
