"""The tokenizer stored in a GGUF file, as a Hugging Face `tokenizers` one.

A GGUF (llama.cpp) file carries its tokenizer as metadata: the token list
(`tokenizer.ggml.tokens`), the BPE merges, token types (3 = control, 4 =
user-defined), the special token ids and a chat template. For byte-level BPE
vocabularies (`tokenizer.ggml.model == 'gpt2'`, e.g. GPT-2, Llama 3,
SmolLM2) this rebuilds the pipeline transformers builds when it reads the
same file (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`): BPE
with the file's merges, a byte-level pre-tokenizer and decoder, control
tokens as special added tokens, and a BOS token prepended when the file
says `add_bos_token`. For `tokenizer.ggml.pre == 'smollm'` digits are split
one by one first, as SmolLM2's own tokenizer.json and llama.cpp do (its
vocabulary has single-digit tokens only, so the ids are the same).

    tokenizer, tokenizer_config = from_gguf(reader)   # a gguf.GGUFReader

`tokenizer_config` holds what transformers keeps in tokenizer_config.json:
the special tokens, `add_bos_token` and the `chat_template`.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers import pre_tokenizers, processors

_CONTROL, _USER_DEFINED = 3, 4
# `tokenizer.ggml.pre` values whose text splitting is GPT-2's byte-level
# regex (SmolLM2's adds single digits). Others (llama-bpe, qwen2, ...) split
# differently and are refused rather than tokenized wrongly.
_PRE_TOKENIZERS = (None, 'default', 'gpt-2', 'gpt2', 'smollm')
_SPECIAL_IDS = {
    'bos_token': 'bos_token_id',
    'eos_token': 'eos_token_id',
    'unk_token': 'unknown_token_id',
    'pad_token': 'padding_token_id',
}


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def from_gguf(reader) -> tuple[Tokenizer, dict[str, Any]]:
  """(tokenizer, tokenizer_config) from an open `gguf.GGUFReader`."""
  kind = _field(reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(
        f'unsupported GGUF tokenizer model {kind!r}: only '
        "byte-level BPE ('gpt2') vocabularies are read"
    )
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  merges = _field(reader, 'tokenizer.ggml.merges')
  if not tokens or not merges:
    raise ValueError(
        'the GGUF file has no tokenizer.ggml.tokens/merges: '
        'give a tokenizer.json instead'
    )
  pre = _field(reader, 'tokenizer.ggml.pre')
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(
        f'unsupported GGUF pre-tokenizer {pre!r}: this reader '
        'splits text like GPT-2 or SmolLM2 only; give a '
        'tokenizer.json instead'
    )
  types = _field(reader, 'tokenizer.ggml.token_type') or [1] * len(tokens)
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = Tokenizer(
      models.BPE(
          vocab=vocab,
          merges=[tuple(m.split(' ', 1)) for m in merges],
          dropout=None,
          continuing_subword_prefix='',
          end_of_word_suffix='',
          fuse_unk=False,
      )
  )
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == 'smollm':
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tokenizer.pre_tokenizer = byte_level
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens(
      [
          AddedToken(t, special=True, normalized=False)
          for t, kind in zip(tokens, types)
          if kind == _CONTROL
      ]
  )
  tokenizer.add_tokens(
      [
          AddedToken(t, special=False, normalized=False)
          for t, kind in zip(tokens, types)
          if kind == _USER_DEFINED
      ]
  )

  config: dict[str, Any] = {}
  for name, key in _SPECIAL_IDS.items():
    token_id = _field(reader, f'tokenizer.ggml.{key}')
    config[name] = tokens[token_id] if token_id is not None else None
  config['add_bos_token'] = bool(
      _field(reader, 'tokenizer.ggml.add_bos_token', False)
  )
  config['add_eos_token'] = bool(
      _field(reader, 'tokenizer.ggml.add_eos_token', False)
  )
  template = _field(reader, 'tokenizer.chat_template')
  if template:
    config['chat_template'] = template
  single, special = ['$A'], []
  if config['add_bos_token'] and config['bos_token']:
    single = [config['bos_token']] + single
    special.append((config['bos_token'], vocab[config['bos_token']]))
  if config['add_eos_token'] and config['eos_token']:
    single = single + [config['eos_token']]
    special.append((config['eos_token'], vocab[config['eos_token']]))
  if special:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=sorted(set(special))
    )
  return tokenizer, config
