"""Beam search on the device, in one `lax.while_loop`, for any decoder.

The model enters through a step function

    step_fn(tokens [batch * beam] int32, state, step) -> (logits, state)

that returns the next-token logits [batch * beam, vocab] of the last tokens
given a `state` (a pytree: a key/value cache, an index, ...). Every array
leaf of `state` with a leading axis holds batch * beam rows (beam-major
within each batch item); the search reorders them along that axis as beams
are kept or dropped; scalar leaves (e.g. a cache index) are left alone.
Anything the step needs that is the same for all beams of a source (e.g.
encoder keys/values, already repeated beam times) can live in its closure.

The search follows transformers' `generate(num_beams=...)` rule, so that
it returns the same sequences:

* each step keeps the 2 x beam best continuations of all beams, so that
  beams ending in EOS do not starve the live ones; the best `beam` of those
  that do not end continue;
* a continuation ends when it emits EOS or reaches its length limit; it is
  added to the finished hypotheses only if it is among the `beam` best
  continuations of that step, scored sum(log p) / length ** length_penalty
  (`penalty_rule='transformers'`; length counts the EOS) or, with
  `penalty_rule='gnmt'`, sum(log p) / ((5 + length) / 6) ** length_penalty;
* `early_stopping`: False (transformers' default) stops a source once the
  best live beam, scored at its current length, cannot beat the worst of
  `beam` finished hypotheses; True stops it as soon as `beam` hypotheses
  have finished; 'never' scores the live beam at the length limit when
  length_penalty > 0 (the exact search).

Greedy decoding is beam size 1 (with early_stopping False).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

PENALTY_RULES = ('transformers', 'gnmt')
EARLY_STOPPING = (False, True, 'never')  # codes 0, 1, 2
_NEG = -1.0e9  # transformers' "impossible" score


class Beams(NamedTuple):
  """Finished hypotheses, best first: tokens [batch, beam, max_length]
  (`pad_id` after EOS, no start token) and scores [batch, beam]."""

  tokens: jax.Array
  scores: jax.Array


def length_normalizer(length, length_penalty: float, penalty_rule: str):
  """The divisor of sum(log p) for a hypothesis of `length` tokens."""
  length = jnp.asarray(length, jnp.float32)
  if penalty_rule == 'transformers':
    return length**length_penalty
  if penalty_rule == 'gnmt':
    return ((5.0 + length) / 6.0) ** length_penalty
  raise ValueError(
      f'penalty_rule={penalty_rule!r}: use one of ' f'{PENALTY_RULES}'
  )


def early_stopping_code(early_stopping) -> int:
  """0, 1 or 2 for early_stopping False, True or 'never'."""
  for code, value in enumerate(EARLY_STOPPING):
    if early_stopping is value or (
        isinstance(early_stopping, str) and early_stopping == value
    ):
      return code
  raise ValueError(
      f'early_stopping={early_stopping!r}: use False, True or ' "'never'"
  )


def _gather(x, indices):
  """x [B, N, ...] gathered along axis 1 by indices [B, M] -> [B, M, ...]."""
  indices = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, indices, axis=1)


def beam_search(
    step_fn: Callable[..., tuple[jax.Array, Any]],
    state: Any,
    *,
    batch_size: int,
    beam_size: int,
    max_length: int,
    start_id: int | jax.Array,
    eos_id: int,
    pad_id: int,
    length_penalty: float | jax.Array = 1.0,
    penalty_rule: str = 'transformers',
    early_stopping=False,
    limits: Optional[jax.Array] = None,
) -> Beams:
  """Runs beam search; see the module docstring for `step_fn` and rules.

  Args:
    step_fn: (tokens [batch * beam], state, step) -> (logits, state).
    state: the initial state, leaves with batch * beam rows.
    batch_size: number of sources.
    beam_size: beams per source (1: greedy).
    max_length: generated tokens at most (the token arrays' length).
    start_id: the first input token (decoder start / BOS), or a [batch]
      int array of them (e.g. each prompt's last token when a decoder-only
      model has already read the rest of its prompt into `state`).
    eos_id: the token that ends a hypothesis.
    pad_id: fills the tokens after EOS.
    length_penalty: the exponent of the length normalizer.
    penalty_rule: 'transformers' (length ** p) or 'gnmt'.
    early_stopping: False, True or 'never' (see the module docstring), or
      its `early_stopping_code` as an int32 array (traced under jit).
    limits: optional [batch] int, each source's own token limit
      (<= max_length), e.g. a + b * source length.

  Returns:
    `Beams`, best first.
  """
  if beam_size < 1 or max_length < 1:
    raise ValueError(
        f'beam_size={beam_size}, max_length={max_length}: both '
        'must be at least 1'
    )
  if not isinstance(early_stopping, jax.Array):
    early_stopping = early_stopping_code(early_stopping)
  stop_when_full = jnp.asarray(early_stopping) == 1
  exact = jnp.asarray(early_stopping) == 2
  length_normalizer(1, length_penalty, penalty_rule)  # validates the rule
  b, k = batch_size, beam_size
  if limits is None:
    limits = jnp.full((b,), max_length, jnp.int32)
  limits = jnp.minimum(jnp.asarray(limits, jnp.int32), max_length)
  first = jnp.broadcast_to(jnp.asarray(start_id, jnp.int32)[..., None], (b, k))
  top_mask = jnp.arange(2 * k) < k  # only these may finish in a step
  flat_offsets = (jnp.arange(b) * k)[:, None]

  def normalizer(length):
    return length_normalizer(length, length_penalty, penalty_rule)

  def reorder(leaf, flat_indices):
    if jnp.ndim(leaf) == 0:
      return leaf
    return jnp.take(leaf, flat_indices, axis=0)

  def body(s):
    step = s['step']
    previous = jax.lax.dynamic_index_in_dim(
        s['running_tokens'], jnp.maximum(step - 1, 0), axis=2, keepdims=False
    )
    last = jnp.where(step == 0, first, previous).reshape(b * k)
    logits, state = step_fn(last.astype(jnp.int32), s['state'], step)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = log_probs.shape[-1]
    candidates = (
        log_probs.reshape(b, k, vocab) + s['running_scores'][:, :, None]
    ).reshape(b, k * vocab)
    top_scores, top_indices = jax.lax.top_k(candidates, 2 * k)
    origin = top_indices // vocab
    token = (top_indices % vocab).astype(jnp.int32)
    sequences = _gather(s['running_tokens'], origin)
    sequences = jax.lax.dynamic_update_index_in_dim(
        sequences, token[:, :, None], step, axis=2
    )
    ends = (token == eos_id) | (step + 1 >= limits)[:, None]

    # The best `beam` continuations that do not end live on.
    live_scores = top_scores + ends.astype(jnp.float32) * _NEG
    running_scores, keep = jax.lax.top_k(live_scores, k)
    running_tokens = _gather(sequences, keep)
    parents = _gather(origin, keep)

    # Those among the `beam` best that end join the finished hypotheses.
    finished_now = ends & top_mask[None, :]
    scores = top_scores / normalizer(step + 1)
    full = jnp.all(s['finished'], axis=1) & stop_when_full
    scores += full[:, None].astype(jnp.float32) * _NEG
    scores += (~s['improvable'])[:, None].astype(jnp.float32) * _NEG
    scores += (~finished_now).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([s['scores'], scores], axis=1)
    best_scores, best = jax.lax.top_k(merged_scores, k)
    best_tokens = _gather(
        jnp.concatenate([s['tokens'], sequences], axis=1), best
    )
    finished = _gather(
        jnp.concatenate([s['finished'], finished_now], axis=1), best
    )

    flat_parents = (flat_offsets + parents).reshape(b * k)
    state = jax.tree_util.tree_map(lambda x: reorder(x, flat_parents), state)

    # Can a live beam still beat the worst finished hypothesis?
    length = step + 1
    bound_length = jnp.where(exact & (length_penalty > 0.0), limits, length)
    best_live = running_scores[:, 0] / normalizer(bound_length)
    worst_finished = jnp.where(
        finished, jnp.min(best_scores, axis=1, keepdims=True), _NEG
    )
    improvable = (
        s['improvable']
        & (length < limits)
        & jnp.any(best_live[:, None] > worst_finished, axis=1)
    )
    return dict(
        step=length,
        state=state,
        running_tokens=running_tokens,
        running_scores=running_scores,
        tokens=best_tokens,
        scores=best_scores,
        finished=finished,
        improvable=improvable,
    )

  def cond(s):
    full = jnp.all(s['finished'], axis=1) & stop_when_full
    return jnp.any(s['improvable'] & ~full)

  tokens = jnp.full((b, k, max_length), pad_id, jnp.int32)
  initial = dict(
      step=jnp.zeros((), jnp.int32),
      state=state,
      running_tokens=tokens,
      running_scores=jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None]
      .repeat(b, axis=0)
      .astype(jnp.float32),
      tokens=tokens,
      scores=jnp.full((b, k), _NEG, jnp.float32),
      finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b,), bool),
  )
  final = jax.lax.while_loop(cond, body, initial)
  return Beams(final['tokens'], final['scores'])
