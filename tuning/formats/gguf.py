"""Llama checkpoints in GGUF files (llama.cpp's format), read with `gguf`.

`read(path)` returns what a Hugging Face Llama folder would hold, so that the
decoder family's safetensors converter takes it from there:

  * every tensor dequantised to float32 (`gguf.quants.dequantize`: F32, F16,
    BF16, Q4_x, Q5_x, Q8_0, the K-quants ...), renamed from llama.cpp's
    names (`token_embd`, `blk.N.attn_q`, ...) to transformers' Llama names
    (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...), with the
    rows of the Q and K projections un-permuted: llama.cpp's converter
    interleaves each head's rotary halves, transformers' `rotate_half`
    layout keeps them apart;
  * the config.json dict built from the `llama.*` metadata (embeddings tied
    when the file has no `output.weight`);
  * the tokenizer (`tuning.gguf_tokenizer`) and its tokenizer_config.

`convert(path, out_dir)` writes a converted folder like `tuning.hf_convert`
does for safetensors sources: `params` (orbax), `config.json`,
`tokenizer.json`, `tokenizer_config.json` and `conversion.json` (last);
`ensure_converted(path, cache_dir)` does it once per file.

`read_lazily(path)` is `read` with `LazyTensor`s (tuning/formats/
huggingface.py): a tensor's bytes are read (plain reads, not the reader's
memory map), dequantised and un-permuted when the converter takes it, to
the same float32 bits as `read`'s. `convert(..., streaming=True)`, the
default, converts that way and spills each parameter (huggingface.py's
`spill`), so host memory stays near the largest tensor; `streaming=False`
is the whole-model path (`read`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import numpy as np

from tuning.formats import gguf_tokenizer
from tuning.formats import huggingface as hf_convert
from tuning.models import decoder_hf

_GLOBAL_NAMES = {
    'token_embd': 'model.embed_tokens',
    'output_norm': 'model.norm',
    'output': 'lm_head',
}
_BLOCK_NAMES = {
    'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
_BLOCK = re.compile(r'^blk\.(\d+)\.(\w+)\.(weight|bias)$')
_GLOBAL = re.compile(r'^(\w+)\.(weight|bias)$')


@dataclasses.dataclass
class GGUFCheckpoint:
  """A GGUF file's contents in Hugging Face terms."""

  tensors: dict[str, np.ndarray]  # HF Llama names, float32
  hf_config: dict[str, Any]
  tokenizer: Any  # tokenizers.Tokenizer
  tokenizer_config: dict[str, Any]
  tensor_types: dict[str, int]  # GGML type name -> count in the file


