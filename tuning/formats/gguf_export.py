"""Writing a Llama model as one GGUF file (llama.cpp's format), the reverse
of `tuning.formats.gguf`.

    path = write_gguf(out_dir, tensors, hf_config, tokenizer_files, quant)

`tensors` are transformers-Llama-named float32 arrays (`decoder_hf.export_hf`),
`hf_config` their config.json dict, `tokenizer_files` the tokenizer.json (and
tokenizer_config.json, chat_template.jinja) the model uses. It writes
`out_dir/model-<quant>.gguf` with the `gguf` package's `GGUFWriter`, as
llama.cpp's convert_hf_to_gguf.py does:

  * `general.architecture = llama` and the `llama.*` hyper-parameters;
  * the tokenizer as `tokenizer.ggml.*`: model `gpt2` (byte-level BPE), its
    pre-tokenizer (`gpt-2`, or `smollm` where digits are split one by one
    first), tokens (the vocabulary padded to the embedding's rows with
    `[PADi]` tokens of type UNUSED), token types (special added tokens
    CONTROL, other added tokens USER_DEFINED), merges, the bos/eos/unk/pad
    ids, whether the tokenizer adds a BOS/EOS token (what its post-processor
    does), and the chat template;
  * tensors under llama.cpp's names with the rows of the Q and K projections
    permuted (each head's rotary halves interleaved: the inverse of
    `gguf.unpermute`), as F32, F16, BF16 or Q8_0 (`gguf.quants.quantize`;
    1-D tensors such as the norms stay F32, a matrix whose rows are not a
    multiple of Q8_0's 32-value blocks falls back to F16, as llama.cpp does).
    Tied embeddings have no `output.weight`.

Q8_0 stores each block of 32 values as int8 q = round(w / d) with one float16
scale d = max|w| / 127: a value comes back within d/2 (plus the scale's
float16 rounding, 127 |d - fp16(d)|), about max|w| / 254 per block.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Iterable, Optional

import numpy as np

from tuning.formats import gguf as gguf_reader
from tuning.formats import huggingface_export

QUANTS = ('f32', 'f16', 'bf16', 'q8_0')
_OTHER_FORMATS = 'export it with --format=hf instead'
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# The reader's name tables, reversed: transformers module -> llama.cpp name.
# pylint: disable=protected-access
_HF_TO_BLOCK = {hf: name for name, hf in gguf_reader._BLOCK_NAMES.items()}
_HF_TO_GLOBAL = {hf: name for name, hf in gguf_reader._GLOBAL_NAMES.items()}
# pylint: enable=protected-access


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's rotary row permutation of a Q or K projection (the inverse
  of `gguf.unpermute`): each head's rows go from halves (i, i + D/2) to
  interleaved pairs (2i, 2i + 1)."""
  return (
      w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
      .swapaxes(1, 2)
      .reshape(w.shape)
  )


def gguf_name(hf_name: str) -> str:
  """llama.cpp's name of a transformers Llama tensor."""
  base, _, suffix = hf_name.rpartition('.')
  if base.startswith('model.layers.'):
    layer, _, module = base[len('model.layers.') :].partition('.')
    if layer.isdigit() and module in _HF_TO_BLOCK:
      return f'blk.{layer}.{_HF_TO_BLOCK[module]}.{suffix}'
  elif base in _HF_TO_GLOBAL:
    return f'{_HF_TO_GLOBAL[base]}.{suffix}'
  raise ValueError(
      f'unknown Llama tensor {hf_name!r} for GGUF: the writer maps '
      f'{", ".join(_HF_TO_GLOBAL)} and model.layers.N.'
      f'{{{",".join(_HF_TO_BLOCK)}}}; {_OTHER_FORMATS}'
  )


# ------------------------------------------------------------ the tokenizer


def _read_tokenizer_files(tokenizer_files: Iterable[str]):
  """(tokenizer.json as a dict, tokenizer_config.json dict, chat template)."""
  by_name = {os.path.basename(p): p for p in tokenizer_files}
  if 'tokenizer.json' not in by_name:
    raise ValueError(
        "GGUF export needs the model's tokenizer.json (the run or folder has "
        f'{", ".join(sorted(by_name)) or "no tokenizer files"}); '
        f'{_OTHER_FORMATS}'
    )
  with open(by_name['tokenizer.json'], encoding='utf-8') as f:
    tokenizer_json = json.load(f)
  config = {}
  if 'tokenizer_config.json' in by_name:
    with open(by_name['tokenizer_config.json'], encoding='utf-8') as f:
      config = json.load(f)
  template = config.get('chat_template')
  if 'chat_template.jinja' in by_name:
    with open(by_name['chat_template.jinja'], encoding='utf-8') as f:
      template = f.read()
  return tokenizer_json, config, template


