"""BERT tokenization with Hugging Face `tokenizers`, and bucketed batch padding.

    tok = load_tokenizer(model_folder)            # tokenizer.json, or vocab.txt only
    feats = encode_texts(tok, sentences, max_length=128)
    batch = pad_batch([...slice of feats...], buckets=(32, 64, 128), pad_id=pad_token_id(tok))

`encode_texts` returns variable-length int32 arrays; `pad_batch` pads a batch
to the smallest bucket that fits its longest example, so a jitted step only
ever sees `len(buckets)` sequence lengths.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

_DEFAULT_SPECIAL = {
    'unk_token': '[UNK]',
    'sep_token': '[SEP]',
    'pad_token': '[PAD]',
    'cls_token': '[CLS]',
    'mask_token': '[MASK]',
}


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_str(value) -> str:
  # special_tokens_map.json may hold {"content": "[CLS]", ...} instead of a string.
  return value['content'] if isinstance(value, dict) else str(value)


def load_tokenizer(path: str) -> Tokenizer:
  """A `tokenizers.Tokenizer` for the model folder `path` (or a tokenizer.json / vocab.txt file).

  Prefers `tokenizer.json`; otherwise builds the BERT WordPiece pipeline from
  `vocab.txt` the way `transformers` does (lower-casing and accent stripping
  from `tokenizer_config.json`, lower-casing by default). Padding and
  truncation stored in tokenizer.json are switched off: `encode_texts`
  truncates and `pad_batch` pads.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    folder, name = os.path.dirname(path), os.path.basename(path)
    candidates = [path] if name in ('tokenizer.json', 'vocab.txt') else []
  else:
    folder = path
    candidates = [
        os.path.join(folder, n) for n in ('tokenizer.json', 'vocab.txt')
    ]
  existing = [c for c in candidates if os.path.isfile(c)]
  if not existing:
    raise ValueError(
        f'No tokenizer found at {path!r}: expected tokenizer.json or vocab.txt.'
    )
  if existing[0].endswith('tokenizer.json'):
    tok = Tokenizer.from_file(existing[0])
  else:
    tok = _wordpiece_from_vocab(existing[0], folder)
  tok.no_padding()
  tok.no_truncation()
  return tok


def _wordpiece_from_vocab(vocab_file: str, folder: str) -> Tokenizer:
  """BERT WordPiece tokenizer from vocab.txt (mirrors transformers' BertConverter)."""
  config = _read_json(os.path.join(folder, 'tokenizer_config.json'))
  special = dict(_DEFAULT_SPECIAL)
  for source in (
      config,
      _read_json(os.path.join(folder, 'special_tokens_map.json')),
  ):
    special.update(
        {
            k: _token_str(v)
            for k, v in source.items()
            if k in _DEFAULT_SPECIAL and v
        }
    )
  with open(vocab_file, encoding='utf-8') as f:
    vocab = {line.rstrip('\n'): i for i, line in enumerate(f)}
  for key in ('unk_token', 'cls_token', 'sep_token'):
    if special[key] not in vocab:
      raise ValueError(
          f'{vocab_file}: {key} {special[key]!r} is not in the vocabulary.'
      )
  tok = Tokenizer(
      WordPiece(
          vocab, unk_token=special['unk_token'], max_input_chars_per_word=100
      )
  )
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True,
      handle_chinese_chars=config.get('tokenize_chinese_chars', True),
      strip_accents=config.get('strip_accents'),
      lowercase=config.get('do_lower_case', True),
  )
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls, sep = special['cls_token'], special['sep_token']
  tok.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0',
      pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
  )
  tok.decoder = decoders.WordPiece(prefix='##')
  tok.add_special_tokens([t for t in special.values() if t in vocab])
  return tok


def pad_token_id(tokenizer: Tokenizer) -> int:
  """The id of [PAD] (or of the tokenizer's configured pad token); 0 if it has none."""
  for token in ((tokenizer.padding or {}).get('pad_token'), '[PAD]', '<pad>'):
    if token is not None and tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  return 0


