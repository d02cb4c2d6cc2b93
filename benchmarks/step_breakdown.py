"""Where the time of tuning's MiniLM train step goes (issue #14's profile).

  python benchmarks/step_breakdown.py [--batch=32] [--length=128] [--steps=4]
      [--trace]

Times, interleaved (each repetition runs every variant once) and as medians
of process CPU seconds per call (steadier than wall time on a shared
machine), jitted variants of the float32 train step that each leave one
thing out: the full step with threefry or hash dropout bits; forward and
backward with per-example keys (tuning/models/dropout.py) or one key, with threefry,
hash or rbg bits or without dropout; exact (erf) GELU replaced by ReLU;
clipping plus AdamW alone. Differences between them give the cost of the
dropout bits, of per-example dropout keys, GELU and the optimizer; XLA's FLOP count over the
peak matmul rate (per CPU second) gives the time the matmuls would take at
that peak. `--trace` also records a jax.profiler trace of the default step
and sums its per-op times by kind (matmul fusions, LayerNorm, dropout,
GELU, softmax, other elementwise ops), from XLA's optimised HLO.
"""

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from tuning.platform import xla_cpu

if __name__ == '__main__':
  xla_cpu.choose('auto', 'float32')  # as main.py for a float32 run

import jax
import jax.numpy as jnp
import optax

from experiments import minilm_sst2
from tuning.config.defaults import base_config
from tuning.methods import optimizers
from tuning.engine import prng
from tuning.engine import train_step as ts
from tuning.models import bert_hf
from tuning.models import hf_config as hf_config_lib
from tuning.tasks.classification import cross_entropy