def _pre_tokenizer(tokenizer_json: dict) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json;
  a ValueError for any other tokenizer."""
  model = tokenizer_json.get('model') or {}
  pre = tokenizer_json.get('pre_tokenizer') or {}
  steps = (
      pre.get('pretokenizers', [pre])
      if pre.get('type') == 'Sequence'
      else [pre]
  )
  kinds = [s.get('type') for s in steps]
  byte_level = (
      model.get('type') == 'BPE'
      and kinds[-1:] == ['ByteLevel']
      and (tokenizer_json.get('decoder') or {}).get('type') == 'ByteLevel'
  )
  if not byte_level:
    raise ValueError(
        f'GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM2); this '
        f'one is a {model.get("type")} model with pre-tokenizer '
        f'{"+".join(map(str, kinds))}: {_OTHER_FORMATS}'
    )
  problems = [
      what
      for what, bad in (
          ('a normalizer', tokenizer_json.get('normalizer')),
          ('byte_fallback', model.get('byte_fallback')),
          ('ignore_merges', model.get('ignore_merges')),
          (
              'a word prefix/suffix',
              model.get('continuing_subword_prefix')
              or model.get('end_of_word_suffix'),
          ),
          ('add_prefix_space', steps[-1].get('add_prefix_space')),
          ('no GPT-2 regex', not steps[-1].get('use_regex', True)),
      )
      if bad
  ]
  if kinds == ['ByteLevel'] and not problems:
    return 'gpt-2'
  if (
      kinds == ['Digits', 'ByteLevel']
      and steps[0].get('individual_digits')
      and not problems
  ):
    return 'smollm'
  raise ValueError(
      'GGUF export writes byte-level BPE tokenizers that split text like '
      'GPT-2 (or SmolLM2: digits one by one); this one has pre-tokenizer '
      f'{"+".join(map(str, kinds))}'
      f'{" with " + ", ".join(problems) if problems else ""}: {_OTHER_FORMATS}'
  )


def _token_content(value) -> Optional[str]:
  return value.get('content') if isinstance(value, dict) else value


def _special_ids(config: dict, hf_config: dict, vocab: dict) -> dict:
  """{bos, eos, unk, pad: token id} from tokenizer_config.json's tokens, else
  config.json's ids (as llama.cpp's converter looks them up)."""
  ids = {}
  for kind in ('bos', 'eos', 'unk', 'pad'):
    token = _token_content(config.get(f'{kind}_token'))
    if token is not None and token in vocab:
      ids[kind] = vocab[token]
      continue
    value = hf_config.get(f'{kind}_token_id')
    if isinstance(value, list):
      value = value[0] if value else None
    if value is not None:
      ids[kind] = int(value)
  return ids


def _added_special(tokenizer, ids: dict) -> tuple[bool, bool]:
  """(add_bos, add_eos): what the tokenizer's post-processor adds."""
  text = 'Hello world'
  plain = tokenizer.encode(text, add_special_tokens=False).ids
  full = tokenizer.encode(text).ids
  add_bos = bool(
      full[:1] == [ids.get('bos')] and full[1:][: len(plain)] == plain
  )
  add_eos = bool(
      full[-1:] == [ids.get('eos')] and len(full) > len(plain) + add_bos
  )
  if full != [ids.get('bos')] * add_bos + plain + [ids.get('eos')] * add_eos:
    raise ValueError(
        "the tokenizer's post-processor adds tokens other than a leading BOS "
        f'and a trailing EOS ({plain} -> {full}), which GGUF cannot say: '
        f'{_OTHER_FORMATS}'
    )
  return add_bos, add_eos


