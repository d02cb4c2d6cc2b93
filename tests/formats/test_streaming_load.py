"""Streaming conversion (tuning/formats/huggingface.py, gguf.py): tensors
read one at a time (`LazyTensor`), each converted parameter spilled and
saved by orbax one leaf at a time, written bitwise the same as the
whole-model path (`streaming=False`) for GPT-2, a Llama sharded across three
safetensors files (bfloat16 and float32 tensors), BERT and a GGUF file.
Peak memory is measured by benchmarks/load_memory.py, not here."""

# The tiny models of the parity and GGUF tests are reused.
# pylint: disable=protected-access

import json
import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TINY_LLAMA
from models.test_bert_parity import SMALL_CONFIG, _inputs
from tuning.formats import gguf_export
from tuning.formats import gguf as gguf_checkpoint
from tuning.formats import huggingface as hf_convert
from tuning.models import bert_hf
from tuning.models import decoder_hf

gguf = pytest.importorskip('gguf')
safetensors_numpy = pytest.importorskip('safetensors.numpy')
tokenizers = pytest.importorskip('tokenizers')

GPT2 = dict(TINY_LLAMA, model_type='gpt2', n_embd=32, n_layer=2, n_head=4)


def _random(model, *inputs):
  """Normal random float32 parameters of `model` (shapes by eval_shape)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), shapes['params']
  )


def _decoder_tensors(hf_config):
  """HF-named tensors and config.json of a random decoder, by
  decoder_hf.export_hf."""
  model = decoder_hf.from_hf_config(hf_config)
  params = _random(model, np.zeros((1, 2), np.int32))
  return decoder_hf.export_hf(params, hf_config)


def _write_folder(folder, tensors, hf_config, shards=1):
  """A HF model folder: model.safetensors, or `shards` files and
  model.safetensors.index.json with the tensors dealt out in turn."""
  os.makedirs(folder)
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config, f)
  if shards == 1:
    safetensors_numpy.save_file(
        tensors, os.path.join(folder, 'model.safetensors')
    )
    return str(folder)
  files = [
      f'model-{i + 1:05d}-of-{shards:05d}.safetensors' for i in range(shards)
  ]
  weight_map = {n: files[i % shards] for i, n in enumerate(tensors)}
  for file in files:
    safetensors_numpy.save_file(
        {n: v for n, v in tensors.items() if weight_map[n] == file},
        os.path.join(folder, file),
    )
  with open(
      os.path.join(folder, 'model.safetensors.index.json'),
      'w',
      encoding='utf-8',
  ) as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  return str(folder)


def _gpt2_folder(root):
  tensors, config = _decoder_tensors(GPT2)
  tensors['transformer.h.0.attn.bias'] = np.tril(np.ones((1, 1, 8, 8)))
  return _write_folder(root / 'gpt2', tensors, config)


def _llama_folder(root):
  """Three shards; the 2-D weights in bfloat16, the norms in float32, and
  an int64 buffer that the converter leaves out."""
  tensors, config = _decoder_tensors(dict(TINY_LLAMA, vocab_size=96))
  tensors = {
      n: v.astype(ml_dtypes.bfloat16) if v.ndim == 2 else v
      for n, v in tensors.items()
  }
  tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.arange(
      4, dtype=np.int64
  )
  return _write_folder(root / 'llama', tensors, config, shards=3)


def _bert_folder(root):
  """A BertForSequenceClassification (3 classes): weights transposed."""
  model = bert_hf.from_hf_config(SMALL_CONFIG, 3)
  params = _random(model, *_inputs())
  tensors, config = bert_hf.export_hf(params, SMALL_CONFIG)
  return _write_folder(root / 'bert', tensors, config)


FOLDERS = {'gpt2': _gpt2_folder, 'llama': _llama_folder, 'bert': _bert_folder}


def _saved(out):
  """({path: (dtype, shape, bytes)} of the saved params, the orbax
  metadata's shapes, conversion.json)."""
  params = hf_convert.load_converted_params(out)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays = {
      jax.tree_util.keystr(p): (type(v), v.dtype, v.shape, v.tobytes())
      for p, v in leaves
  }
  metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(out, 'params'))
  tree = getattr(metadata, 'item_metadata', metadata)
  shapes = jax.tree.map(lambda m: tuple(m.shape), getattr(tree, 'tree', tree))
  with open(os.path.join(out, 'conversion.json'), encoding='utf-8') as f:
    summary = json.load(f)
  return arrays, shapes, summary