def _reader(path: str):
  if not os.path.isfile(path):
    raise ValueError(
        f'GGUF file not found: {path!r}; give the path of a ' '.gguf file'
    )
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        'reading GGUF files needs the gguf package: pip ' 'install gguf'
    ) from None
  return gguf.GGUFReader(path)


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary row permutation of a Q or K projection.

  Rows are output features (heads x head_dim); each head's rows were
  reordered from halves (i, i + D/2) to interleaved pairs (2i, 2i + 1).
  """
  return (
      w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
      .swapaxes(1, 2)
      .reshape(w.shape)
  )


def hf_config_from_metadata(reader, tensor_names) -> dict[str, Any]:
  """A transformers Llama config.json dict from the `llama.*` metadata."""
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(
        f'unsupported GGUF architecture {arch!r}: only '
        "'llama' files are read"
    )

  def key(name, default=None):
    return _field(reader, f'llama.{name}', default)

  hidden = int(key('embedding_length'))
  heads = int(key('attention.head_count'))
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  vocab = key('vocab_size') or (len(tokens) if tokens else None)
  if key('rope.scaling.type') not in (None, 'none'):
    raise ValueError(
        f'unsupported GGUF rope scaling '
        f'{key("rope.scaling.type")!r}: only plain rotary '
        'embeddings are read'
    )
  config = {
      'model_type': 'llama',
      'architectures': ['LlamaForCausalLM'],
      'vocab_size': int(vocab),
      'hidden_size': hidden,
      'intermediate_size': int(key('feed_forward_length')),
      'num_hidden_layers': int(key('block_count')),
      'num_attention_heads': heads,
      'num_key_value_heads': int(key('attention.head_count_kv', heads)),
      'head_dim': int(key('attention.key_length', hidden // heads)),
      'max_position_embeddings': int(key('context_length', 2048)),
      'rms_norm_eps': float(key('attention.layer_norm_rms_epsilon', 1e-6)),
      'rope_theta': float(key('rope.freq_base', 10000.0)),
      'hidden_act': 'silu',
      'tie_word_embeddings': 'output.weight' not in tensor_names,
      'attention_bias': 'blk.0.attn_q.bias' in tensor_names,
      'mlp_bias': 'blk.0.ffn_up.bias' in tensor_names,
      'bos_token_id': _field(reader, 'tokenizer.ggml.bos_token_id'),
      'eos_token_id': _field(reader, 'tokenizer.ggml.eos_token_id'),
      'pad_token_id': _field(reader, 'tokenizer.ggml.padding_token_id'),
  }
  return config


def _hf_name(name: str) -> str:
  block = _BLOCK.match(name)
  if block and block.group(2) in _BLOCK_NAMES:
    return (
        f'model.layers.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}.'
        f'{block.group(3)}'
    )
  plain = _GLOBAL.match(name)
  if plain and plain.group(1) in _GLOBAL_NAMES:
    return f'{_GLOBAL_NAMES[plain.group(1)]}.{plain.group(2)}'
  raise ValueError(
      f'unknown GGUF tensor {name!r} for a Llama model: '
      'this reader maps token_embd, output(_norm) and '
      f'blk.N.{{{",".join(_BLOCK_NAMES)}}}'
  )


def _dequantize(tensor) -> np.ndarray:
  import gguf  # pylint: disable=g-import-not-at-top

  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise ValueError(
        f'unknown GGUF tensor type {tensor.tensor_type.name} '
        f'(tensor {tensor.name}): the gguf package cannot '
        'dequantise it; upgrade gguf'
    ) from None
  # GGML lists dimensions fastest first; numpy wants them slowest first.
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  return np.asarray(values, np.float32).reshape(shape)


def _lazy_tensor(path: str, tensor, heads: int, kv_heads: int):
  """A GGUF tensor as a `LazyTensor`: on use its bytes are read from the
  file, dequantised as `_dequantize` does and un-permuted (Q and K)."""
  raw_dtype, raw_shape = tensor.data.dtype, tensor.data.shape
  count = int(tensor.n_bytes) // raw_dtype.itemsize

  def load() -> np.ndarray:
    data = np.fromfile(
        path, dtype=raw_dtype, count=count, offset=int(tensor.data_offset)
    ).reshape(raw_shape)
    value = _dequantize(tensor._replace(data=data))
    if '.attn_q.' in tensor.name:
      value = unpermute(value, heads)
    elif '.attn_k.' in tensor.name:
      value = unpermute(value, kv_heads)
    return value

  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  return hf_convert.LazyTensor(_hf_name(tensor.name), shape, np.float32, load)


def read_lazily(path: str) -> GGUFCheckpoint:
  """`read` without reading the tensors: they are `LazyTensor`s (module
  doc), the metadata, config and tokenizer as `read` gives them."""
  path = os.fspath(path)
  reader = _reader(path)
  names = [t.name for t in reader.tensors]
  hf_config = hf_config_from_metadata(reader, names)
  heads = hf_config['num_attention_heads']
  kv_heads = hf_config['num_key_value_heads']
  tensors, types = {}, {}
  for tensor in reader.tensors:
    lazy = _lazy_tensor(path, tensor, heads, kv_heads)
    types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    tensors[lazy.name] = lazy
  tokenizer, tokenizer_config = gguf_tokenizer.from_gguf(reader)
  return GGUFCheckpoint(tensors, hf_config, tokenizer, tokenizer_config, types)


def read(path: str) -> GGUFCheckpoint:
  """Reads, dequantises and renames a Llama GGUF file (see module doc)."""
  path = os.fspath(path)
  reader = _reader(path)
  names = [t.name for t in reader.tensors]
  hf_config = hf_config_from_metadata(reader, names)
  heads = hf_config['num_attention_heads']
  kv_heads = hf_config['num_key_value_heads']
  tensors, types = {}, {}
  for tensor in reader.tensors:
    hf_name = _hf_name(tensor.name)
    value = _dequantize(tensor)
    types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    if '.attn_q.' in tensor.name:
      value = unpermute(value, heads)
    elif '.attn_k.' in tensor.name:
      value = unpermute(value, kv_heads)
    tensors[hf_name] = value
  tokenizer, tokenizer_config = gguf_tokenizer.from_gguf(reader)
  return GGUFCheckpoint(tensors, hf_config, tokenizer, tokenizer_config, types)


def convert(
    path: str, out_dir: str, verbose: bool = True, streaming: bool = True
) -> dict[str, Any]:
  """Converts a GGUF file into a converted folder `out_dir`; the summary.

  `streaming` (module doc): one tensor at a time; False: `read` whole."""
  if not streaming:
    checkpoint = read(path)
    params, report = decoder_hf.convert_hf(
        checkpoint.tensors, checkpoint.hf_config
    )
    return _write_converted(path, out_dir, checkpoint, params, report, verbose)
  checkpoint = read_lazily(path)
  scratch = hf_convert.scratch_folder(out_dir)
  try:
    params, report = decoder_hf.convert_hf(
        checkpoint.tensors,
        checkpoint.hf_config,
        keep=hf_convert.spill(scratch),
    )
    return _write_converted(path, out_dir, checkpoint, params, report, verbose)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _write_converted(path, out_dir, checkpoint, params, report, verbose):
  """Writes the converted folder of a GGUF file; the summary."""
  summary = dict(
      report,
      source=os.path.abspath(path),
      gguf_tensor_types=checkpoint.tensor_types,
      tokenizer_files=['tokenizer.json', 'tokenizer_config.json'],
  )
  hf_convert.write_folder(
      out_dir,
      params,
      checkpoint.hf_config,
      summary,
      {
          'tokenizer.json': checkpoint.tokenizer.to_str(),
          'tokenizer_config.json': json.dumps(
              checkpoint.tokenizer_config, indent=2
          ),
      },
  )
  if verbose:
    types = ', '.join(
        f'{n} {t}' for t, n in sorted(checkpoint.tensor_types.items())
    )
    print(
        f'Converted {report["converted"]} tensors ({types}) from {path} '
        f'into {out_dir}.'
    )
  return summary


def is_gguf_file(path: str) -> bool:
  """A path that names a GGUF file (by its extension)."""
  return str(path).lower().endswith('.gguf')


def ensure_converted(path: str, cache_dir: str, verbose: bool = True) -> str:
  """A converted folder for the GGUF file `path`, converted only once.

  The cache key is the file's absolute path, size and modification time.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise ValueError(
        f'GGUF file not found: {path!r}; give the path of a ' '.gguf file'
    )
  stat = os.stat(path)
  key = f'{path}:{stat.st_size}:{int(stat.st_mtime)}'
  name = os.path.splitext(os.path.basename(path))[0][-50:]
  return hf_convert.convert_once(
      key, name, cache_dir, lambda out: convert(path, out, verbose=verbose)
  )