def eos_token_id(path: str, tokenizer: Tokenizer) -> Optional[int]:
  """The end-of-text id that the model folder of `path` names, or None.

  From tokenizer_config.json's `eos_token` (a string or {"content": ...}),
  else config.json's `eos_token_id` (the first, if a list).
  """
  path = os.fspath(path)
  folder = os.path.dirname(path) if os.path.isfile(path) else path
  token = _read_json(os.path.join(folder, 'tokenizer_config.json')).get(
      'eos_token'
  )
  if token:
    found = tokenizer.token_to_id(_token_str(token))
    if found is not None:
      return int(found)
  ids = _read_json(os.path.join(folder, 'config.json')).get('eos_token_id')
  if isinstance(ids, list):
    ids = ids[0] if ids else None
  return None if ids is None else int(ids)


def encode_texts(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    texts_b: Optional[Sequence[str]] = None,
    max_length: int = 128,
) -> dict[str, list[np.ndarray]]:
  """Tokenizes single texts or pairs with [CLS]/[SEP], truncating to `max_length`.

  Pairs are truncated longest-first, like `transformers`. Returns
  `{'input_ids': [...], 'token_type_ids': [...]}`, one int32 array per example.
  """
  texts = list(texts)
  if texts_b is not None:
    texts_b = list(texts_b)
    if len(texts_b) != len(texts):
      raise ValueError(
          f'texts ({len(texts)}) and texts_b ({len(texts_b)}) differ in length.'
      )
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length, strategy='longest_first')
  try:
    inputs = texts if texts_b is None else list(zip(texts, texts_b))
    encodings = tokenizer.encode_batch(inputs)
  finally:
    tokenizer.no_truncation()
  return {
      'input_ids': [np.asarray(e.ids, np.int32) for e in encodings],
      'token_type_ids': [np.asarray(e.type_ids, np.int32) for e in encodings],
  }


def pad_batch(
    examples_features: Union[
        Sequence[Mapping[str, np.ndarray]], Mapping[str, Sequence[np.ndarray]]
    ],
    buckets: Sequence[int] = (32, 64, 128),
    pad_id: int = 0,
    batch_size: Optional[int] = None,
) -> dict[str, np.ndarray]:
  """Pads a batch to the smallest bucket length >= its longest example.

  `examples_features` is either a list of per-example dicts or a dict of
  per-example lists (as returned by `encode_texts`), with `input_ids` and
  optionally `token_type_ids`; other keys (e.g. labels) pass through as arrays.
  With `batch_size`, rows are added (all padding, attention_mask 0) up to that
  size. Returns int32 arrays [B, bucket]: input_ids, token_type_ids, attention_mask.
  """
  if isinstance(examples_features, Mapping):
    columns = {k: list(v) for k, v in examples_features.items()}
  else:
    columns = (
        {k: [ex[k] for ex in examples_features] for k in examples_features[0]}
        if len(examples_features)
        else {'input_ids': []}
    )
  ids = columns.pop('input_ids')
  types = columns.pop('token_type_ids', None)
  columns.pop('attention_mask', None)
  n = len(ids)
  rows = n if batch_size is None else batch_size
  if rows < n:
    raise ValueError(
        f'Batch has {n} examples, more than batch_size={batch_size}.'
    )
  longest = max((len(x) for x in ids), default=0)
  fits = [b for b in sorted(buckets) if b >= longest]
  if not fits:
    raise ValueError(
        f'Longest example has {longest} tokens, more than the largest bucket '
        f'{max(buckets)}; raise the buckets or lower max_length.'
    )
  length = fits[0]
  out_ids = np.full((rows, length), pad_id, np.int32)
  out_types = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  for i, x in enumerate(ids):
    out_ids[i, : len(x)] = x
    mask[i, : len(x)] = 1
    if types is not None:
      out_types[i, : len(x)] = types[i]
  batch = {
      'input_ids': out_ids,
      'token_type_ids': out_types,
      'attention_mask': mask,
  }
  for key, values in columns.items():
    values = np.asarray(values)
    if rows > n:
      values = np.concatenate(
          [values, np.zeros((rows - n,) + values.shape[1:], values.dtype)]
      )
    batch[key] = values
  return batch
