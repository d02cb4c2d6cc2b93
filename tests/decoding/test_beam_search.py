"""Beam search on a toy Markov 'model' (no network): exhaustive-search
optimum, greedy, per-source length limits, EOS and padding, state reorder."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuning.decoding import beam_search

VOCAB, EOS, PAD, START = 5, 1, 0, 0


def _table(seed, contexts=VOCAB):
  """log-probabilities [context, next token]."""
  logits = np.random.default_rng(seed).normal(size=(contexts, VOCAB)) * 2.0
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


_HASHES = 97


def _next_hash(hashes, tokens):
  return (hashes * 31 + tokens + 7) % _HASHES


def _step(table):
  """A step function: a Markov chain over the last token, or, when `table`
  has _HASHES rows, a 'model' of the whole prefix, hashed in the state (so
  the search must reorder the state with the beams)."""

  def step(tokens, state, index):
    del index
    assert state['scalar'].shape == ()
    hashes = _next_hash(state['hash'], tokens)
    rows = hashes if table.shape[0] == _HASHES else tokens
    return table[rows], {'scalar': state['scalar'] + 1, 'hash': hashes}

  return step


def _state(rows):
  return {'scalar': jnp.int32(0), 'hash': jnp.zeros((rows,), jnp.int32)}


def _best_by_enumeration(table, max_length, normalizer):
  """The best finished sequence under `normalizer` over all sequences of
  the prefix-hashing model."""
  table = np.asarray(table)
  best, best_score = None, -np.inf
  for length in range(1, max_length + 1):
    for seq in itertools.product(range(VOCAB), repeat=length):
      if EOS in seq[:-1] or (length < max_length and seq[-1] != EOS):
        continue
      total, hashes = 0.0, 0
      for token, previous in zip(seq, (START,) + seq[:-1]):
        hashes = _next_hash(hashes, previous)
        total += table[hashes, token]
      score = total / normalizer(length)
      if score > best_score:
        best, best_score = seq, score
  return best, best_score


@pytest.mark.parametrize('rule', ['transformers', 'gnmt'])
def test_wide_exact_search_finds_the_optimum(rule):
  max_length, beam = 3, 32  # 2 x 32 candidates cover all VOCAB**2 prefixes
  search = jax.jit(
      lambda table, penalty: beam_search.beam_search(
          _step(table),
          _state(beam),
          batch_size=1,
          beam_size=beam,
          max_length=max_length,
          start_id=START,
          eos_id=EOS,
          pad_id=PAD,
          length_penalty=penalty,
          penalty_rule=rule,
          early_stopping='never',
      )
  )
  for seed in range(4):
    table = _table(seed, _HASHES)
    for penalty in (0.0, 0.6, 2.0):
      _check_optimum(search(table, penalty), table, max_length, rule, penalty)


def _check_optimum(result, table, max_length, rule, penalty):
  normalizer = lambda n: float(
      beam_search.length_normalizer(n, penalty, rule)  # noqa: E731
  )
  best, best_score = _best_by_enumeration(table, max_length, normalizer)
  tokens = [int(t) for t in result.tokens[0, 0, : len(best)]]
  assert tokens == list(best)
  assert np.all(np.asarray(result.tokens[0, 0, len(best) :]) == PAD)
  np.testing.assert_allclose(result.scores[0, 0], best_score, rtol=1e-5)
  assert np.all(np.diff(np.asarray(result.scores[0])) <= 0)  # best first


def test_greedy_limits_padding_starts_and_state():
  table = _table(2)
  batch, max_length = 3, 6
  limits, starts = [6, 2, 4], [START, START, 3]
  result = beam_search.beam_search(
      _step(table),
      _state(batch),
      batch_size=batch,
      beam_size=1,
      max_length=max_length,
      start_id=jnp.array(starts),
      eos_id=EOS,
      pad_id=PAD,
      limits=jnp.array(limits),
  )
  table_np = np.asarray(table)
  for row, (limit, token) in enumerate(zip(limits, starts)):
    expected = []
    while len(expected) < limit and EOS not in expected:
      token = int(np.argmax(table_np[token]))
      expected.append(token)
    got = [int(t) for t in result.tokens[row, 0]]
    assert got == expected + [PAD] * (max_length - len(expected))


def test_eos_forced_by_a_peaked_model_and_bad_arguments():
  # A chain that always says EOS after token 3: beams end early and pad.
  logits = np.full((VOCAB, VOCAB), -5.0, np.float32)
  logits[START, 3] = 0.0
  logits[3, EOS] = 0.0
  table = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  result = beam_search.beam_search(
      _step(table),
      _state(2 * 3),
      batch_size=2,
      beam_size=3,
      max_length=5,
      start_id=START,
      eos_id=EOS,
      pad_id=PAD,
  )
  np.testing.assert_array_equal(
      result.tokens[:, 0], [[3, EOS, PAD, PAD, PAD]] * 2
  )
  with pytest.raises(ValueError, match='early_stopping'):
    beam_search.beam_search(
        _step(table),
        _state(2),
        batch_size=2,
        beam_size=1,
        max_length=5,
        start_id=START,
        eos_id=EOS,
        pad_id=PAD,
        early_stopping='sometimes',
    )
  with pytest.raises(ValueError, match='penalty_rule'):
    beam_search.length_normalizer(3, 1.0, 'average')