def add_tokenizer(
    writer, tokenizer_files: Iterable[str], hf_config: dict, vocab_size: int
):
  """Writes the `tokenizer.ggml.*` metadata and the chat template."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer_json, config, template = _read_tokenizer_files(tokenizer_files)
  pre = _pre_tokenizer(tokenizer_json)
  tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
    raise ValueError(
        f'the tokenizer has {len(vocab)} tokens (largest id '
        f"{max(vocab.values())}) but the model's embedding only "
        f'{vocab_size} rows: give the tokenizer the model was trained with'
    )
  tokens = [f'[PAD{i}]' for i in range(vocab_size)]
  types = [_UNUSED] * vocab_size
  for token, i in vocab.items():
    tokens[i], types[i] = token, _NORMAL
  for added in tokenizer_json.get('added_tokens', []):
    types[added['id']] = _CONTROL if added.get('special') else _USER_DEFINED
  merges = [
      m if isinstance(m, str) else ' '.join(m)
      for m in tokenizer_json['model'].get('merges', [])
  ]
  ids = _special_ids(config, hf_config, vocab)
  add_bos, add_eos = _added_special(tokenizer, ids)

  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  for kind, token_id in ids.items():
    getattr(writer, f'add_{kind}_token_id')(token_id)
  writer.add_add_bos_token(add_bos)
  writer.add_add_eos_token(add_eos)
  if template:
    writer.add_chat_template(template)


# ------------------------------------------------------------ the model


def _check_llama(hf_config: dict):
  model_type = hf_config.get('model_type')
  if model_type != 'llama':
    raise ValueError(
        f'GGUF export writes Llama-family models; this is a {model_type!r} '
        f'model: {_OTHER_FORMATS}'
    )
  rope = hf_config.get('rope_parameters') or hf_config.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    raise ValueError(
        f'GGUF export writes plain rotary embeddings; this model has '
        f'rope_type={rope_type!r}: {_OTHER_FORMATS}'
    )


def add_llama_metadata(writer, hf_config: dict):
  """The `llama.*` hyper-parameters (llama.cpp's names) of a config.json."""
  hidden = int(hf_config['hidden_size'])
  heads = int(hf_config['num_attention_heads'])
  head_dim = int(hf_config.get('head_dim') or hidden // heads)
  rope = hf_config.get('rope_parameters') or {}
  if hf_config.get('_name_or_path'):
    writer.add_name(os.path.basename(str(hf_config['_name_or_path'])))
  writer.add_vocab_size(int(hf_config['vocab_size']))
  writer.add_context_length(int(hf_config.get('max_position_embeddings', 2048)))
  writer.add_embedding_length(hidden)
  writer.add_block_count(int(hf_config['num_hidden_layers']))
  writer.add_feed_forward_length(int(hf_config['intermediate_size']))
  writer.add_head_count(heads)
  writer.add_head_count_kv(int(hf_config.get('num_key_value_heads') or heads))
  if head_dim != hidden // heads:
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  writer.add_rope_dimension_count(head_dim)
  writer.add_rope_freq_base(
      float(rope.get('rope_theta', hf_config.get('rope_theta', 10000.0)))
  )
  writer.add_layer_norm_rms_eps(float(hf_config.get('rms_norm_eps', 1e-6)))


def _encode(value: np.ndarray, quant: str):
  """(array for GGUFWriter.add_tensor, its raw GGML type or None)."""
  import gguf  # pylint: disable=g-import-not-at-top

  value = np.ascontiguousarray(value, np.float32)
  if quant == 'f32' or value.ndim < 2:
    return value, None
  if quant == 'f16':
    return value.astype(np.float16), None
  kind = {
      'bf16': gguf.GGMLQuantizationType.BF16,
      'q8_0': gguf.GGMLQuantizationType.Q8_0,
  }[quant]
  try:
    return gguf.quants.quantize(value, kind), kind
  except gguf.QuantError:  # rows not a multiple of the block size
    return value.astype(np.float16), None


_FILE_TYPES = {
    'f32': 'ALL_F32',
    'f16': 'MOSTLY_F16',
    'bf16': 'MOSTLY_BF16',
    'q8_0': 'MOSTLY_Q8_0',
}


def write_gguf(
    out_dir: str,
    tensors: dict[str, np.ndarray],
    hf_config: dict,
    tokenizer_files: Iterable[str],
    quant: str = 'f32',
) -> str:
  """Writes `out_dir/model-<quant>.gguf` (see the module doc); its path."""
  if quant not in QUANTS:
    raise ValueError(f'--quant={quant!r}: use one of {", ".join(QUANTS)}')
  _check_llama(hf_config)
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        'writing GGUF files needs the gguf package: pip install gguf'
    ) from None
  tokenizer_files = list(tokenizer_files)
  heads = int(hf_config['num_attention_heads'])
  kv_heads = int(hf_config.get('num_key_value_heads') or heads)
  tied = bool(hf_config.get('tie_word_embeddings', False))
  named = {}
  for hf_name, value in tensors.items():
    if hf_name == 'lm_head.weight' and tied:
      continue  # llama.cpp writes no output.weight for tied embeddings
    named[gguf_name(hf_name)] = np.asarray(value, np.float32)
  writer = gguf.GGUFWriter(None, 'llama')
  add_llama_metadata(writer, hf_config)
  writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[quant]])
  if quant == 'q8_0':
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  add_tokenizer(
      writer, tokenizer_files, hf_config, int(hf_config['vocab_size'])
  )
  for name, value in named.items():
    if '.attn_q.' in name:
      value = permute(value, heads)
    elif '.attn_k.' in name:
      value = permute(value, kv_heads)
    data, raw_dtype = _encode(value, quant)
    writer.add_tensor(name, data, raw_dtype=raw_dtype)
  path = os.path.join(
      huggingface_export.prepare_out(out_dir), f'model-{quant}.gguf'
  )
  try:
    writer.write_header_to_file(pathlib.Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=sys.stderr.isatty())
  except BaseException:
    writer.close()
    if os.path.exists(path):
      os.remove(path)
    raise
  writer.close()
  return path
