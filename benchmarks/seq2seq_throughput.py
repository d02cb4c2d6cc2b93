"""Encoder-decoder (Marian shape) training and beam-search throughput:
tuning (JAX) against transformers' MarianMTModel (PyTorch), same weights.

  python benchmarks/seq2seq_throughput.py [--steps=5] [--decode_calls=3]
      [--bf16]

One random MarianMTModel (3+3 layers, d_model 256, 4 heads, FFN 1024, 8k
vocabulary, dropout 0.1, float32) is built in PyTorch and its weights are
converted with tuning's converter (`encoder_decoder_hf.convert_hf`), so both
sides compute with the same parameters and shapes. Measured in one run:

  * the machine's float32 matmul peak (XLA), the denominator of MFU;
  * training: tuning's train step (`train_step_fn`: per-example dropout,
    forward, backward, AdamW; jitted, state donated) and PyTorch's
    forward + backward + AdamW on the same batch (64 pairs, source and
    target length 32): target tokens/s;
  * decoding: beam search with 4 beams on 32 sources of 32 tokens, exactly
    32 new tokens each on both sides (PyTorch: min_new_tokens =
    max_new_tokens = 32; tuning: an end-of-sentence id no token has), so
    that both do the same steps: sentences/s and tokens/s;
  * MFU: XLA's FLOP count of tuning's programs (the train step; encoder,
    cross keys/values and 32 cached decoder steps) per second over the
    peak, the same count for both sides;
  * with `--bf16`, training in bfloat16 too: tuning's bfloat16 model
    (float32 parameters and optimizer state) against PyTorch's step under
    `torch.autocast('cpu', torch.bfloat16)`. XLA:CPU's dots are then
    YNNPACK's for every row, as main.py picks for a bfloat16 run.

It prints a table with the ratios tuning / PyTorch. XLA:CPU's dots and
glibc's malloc settings are main.py's (tuning/platform/xla_cpu.py,
tuning/platform/host_malloc.py; `--malloc=default` keeps glibc's own), for both
frameworks.
"""

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from tuning.platform import host_malloc
from tuning.platform import xla_cpu

if __name__ == '__main__':  # before JAX starts: main.py's settings
  host_malloc.restart_with_tunables(
      host_malloc.choice_from_argv(sys.argv, '--malloc')
  )
  xla_cpu.choose('auto', 'bfloat16' if '--bf16' in sys.argv else 'float32')

import jax
import jax.numpy as jnp
import optax

from benchmarks import torch_reference
from benchmarks.timing import peak_matmul_flops, timed, torch_peak_matmul_flops
from benchmarks.timing import torch_timed
from benchmarks.timing import xla_flops
from tuning.decoding import encoder_decoder as ed_decoding
from tuning.models import encoder_decoder as ed
from tuning.models import encoder_decoder_hf as ed_hf
from tuning.config.defaults import base_config
from tuning.engine.train_step import initial_state, train_step_fn

VOCAB, WIDTH, LAYERS, HEADS, FFN = 8000, 256, 3, 4, 1024
PAD, EOS, START = 0, 1, 0
HF_CONFIG = dict(
    vocab_size=VOCAB,
    d_model=WIDTH,
    encoder_layers=LAYERS,
    decoder_layers=LAYERS,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=FFN,
    decoder_ffn_dim=FFN,
    max_position_embeddings=128,
    activation_function='swish',
    dropout=0.1,
    attention_dropout=0.0,
    activation_dropout=0.0,
    scale_embedding=True,
    pad_token_id=PAD,
    eos_token_id=EOS,
    decoder_start_token_id=START,
    forced_eos_token_id=None,
)
_INPUTS = (
    'input_ids',
    'attention_mask',
    'decoder_input_ids',
    'decoder_attention_mask',
)


def batch_of(rng, batch: int, length: int) -> dict:
  """Random full-length source/target pairs (numpy)."""
  src = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
  labels = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
  decoder_in = np.concatenate(
      [np.full((batch, 1), START, np.int32), labels[:, :-1]], axis=1
  )
  return {
      'input_ids': src,
      'attention_mask': np.ones_like(src),
      'decoder_input_ids': decoder_in,
      'decoder_attention_mask': np.ones_like(src),
      'labels': labels,
      'index': np.arange(batch, dtype=np.int32),
  }