@pytest.mark.parametrize('name', sorted(FOLDERS))
def test_streaming_conversion_equals_the_whole_model_one(
    name, tmp_path, monkeypatch
):
  source = FOLDERS[name](tmp_path)
  hf_convert.convert(source, str(tmp_path / 'whole'), False, streaming=False)

  def no_whole_read(folder):
    raise AssertionError(f'streaming read {folder} whole')

  monkeypatch.setattr(hf_convert, 'read_safetensors', no_whole_read)
  hf_convert.convert(source, str(tmp_path / 'streamed'), verbose=False)
  whole = _saved(str(tmp_path / 'whole'))
  streamed = _saved(str(tmp_path / 'streamed'))
  assert streamed[0] == whole[0]
  assert streamed[1:] == whole[1:]
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.spilled')]


def test_lazy_tensors_load_as_read_safetensors_does(tmp_path):
  source = _llama_folder(tmp_path)
  whole = hf_convert.read_safetensors(source)
  lazy = hf_convert.open_safetensors(source)
  assert list(lazy) == list(whole)
  for name, value in whole.items():
    loaded = np.asarray(lazy[name])
    assert (lazy[name].shape, lazy[name].dtype) == (value.shape, value.dtype)
    assert (loaded.dtype, loaded.tobytes()) == (value.dtype, value.tobytes())
  name = 'model.layers.0.self_attn.q_proj.weight'
  assert whole[name].dtype == np.float32  # stored as bfloat16
  np.testing.assert_array_equal(lazy[name].T, whole[name].T)


def test_spilled_parameters_are_saved_one_at_a_time(tmp_path, monkeypatch):
  """When orbax reads a spilled parameter, every parameter it read before
  has been written and its scratch file deleted."""
  source = _llama_folder(tmp_path)
  loaded = []
  load = hf_convert.SpilledArray.load

  def checked_load(self):
    assert not [p for p in loaded if os.path.exists(p)], 'two in memory'
    loaded.append(self.path)
    return load(self)

  monkeypatch.setattr(hf_convert.SpilledArray, 'load', checked_load)
  summary = hf_convert.convert(source, str(tmp_path / 'out'), verbose=False)
  assert len(loaded) == summary['converted'] == 2 * 9 + 3


def test_a_truncated_shard_is_a_one_line_error(tmp_path):
  source = _llama_folder(tmp_path)
  shard = os.path.join(source, 'model-00002-of-00003.safetensors')
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) - 10)
  with pytest.raises(hf_convert.ConversionError) as error:
    hf_convert.convert(source, str(tmp_path / 'out'), verbose=False)
  message = str(error.value)
  assert '\n' not in message and 'model-00002-of-00003' in message
  assert 'ends past the end of the file' in message
  assert 'download it again' in message


def _gguf_file(root):
  """A tiny tied Llama written by gguf_export as Q8_0 (Q/K rows permuted as
  llama.cpp does), with a byte-level tokenizer of its 96 ids."""
  config = dict(TINY_LLAMA, vocab_size=96, tie_word_embeddings=True)
  tensors, config = _decoder_tensors(config)
  tokenizer = tokenizers.Tokenizer(
      tokenizers.models.BPE(
          vocab={**{chr(65 + i): i for i in range(89)}, 'AB': 89},
          merges=[('A', 'B')],
      )
  )
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False
  )
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.save(str(root / 'tokenizer.json'))
  return gguf_export.write_gguf(
      str(root / 'gguf'),
      tensors,
      config,
      [str(root / 'tokenizer.json')],
      quant='q8_0',
  )


def test_gguf_streaming_conversion_equals_the_whole_model_one(tmp_path):
  path = _gguf_file(tmp_path)
  read = gguf_checkpoint.read(path)
  lazy = gguf_checkpoint.read_lazily(path)
  assert list(lazy.tensors) == list(read.tensors)
  assert (
      lazy.tensor_types == read.tensor_types == {'F16': 2, 'F32': 5, 'Q8_0': 13}
  )
  for name, value in read.tensors.items():
    assert np.asarray(lazy.tensors[name]).tobytes() == value.tobytes()
  gguf_checkpoint.convert(
      path, str(tmp_path / 'whole'), verbose=False, streaming=False
  )
  gguf_checkpoint.convert(path, str(tmp_path / 'streamed'), verbose=False)
  whole = _saved(str(tmp_path / 'whole'))
  streamed = _saved(str(tmp_path / 'streamed'))
  assert streamed[0] == whole[0]
  assert streamed[1:] == whole[1:]
  for name in ('tokenizer.json', 'tokenizer_config.json', 'config.json'):
    with open(tmp_path / 'whole' / name, encoding='utf-8') as f:
      with open(tmp_path / 'streamed' / name, encoding='utf-8') as g:
        assert f.read() == g.read()
