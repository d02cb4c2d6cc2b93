"""Temporary memory of a Llama-shaped train-step gradient per `model.remat`.

For a Llama-shaped decoder (8 layers, hidden 512, 8 heads / 4 key-value
heads, MLP 1408, vocabulary 8192, sequence 512, batch 8), the gradient of
the mean next-token loss is compiled (`jax.jit(...).lower(...).compile()`)
once per remat choice, and the compiled program's `memory_analysis()`
gives `temp_size_in_bytes`: the activations kept for the backward pass and
the other temporaries. Printed as a table with the ratio to 'none', all
measured in the same run. Nothing is run, only compiled: the figures are
XLA's buffer assignment for the backend it runs on (here XLA:CPU; nothing
was measured on an accelerator).

    python benchmarks/remat_memory.py [--dtype=float32|bfloat16] [--choices=a,b]

Printed on this shared 2-core CPU (XLA:CPU, float32, 2026-12-03,
`python benchmarks/remat_memory.py`):

    Llama-shaped decoder, 8 layers, hidden 512, batch 8, length 512, float32, backend cpu
    model.remat                          temp MiB  vs none
    none                                   4007.3     1.00
    full                                   3895.4     0.97
    dots_saveable                          3895.4     0.97
    dots_with_no_batch_dims_saveable       3895.4     0.97
    nothing_saveable                       3895.4     0.97
    everything_saveable                    3071.3     0.77
    save_only_these_names                  3895.4     0.97
    save_anything_except_these_names       3071.3     0.77

XLA:CPU's temporaries barely move (full remat 0.97 of none, and saving
everything 0.77, below none): its buffer assignment and scheduling, not the
activations kept, decide this figure on CPU, so it does not show what remat
saves on an accelerator. Nothing was measured on a GPU or TPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from tuning.models import decoder_hf
from tuning.models import remat as remat_lib

LLAMA = dict(
    model_type='llama',
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
NAMES = {
    'save_only_these_names': ('attention_out', 'mlp_out'),
    'save_anything_except_these_names': ('mlp_hidden',),
}


def temp_bytes(remat: str, dtype, batch: int, length: int) -> tuple[int, float]:
  model = decoder_hf.build(
      {
          'hf_config': LLAMA,
          'remat': remat,
          'remat_names': NAMES.get(remat, ()),
      },
      dtype,
  )
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), ids)['params']

  def loss(p, tokens):
    logits = model.apply({'params': p}, tokens, train=True)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile()
  seconds = time.perf_counter() - start
  return compiled.memory_analysis().temp_size_in_bytes, seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--choices', default=','.join(remat_lib.CHOICES))
  args = parser.parse_args()
  choices = args.choices.split(',')
  if choices[0] != 'none':
    choices = ['none'] + [c for c in choices if c != 'none']
  dtype = jnp.dtype(args.dtype)
  print(
      f'Llama-shaped decoder, 8 layers, hidden 512, batch {args.batch}, '
      f'length {args.length}, {args.dtype}, backend {jax.default_backend()}'
  )
  print(f'{"model.remat":<34} {"temp MiB":>10} {"vs none":>8}')
  base = None
  for remat in choices:
    size, _ = temp_bytes(remat, dtype, args.batch, args.length)
    base = base or size
    print(f'{remat:<34} {size / 2**20:>10.1f} {size / base:>8.2f}', flush=True)


if __name__ == '__main__':
  main()