def token_loss(logits, batch):
  """Sum of target-token cross-entropies, and the token count."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch['labels'][..., None], axis=-1)[..., 0]
  mask = batch['decoder_attention_mask'].astype(jnp.float32)
  return (nll * mask).sum(), {'tokens': mask.sum()}


class TokenTask:
  """The train step's task: `token_loss` over the target tokens."""

  loss = staticmethod(token_loss)

  @staticmethod
  def loss_weight(batch):
    return batch['decoder_attention_mask'].sum().astype(jnp.float32)

  @staticmethod
  def inputs(batch):
    return {k: batch[k] for k in _INPUTS}


def jax_train(model, params, batch):
  """tuning's train step on `batch`: (one step, its FLOPs)."""
  tx = optax.adamw(1e-4, weight_decay=0.01)
  step = train_step_fn(model, tx, lambda s: 1e-4, base_config(), task=TokenTask)
  flops = xla_flops(step, initial_state(params, tx), batch)
  compiled = jax.jit(step, donate_argnums=(0,))
  holder = {'state': jax.device_put(initial_state(params, tx))}
  batch = jax.device_put(batch)

  def once():
    holder['state'], metrics = compiled(holder['state'], batch)
    return metrics['loss']

  return once, flops


def decode_flops(model, params, batch: int, beams: int, length: int, new: int):
  """XLA's FLOPs of encoding, cross keys/values and `new` cached decoder
  steps of batch x beams rows (the work of one beam search)."""
  variables = {'params': params}
  ids = jnp.ones((batch, length), jnp.int32)
  encode = lambda p: model.apply(  # noqa: E731
      {'params': p}, ids, ids, method=ed.EncoderDecoder.encode
  )
  encoded = jax.eval_shape(encode, params)
  cross = lambda e: model.apply(  # noqa: E731
      variables, e, method=ed.EncoderDecoder.cross_keys_values
  )
  rows = batch * beams
  tiled = jax.eval_shape(
      lambda e: jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), cross(e)),
      encoded,
  )
  cache = ed_decoding.init_cache(model, rows, new)

  def step(tokens, kv, cache):
    return model.apply(
        variables,
        tokens,
        kv,
        jnp.ones((rows, length), jnp.int32),
        cache=cache,
        method=ed.EncoderDecoder.decode,
    )

  tokens = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
  return (
      xla_flops(encode, params)
      + xla_flops(cross, encoded)
      + new * xla_flops(step, tokens, tiled, cache)
  )


def jax_decode(model, params, src, beams: int, new: int):
  """One beam search of `src` that always runs `new` steps."""
  never_ends = ed.EncoderDecoder(
      dataclasses.replace(model.config, eos_id=-1), model.dtype
  )
  params = jax.device_put(params)
  ids, mask = jax.device_put(src), jax.device_put(np.ones_like(src))

  def once():
    return ed_decoding.generate(
        never_ends,
        params,
        ids,
        mask,
        beam_size=beams,
        max_new_tokens=new,
        length_ratio=0.0,
    ).tokens

  tokens = np.asarray(once())
  assert (tokens[:, 0] != PAD).all(), 'a hypothesis ended early'
  return once


