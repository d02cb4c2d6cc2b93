"""Cached autoregressive generation for `DecoderLM` models.

    result = generate(model, params, input_ids, attention_mask,
                      max_new_tokens=32, temperature=0.7, top_p=0.9,
                      stop_tokens=(eos,))
    result.tokens   # [batch, max_new_tokens], `pad_id` after a stop token
    result.lengths  # new tokens per row, the stop token included

Prompts are left padded (`attention_mask` 0 on the padding). The prompt is
run through the model in one pass that fills the key/value cache; the new
tokens then come one at a time from a single jitted `lax.while_loop` that
stops when every row has produced a stop token or after `max_new_tokens`.
`temperature=0` is greedy decoding; otherwise the logits are divided by the
temperature, cut to the `top_k` most likely tokens (0: all) and to the
smallest set whose probability reaches `top_p` (1: all), and sampled.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import decoder as decoder_lib


@dataclasses.dataclass(frozen=True)
class Generated:
  tokens: np.ndarray  # [batch, max_new_tokens] int32
  lengths: np.ndarray  # [batch] new tokens up to and with the stop token


def filter_logits(logits: jnp.ndarray, top_k, top_p) -> jnp.ndarray:
  """Sets the logits outside the top-k / top-p (nucleus) set to -inf.

  `top_k` (0: no cut) and `top_p` (1: no cut) may be traced values.
  """
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  vocab = logits.shape[-1]
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
  kth = jnp.take(ordered, k - 1, axis=-1)[..., None]
  ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better ones
  kept = jnp.where((before < top_p) & (ordered > -jnp.inf), ordered, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def choose(logits, key, greedy: bool, temperature, top_k, top_p):
  """The next token per row from float32 logits [batch, vocab]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def init_cache(model: decoder_lib.DecoderLM, batch_size: int, max_length: int):
  """An empty key/value cache (the `cache` collection of `DecoderLM` with
  `decode=True`) for `batch_size` sequences of `max_length`."""
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), ids, decode=True)
  )['cache']
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.lru_cache(maxsize=32)
def _compiled(
    model,
    max_new_tokens: int,
    greedy: bool,
    stop_tokens: tuple[int, ...],
    pad_id: int,
):
  """The jitted generation function for one model and set of options."""
  stops = jnp.array(stop_tokens or (-1,), jnp.int32)

  def run(params, input_ids, attention_mask, key, temperature, top_k, top_p):
    batch, prompt_len = input_ids.shape
    cache = init_cache(model, batch, prompt_len + max_new_tokens)
    mask = jnp.concatenate(
        [
            attention_mask.astype(jnp.int32),
            jnp.zeros((batch, max_new_tokens), jnp.int32),
        ],
        axis=1,
    )
    positions = decoder_lib.mask_positions(attention_mask)
    logits, variables = model.apply(
        {'params': params, 'cache': cache},
        input_ids,
        mask,
        positions,
        decode=True,
        last_only=True,
        mutable=['cache'],
    )
    state = dict(
        step=jnp.array(0, jnp.int32),
        cache=variables['cache'],
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        done=jnp.zeros((batch,), bool),
        logits=logits[:, -1],
        key=key,
        mask=mask,
        position=positions[:, -1] + 1,
    )

    def body(s):
      key, sample_key = jax.random.split(s['key'])
      token = choose(s['logits'], sample_key, greedy, temperature, top_k, top_p)
      token = jnp.where(s['done'], pad_id, token)
      tokens = jax.lax.dynamic_update_slice(
          s['tokens'], token[:, None], (0, s['step'])
      )
      done = s['done'] | jnp.isin(token, stops)
      mask = jax.lax.dynamic_update_slice(
          s['mask'],
          jnp.ones((batch, 1), jnp.int32),
          (0, prompt_len + s['step']),
      )
      logits, variables = model.apply(
          {'params': params, 'cache': s['cache']},
          token[:, None],
          mask,
          s['position'][:, None],
          decode=True,
          mutable=['cache'],
      )
      return dict(
          step=s['step'] + 1,
          cache=variables['cache'],
          tokens=tokens,
          done=done,
          logits=logits[:, -1],
          key=key,
          mask=mask,
          position=s['position'] + 1,
      )

    def cond(s):
      return (s['step'] < max_new_tokens) & ~jnp.all(s['done'])

    final = jax.lax.while_loop(cond, body, state)
    return final['tokens'], final['step']

  return jax.jit(run)


def generate(
    model: decoder_lib.DecoderLM,
    params,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
) -> Generated:
  """Continues each left-padded prompt row; see the module docstring."""
  input_ids = np.asarray(input_ids, np.int32)
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  attention_mask = np.asarray(attention_mask, np.int32)
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(
        f'input_ids {input_ids.shape} and attention_mask '
        f'{attention_mask.shape} must both be [batch, length]'
    )
  if not attention_mask[:, -1].all():
    raise ValueError(
        'prompts must be left padded: the last column of '
        'attention_mask must be 1 in every row'
    )
  if max_new_tokens < 1:
    raise ValueError(
        f'max_new_tokens={max_new_tokens}: generate at least ' 'one token'
    )
  if not 0 < top_p <= 1 or top_k < 0 or temperature < 0:
    raise ValueError(
        f'temperature={temperature}, top_k={top_k}, '
        f'top_p={top_p}: need temperature >= 0, top_k >= 0 '
        'and 0 < top_p <= 1'
    )
  cfg = model.config
  if cfg.kind == 'gpt2' and input_ids.shape[1] + max_new_tokens > (
      cfg.max_positions
  ):
    raise ValueError(
        f'prompt length {input_ids.shape[1]} + max_new_tokens '
        f'{max_new_tokens} exceeds n_positions='
        f'{cfg.max_positions}: shorten one of them'
    )
  fn = _compiled(
      model,
      int(max_new_tokens),
      temperature == 0,
      tuple(int(t) for t in stop_tokens),
      int(pad_id),
  )
  tokens, steps = fn(
      params,
      input_ids,
      attention_mask,
      jax.random.PRNGKey(seed),
      jnp.float32(temperature),
      jnp.int32(top_k),
      jnp.float32(top_p),
  )
  tokens, steps = np.asarray(tokens), int(steps)
  stopped = (
      np.isin(tokens, list(stop_tokens))
      if stop_tokens
      else (np.zeros_like(tokens, bool))
  )
  first = np.where(stopped.any(1), stopped.argmax(1) + 1, steps)
  return Generated(tokens, first.astype(np.int32))