def cpu_times(fns: dict, reps: int) -> dict:
  """{name: median CPU seconds per call}, interleaved after a warm-up."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.process_time()
      jax.block_until_ready(fn())
      times[name].append(time.process_time() - start)
  return {k: statistics.median(v) for k, v in times.items()}


def variants(batch: int, length: int):
  hf_config = hf_config_lib.read_hf_config(minilm_sst2.minilm_source())
  model = bert_hf.from_hf_config(hf_config, 2, dropout=0.1)
  relu = bert_hf.from_hf_config(
      dict(hf_config, hidden_act='relu'), 2, dropout=0.1
  )
  rng = np.random.default_rng(0)
  feats = {
      'input_ids': jnp.asarray(
          rng.integers(1000, 20000, (batch, length), np.int32)
      ),
      'attention_mask': jnp.ones((batch, length), jnp.int32),
      'token_type_ids': jnp.zeros((batch, length), jnp.int32),
  }
  labels = jnp.asarray(rng.integers(0, 2, (batch,), np.int32))
  index = jnp.arange(batch)
  data = dict(feats, label=labels, index=index)
  params = model.init(jax.random.key(0), feats['input_ids'][:1])['params']
  tx = optax.chain(
      optimizers.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01)
  )

  def grad(impl, per_example=True, train=True, m=model):
    key = jax.random.key(0, impl=prng.impl(impl))
    apply = ts.per_example_logits if per_example else ts.per_shard_logits

    def loss(p):
      logits = apply(m, p, feats, index, key, train)
      return cross_entropy(logits, labels).mean()

    f = jax.jit(jax.grad(loss))
    return lambda: f(params)

  def full(impl):
    config = base_config()
    config.training.prng_impl = impl
    step = jax.jit(
        ts.train_step_fn(model, tx, lambda s: 1e-4, config),
        donate_argnums=0,
    )
    holder = {
        's': ts.TrainState(
            jnp.zeros((), jnp.int32),
            jax.tree.map(jnp.array, params),
            tx.init(params),
        )
    }

    def run():
      holder['s'], metrics = step(holder['s'], data)
      return metrics['loss']

    return run, step, holder

  opt = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
  opt_state = tx.init(params)
  default, default_step, holder = full('hash')
  fns = {
      'full step, threefry bits': full('threefry2x32')[0],
      'full step, hash bits (default)': default,
      'fwd+bwd per-example keys, threefry': grad('threefry2x32'),
      'fwd+bwd per-example keys, hash': grad('hash'),
      'fwd+bwd per-example keys, rbg': grad('rbg'),
      'fwd+bwd per-example keys, no dropout': grad('hash', train=False),
      'fwd+bwd one key, no dropout': grad(
          'hash', per_example=False, train=False
      ),
      'fwd+bwd one key, no dropout, ReLU for GELU': grad(
          'hash', per_example=False, train=False, m=relu
      ),
      'clip + AdamW update': lambda: opt(params, opt_state, params),
  }
  model_grad = jax.jit(
      jax.grad(
          lambda p: cross_entropy(
              model.apply({'params': p}, **feats, train=False), labels
          ).mean()
      )
  )
  cost = model_grad.lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return fns, float(cost.get('flops', 0.0)), (default_step, holder, data)


def peak_per_cpu_second(n: int = 2048) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / cpu_times({'mm': lambda: f(a)}, 5)['mm']


def _kind(op: str, op_name: str, has_dot: bool) -> str:
  name = op_name.lower()
  if has_dot:
    return 'matmul fusions'
  if 'random_bits' in name or 'threefry' in name:
    return 'dropout bits'
  for key, kind in (
      ('dropout', 'dropout masks'),
      ('layernorm', 'LayerNorm'),
      ('erf', 'GELU'),
      ('gelu', 'GELU'),
      ('softmax', 'softmax'),
      ('embeddings', 'embeddings (gather, scatter)'),
  ):
    if key in name:
      return kind
  if op in ('copy', 'transpose') or 'transpose' in name.rsplit('/', 1)[-1]:
    return 'copies, transposes'
  return 'other elementwise, reductions, optimizer'


def trace_breakdown(step, holder, data) -> dict:
  """{kind: fraction of busy thread time} over two traced steps."""
  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _profile_data

  hlo = step.lower(holder['s'], data).compile().as_text()
  dots, current = set(), None
  for line in hlo.split('\n'):
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head and ' = ' not in line:
      current = head.group(1)
    elif current and (' dot(' in line or ' convolution(' in line):
      dots.add(current)
  kinds = {}
  for line in hlo.split('\n'):
    m = re.match(r'^\s*%?([\w.\-]+) = \S+ ([\w\-]+)\(', line)
    if m:
      calls = re.search(r'calls=%?([\w.\-]+)', line)
      op_name = re.search(r'op_name="([^"]*)"', line)
      kinds[m.group(1)] = _kind(
          m.group(2),
          op_name.group(1) if op_name else '',
          m.group(2) == 'dot' or bool(calls and calls.group(1) in dots),
      )
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder):
    for _ in range(2):
      holder['s'], metrics = step(holder['s'], data)
      jax.block_until_ready(metrics['loss'])
  path = glob.glob(f'{folder}/**/*.xplane.pb', recursive=True)[0]
  totals = collections.Counter()
  for plane in _profile_data.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if 'XLAEigen' not in line.name and 'PjRtCpuClient' not in line.name:
        continue
      for event in line.events:
        if event.name in kinds:
          totals[kinds[event.name]] += event.duration_ns
  busy = sum(totals.values())
  return {k: v / busy for k, v in totals.most_common()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--trace', action='store_true')
  args = parser.parse_args()
  print(
      f'MiniLM-L6 train step, batch {args.batch}, length {args.length}, '
      f'float32; load average {os.getloadavg()[0]:.1f}; medians of '
      f'{args.steps} interleaved repetitions, CPU seconds per call'
  )
  fns, flops, traced = variants(args.batch, args.length)
  peak = peak_per_cpu_second()
  times = cpu_times(fns, args.steps)
  full = times['full step, threefry bits']
  for name, seconds in times.items():
    print(f'  {name:<44} {seconds:6.2f} s  ({seconds / full:4.0%})')
  t = times
  no_dropout = t['fwd+bwd per-example keys, no dropout']
  print(
      f'matmuls at the peak rate ({peak / 1e9:.0f} GFLOP per CPU s, '
      f'{flops / 1e9:.0f} GFLOP): {flops / peak:.2f} s\n'
      f'threefry bits: {t["fwd+bwd per-example keys, threefry"] - no_dropout:+.2f} s, '
      f'hash bits: {t["fwd+bwd per-example keys, hash"] - no_dropout:+.2f} s, '
      f'rbg bits: {t["fwd+bwd per-example keys, rbg"] - no_dropout:+.2f} s; '
      f'per-example keys, no dropout: {no_dropout - t["fwd+bwd one key, no dropout"]:+.2f}'
      f' s; exact GELU vs ReLU: '
      f'{t["fwd+bwd one key, no dropout"] - t["fwd+bwd one key, no dropout, ReLU for GELU"]:+.2f}'
      f' s; clip + AdamW: {t["clip + AdamW update"]:.2f} s'
  )
  if args.trace:
    print('traced default step, share of busy thread time by kind:')
    for kind, share in trace_breakdown(*traced).items():
      print(f'  {share:6.1%}  {kind}')


if __name__ == '__main__':
  main()
