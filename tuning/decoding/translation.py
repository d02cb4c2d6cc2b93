"""Translating lists of sentences with an encoder-decoder, batched.

    result = translation.translate(model, params, tokenizer, sentences,
                                   beam_size=4, length_penalty=0.6)
    result.texts        # one string per sentence, in the given order
    result.stats        # sentences, tokens, seconds, tokens/s

`translate` tokenizes the sources (appending the model's EOS where the
tokenizer does not), sorts them by length, cuts them into batches of a fixed
size (the last one filled with one-token dummies) whose source length is
padded to a multiple of `length_multiple` (so that the device program is
compiled once per length bucket, not per batch), decodes each batch on the
device with tuning/decoding/encoder_decoder.py's `generate` (beam search;
greedy at beam size 1) and detokenizes the best hypothesis, up to its EOS,
in the original order.
`translate_ids` does the same from token ids to token ids (for callers that
hold tokenized sources, e.g. a validation split).

A source of n tokens may get up to floor(max_length_offset +
max_length_ratio * n) target tokens (`max_length_ratio=0` gives the same
limit to all). `params` are host (numpy) or single-device arrays of the
plain model (LoRA merged, not laid out over several devices).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from tuning.decoding import encoder_decoder as ed_decoding
from tuning.models import encoder_decoder as ed


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How sentences are decoded (see the module docstring)."""

  beam_size: int = 4
  length_penalty: float = 1.0
  penalty_rule: str = 'transformers'  # transformers | gnmt
  early_stopping: Any = False  # False | True | 'never'
  max_length_ratio: float = 1.5  # a in a * source_length + b
  max_length_offset: int = 10  # b
  batch_size: int = 32
  length_multiple: int = 8  # source lengths are padded to a multiple

  def __post_init__(self):
    if self.beam_size < 1 or self.batch_size < 1 or self.length_multiple < 1:
      raise ValueError(
          f'beam_size={self.beam_size}, batch_size={self.batch_size}, '
          f'length_multiple={self.length_multiple}: each must be at least 1'
      )
    if self.max_length_ratio < 0 or self.max_length_offset < 0:
      raise ValueError(
          f'max_length_ratio={self.max_length_ratio}, max_length_offset='
          f'{self.max_length_offset}: neither may be negative'
      )


@dataclasses.dataclass
class Translations:
  """Outputs in the callers' order: `texts` (detokenized, or None from
  `translate_ids`), `tokens` (ids before EOS) and `stats`."""

  texts: Optional[list[str]]
  tokens: list[list[int]]
  stats: dict


class _Progress:
  """A tqdm bar on stderr (or nothing)."""

  def __init__(self, total: int, enabled: bool):
    self.bar = None
    if enabled:
      import tqdm  # pylint: disable=g-import-not-at-top

      self.bar = tqdm.tqdm(
          total=total,
          unit='sent',
          file=sys.stderr,
          desc='translating',
          mininterval=1.0,
      )

  def update(self, n: int):
    if self.bar is not None:
      self.bar.update(n)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def encode_sources(
    tokenizer,
    sources: Sequence[str],
    eos_id: int,
    append_eos: bool = True,
    max_source_length: Optional[int] = None,
) -> tuple[list[list[int]], int]:
  """Token ids of each source (ending in `eos_id` when `append_eos` and the
  tokenizer did not add it), cut to `max_source_length` (keeping the EOS);
  and how many sources were cut."""
  encoded = tokenizer.encode_batch(list(sources))
  ids, cut = [], 0
  for enc in encoded:
    row = list(enc.ids)
    if append_eos and (not row or row[-1] != eos_id):
      row.append(eos_id)
    if max_source_length and len(row) > max_source_length:
      cut += 1
      tail = [row[-1]] if append_eos else []
      row = row[: max_source_length - len(tail)] + tail
    ids.append(row)
  return ids, cut


def decode_targets(tokenizer, tokens: Sequence[Sequence[int]]) -> list[str]:
  """Detokenized strings (special tokens dropped)."""
  return tokenizer.decode_batch(
      [list(t) for t in tokens], skip_special_tokens=True
  )