def torch_side(
    hf, batch: dict, src, beams: int, new: int, steps: int, bf16: bool
):
  """PyTorch train-step and beam-search seconds, the tokens it wrote, and
  (with `bf16`) the seconds of a train step under bfloat16 autocast."""
  import torch  # pylint: disable=g-import-not-at-top

  opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01)
  t = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

  def train_once(bf16=False):
    hf.train()
    with torch_reference.autocast(bf16):
      out = hf(
          input_ids=t['input_ids'],
          attention_mask=t['attention_mask'],
          decoder_input_ids=t['decoder_input_ids'],
          decoder_attention_mask=t['decoder_attention_mask'],
          labels=t['labels'],
      )
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    return out.loss.item()

  source = torch.tensor(src, dtype=torch.long)

  def decode_once():
    hf.eval()
    with torch.no_grad():
      return hf.generate(
          input_ids=source,
          attention_mask=torch.ones_like(source),
          num_beams=beams,
          do_sample=False,
          max_new_tokens=new,
          min_new_tokens=new,
          early_stopping=False,
          length_penalty=1.0,
          no_repeat_ngram_size=0,
          repetition_penalty=1.0,
          bad_words_ids=None,
          forced_eos_token_id=None,
          num_return_sequences=1,
      )

  train_s = torch_timed(train_once, steps, warmup=1)
  bf16_s = torch_timed(lambda: train_once(True), steps, 1) if bf16 else None
  decode_s = torch_timed(decode_once, max(1, steps // 2), warmup=1)
  out = decode_once()
  written = out.shape[1] - 1  # without the start token
  return (
      train_s,
      decode_s,
      written,
      torch.__version__,
      torch.get_num_threads(),
      bf16_s,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--length', type=int, default=32)
  parser.add_argument('--decode_batch', type=int, default=32)
  parser.add_argument('--beams', type=int, default=4)
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--decode_calls', type=int, default=3)
  parser.add_argument('--bf16', action='store_true')
  host_malloc.add_benchmark_flag(parser)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  began = time.perf_counter()
  b, n, db, k, new = (
      args.batch,
      args.length,
      args.decode_batch,
      args.beams,
      args.new_tokens,
  )
  print(
      f'jax {jax.__version__} on {jax.devices()[0].platform} '
      f'({jax.device_count()} device(s), {os.cpu_count()} CPUs); '
      f'Marian {LAYERS}+{LAYERS} layers, d_model {WIDTH}, vocab {VOCAB}, '
      'float32'
  )
  peak = peak_matmul_flops()
  torch_peak = torch_peak_matmul_flops()
  print(
      f'peak matmul (2048^2 f32): XLA {peak / 1e9:.1f} GFLOP/s, PyTorch '
      f'{torch_peak / 1e9:.1f} GFLOP/s (MFU below uses the XLA figure)'
  )
  torch.manual_seed(0)
  hf = transformers.MarianMTModel(transformers.MarianConfig(**HF_CONFIG))
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  params, _ = ed_hf.convert_hf(tensors, hf.config.to_dict())
  model = ed.EncoderDecoder(ed_hf.config_from_hf(hf.config.to_dict()))
  rng = np.random.default_rng(0)
  batch = batch_of(rng, b, n)
  src = batch_of(rng, db, n)['input_ids']

  train_once, train_flops = jax_train(model, params, batch)
  jax_train_s = timed(train_once, args.steps)
  decode_once = jax_decode(model, params, src, k, new)
  jax_decode_s = timed(decode_once, args.decode_calls, warmup=1)
  dec_flops = decode_flops(model, params, db, k, n, new)
  if args.bf16:
    bf16_once, _ = jax_train(
        ed.EncoderDecoder(model.config, jnp.bfloat16), params, batch
    )
    jax_bf16_s = timed(bf16_once, args.steps)
  torch_train_s, torch_decode_s, written, version, threads, torch_bf16_s = (
      torch_side(hf, batch, src, k, new, args.steps, args.bf16)
  )
  assert written == new, f'PyTorch wrote {written} tokens, not {new}'

  target_tokens = b * n
  rows = [
      (
          'train target tokens/s',
          target_tokens / jax_train_s,
          target_tokens / torch_train_s,
          '.0f',
      ),
      (
          'train MFU',
          train_flops / jax_train_s / peak,
          train_flops / torch_train_s / peak,
          '.1%',
      ),
      (
          f'beam-{k} sentences/s',
          db / jax_decode_s,
          db / torch_decode_s,
          '.1f',
      ),
      (
          f'beam-{k} new tokens/s',
          db * new / jax_decode_s,
          db * new / torch_decode_s,
          '.0f',
      ),
      (
          f'beam-{k} MFU',
          dec_flops / jax_decode_s / peak,
          dec_flops / torch_decode_s / peak,
          '.2%',
      ),
  ]
  if args.bf16:
    rows.insert(
        2,
        (
            'train bf16 tokens/s',
            target_tokens / jax_bf16_s,
            target_tokens / torch_bf16_s,
            '.0f',
        ),
    )
  print(
      f'\ntrain: batch {b}, source/target length {n}, '
      f'{train_flops / 1e9:.1f} GFLOP/step; beam {k}: {db} sources of {n} '
      f'tokens, {new} new tokens each, {dec_flops / 1e9:.1f} GFLOP/call; '
      f'PyTorch {version} with {threads} threads'
  )
  print(f'{"":24} {"tuning (JAX)":>14} {"PyTorch":>14} {"ratio":>7}')
  for name, ours, theirs, spec in rows:
    print(
        f'{name:24} {ours:>14{spec}} {theirs:>14{spec}} '
        f'{ours / theirs:>6.2f}x'
    )
  print(
      f'(train {jax_train_s * 1e3:.0f} vs {torch_train_s * 1e3:.0f} ms/step; '
      f'beam {jax_decode_s * 1e3:.0f} vs {torch_decode_s * 1e3:.0f} ms/call; '
      f'whole benchmark {time.perf_counter() - began:.0f} s)'
  )


if __name__ == '__main__':
  main()
