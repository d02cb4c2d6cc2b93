"""Cached decoding of `EncoderDecoder` models: beam search on the device.

    beams = generate(model, params, input_ids, attention_mask,
                     beam_size=4, max_new_tokens=64, length_ratio=1.5)
    beams.tokens    # [batch, beam, max_length], best first, `pad_id` after EOS
    beams.scores    # [batch, beam]

The source is encoded once and its cross-attention keys and values
(`EncoderDecoder.cross_keys_values`) computed once; the target then comes
one token at a time through `EncoderDecoder.decode` with the self-attention
cache of `init_cache` (each decoder layer's keys and values, written in
place at `cache['index']`), driven by tuning/decoding/beam_search.py (greedy
decoding at beam size 1). tuning/decoding/translation.py batches lists of
sentences through `generate`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tuning.decoding import beam_search as beam_search_lib
from tuning.models import encoder_decoder as ed


def init_cache(model: ed.EncoderDecoder, batch_size: int, max_length: int):
  """An empty self-attention cache for `max_length` target positions."""
  c = model.config
  if c.positions != 'relative' and max_length > c.max_positions:
    raise ValueError(
        f"max_length={max_length} exceeds the model's "
        f'{c.max_positions} positions: decode fewer tokens'
    )
  shape = (batch_size, max_length, c.heads, c.dim_per_head)
  cache = {'index': jnp.zeros((), jnp.int32)}
  for i in range(c.decoder_layers):
    cache[f'layer_{i}'] = {
        'key': jnp.zeros(shape, model.dtype),
        'value': jnp.zeros(shape, model.dtype),
    }
  return cache


@functools.partial(
    jax.jit,
    static_argnames=('model', 'beam_size', 'max_length', 'penalty_rule'),
)
def _generate(
    model,
    params,
    input_ids,
    attention_mask,
    *,
    beam_size,
    max_length,
    length_penalty,
    penalty_rule,
    early_stopping,
    length_ratio,
    length_offset,
):
  c = model.config
  batch = input_ids.shape[0]
  variables = {'params': params}
  encoded = model.apply(
      variables, input_ids, attention_mask, method=ed.EncoderDecoder.encode
  )
  cross = model.apply(
      variables, encoded, method=ed.EncoderDecoder.cross_keys_values
  )
  tile = lambda x: jnp.repeat(x, beam_size, axis=0)  # noqa: E731
  cross = jax.tree_util.tree_map(tile, cross)
  source_mask = tile(attention_mask)
  source_lengths = jnp.sum(attention_mask > 0, axis=1)
  limits = jnp.floor(length_offset + length_ratio * source_lengths)
  limits = jnp.clip(limits.astype(jnp.int32), 1, max_length)

  def step(tokens, cache, index):
    del index  # the cache holds it
    logits, cache = model.apply(
        variables,
        tokens[:, None],
        cross,
        source_mask,
        cache=cache,
        method=ed.EncoderDecoder.decode,
    )
    return logits[:, 0], cache

  return beam_search_lib.beam_search(
      step,
      init_cache(model, batch * beam_size, max_length),
      batch_size=batch,
      beam_size=beam_size,
      max_length=max_length,
      start_id=c.decoder_start_id,
      eos_id=c.eos_id,
      pad_id=c.pad_id,
      length_penalty=length_penalty,
      penalty_rule=penalty_rule,
      early_stopping=early_stopping,
      limits=limits,
  )


def generate(
    model: ed.EncoderDecoder,
    params,
    input_ids,
    attention_mask=None,
    *,
    beam_size: int = 4,
    max_new_tokens: int = 64,
    length_ratio: float = 0.0,
    length_penalty: float = 1.0,
    penalty_rule: str = 'transformers',
    early_stopping=False,
):
  """Translates a batch on the device: beam search, greedy for beam_size=1.

  Each source may produce up to floor(max_new_tokens + length_ratio *
  source_length) tokens (source_length counts its unpadded tokens), at
  most `max_new_tokens + length_ratio * padded length` and, with absolute
  positions, the model's position table. Compiles once per input shape
  and beam size (batch sources by length). Returns a
  `beam_search.Beams`: tokens [batch, beam, max_length] (without the start
  token, `pad_id` after EOS) and their scores, best first.
  """
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  max_length = int(
      math.floor(max_new_tokens + length_ratio * input_ids.shape[1])
  )
  if model.config.positions != 'relative':
    max_length = min(max_length, model.config.max_positions)
  if max_length < 1:
    raise ValueError(
        f'max_new_tokens={max_new_tokens} and length_ratio='
        f'{length_ratio} allow no token: raise them'
    )
  return _generate(
      model,
      params,
      jnp.asarray(input_ids),
      jnp.asarray(attention_mask),
      beam_size=beam_size,
      max_length=max_length,
      length_penalty=float(length_penalty),
      penalty_rule=penalty_rule,
      early_stopping=jnp.int32(
          beam_search_lib.early_stopping_code(early_stopping)
      ),
      length_ratio=float(length_ratio),
      length_offset=float(max_new_tokens),
  )