def _until_eos(row: np.ndarray, eos_id: int, pad_id: int):
  """(the tokens before EOS, how many tokens were generated)."""
  row = row.tolist()
  if eos_id in row:
    end = row.index(eos_id)
    return row[:end], end + 1
  while row and row[-1] == pad_id:  # the padding after a length limit
    row.pop()
  return row, len(row)


def translate_ids(
    model: ed.EncoderDecoder,
    params,
    source_ids: Sequence[Sequence[int]],
    options: DecodeOptions = DecodeOptions(),
    progress: bool = False,
) -> Translations:
  """Decodes token-id sources (each ending in EOS, unpadded) to the best
  hypotheses' ids before EOS, in the given order (see the module doc)."""
  c = model.config
  n = len(source_ids)
  if any(len(s) == 0 for s in source_ids):
    raise ValueError('a source has no tokens: give non-empty sentences')
  params = jax.device_put(params)
  order = sorted(range(n), key=lambda i: (len(source_ids[i]), i))
  results: list[Optional[list[int]]] = [None] * n
  bar = _Progress(n, progress)
  size, multiple = options.batch_size, options.length_multiple
  target_tokens, seconds, shapes = 0, 0.0, set()
  try:
    for start in range(0, n, size):
      rows = order[start : start + size]
      longest = max(len(source_ids[i]) for i in rows)
      length = -(-longest // multiple) * multiple
      if c.positions != 'relative':
        length = min(length, max(c.max_positions, longest))
      ids = np.full((size, length), c.pad_id, np.int32)
      mask = np.zeros((size, length), np.int32)
      ids[:, 0], mask[:, 0] = c.eos_id, 1  # the dummy rows: only EOS
      for r, i in enumerate(rows):
        ids[r, : len(source_ids[i])] = source_ids[i]
        mask[r, : len(source_ids[i])] = 1
      shapes.add(length)
      began = time.perf_counter()
      beams = ed_decoding.generate(
          model,
          params,
          ids,
          mask,
          beam_size=options.beam_size,
          max_new_tokens=options.max_length_offset,
          length_ratio=options.max_length_ratio,
          length_penalty=options.length_penalty,
          penalty_rule=options.penalty_rule,
          early_stopping=options.early_stopping,
      )
      best = np.asarray(beams.tokens[:, 0])
      seconds += time.perf_counter() - began
      for r, i in enumerate(rows):
        results[i], generated = _until_eos(best[r], c.eos_id, c.pad_id)
        target_tokens += generated
      bar.update(len(rows))
  finally:
    bar.close()
  stats = {
      'sentences': n,
      'source_tokens': int(sum(len(s) for s in source_ids)),
      'target_tokens': int(target_tokens),
      'seconds': seconds,
      'tokens_per_s': target_tokens / seconds if seconds else math.nan,
      'sentences_per_s': n / seconds if seconds else math.nan,
      'source_lengths': sorted(shapes),
  }
  return Translations(None, results, stats)


def translate(
    model: ed.EncoderDecoder,
    params,
    tokenizer,
    sources: Sequence[str],
    *,
    append_eos: bool = True,
    max_source_length: Optional[int] = None,
    progress: bool = False,
    **options,
) -> Translations:
  """Translates `sources` (strings) with `tokenizer` (`tokenizers`
  `Tokenizer`); `options` are `DecodeOptions` fields. Sources longer than
  `max_source_length` (default: the model's position table; none for
  relative positions) are cut, and `stats['cut_sources']` counts them."""
  options = DecodeOptions(**options)
  c = model.config
  if max_source_length is None and c.positions != 'relative':
    max_source_length = c.max_positions
  ids, cut = encode_sources(
      tokenizer, sources, c.eos_id, append_eos, max_source_length
  )
  out = translate_ids(model, params, ids, options, progress)
  out.texts = decode_targets(tokenizer, out.tokens)
  out.stats['cut_sources'] = cut
  return out
