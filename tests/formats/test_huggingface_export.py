"""Hugging Face export of the decoder family (tuning/formats/
huggingface_export.py, decoder_hf.export_hf): tiny random GPT-2 and Llama
(grouped-query attention, tied and untied embeddings) written as a model
folder, loaded by transformers' `AutoModelForCausalLM.from_pretrained`
(the same logits and greedy tokens as tuning's DecoderLM) and converted
back into tuning (the same parameters, bitwise)."""

import functools
import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import flat
from models.test_decoder_parity import CONFIGS, _batch, _hf_logits
from tuning.decoding import sampling
from tuning.formats import huggingface as hf_convert
from tuning.formats import huggingface_export
from tuning.models import decoder_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM'}


def random_params(config, seed=0):
  """(DecoderLM, random float32 numpy parameters of its shapes): norm
  scales near 1, biases and weights large enough that greedy tokens are
  clear-cut and a swapped or missing tensor shows."""
  model = decoder_hf.from_hf_config(config)
  ids = np.zeros((1, 4), np.int32)
  shapes = jax.eval_shape(
      lambda: model.init(
          {'params': jax.random.key(0)}, ids, np.ones_like(ids), train=False
      )
  )['params']
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    noise = rng.normal(size=shape.shape).astype(np.float32)
    if path[-1].key == 'scale':
      return 1 + 0.1 * noise
    return 0.2 * noise

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def jitted_apply(name):
  return jax.jit(decoder_hf.from_hf_config(CONFIGS[name]).apply)


def load_hf(folder, **kwargs):
  """transformers' model from an exported folder; no tensor missing or left
  over."""
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      folder, output_loading_info=True, **kwargs
  )
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert not info['mismatched_keys'], info
  return model.eval()


def max_logits_diff(name, params, hf):
  ids, mask = _batch()
  ours = np.asarray(jitted_apply(name)({'params': params}, ids, mask))
  return float(np.abs(ours - _hf_logits(hf, ids, mask))[mask > 0].max())


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
  """(name, model, params, folder): random parameters exported by
  `export_hf` + `write_folder` as one model.safetensors."""
  config = CONFIGS[request.param]
  model, params = random_params(config)
  tensors, hf_config = decoder_hf.export_hf(params, config)
  folder = str(tmp_path_factory.mktemp(request.param) / 'hf')
  written = huggingface_export.write_folder(
      folder, tensors, hf_config, generative=True
  )
  assert sorted(written) == sorted(os.listdir(folder))
  return request.param, model, params, folder


def test_transformers_gives_the_same_logits(exported):
  name, model, params, folder = exported
  hf = load_hf(folder, dtype=torch.float32)
  assert type(hf).__name__ == ARCHITECTURES[CONFIGS[name]['model_type']]
  diff = max_logits_diff(name, params, hf)
  print(f'{name}: max |logits diff| {diff:.2e}')
  assert diff <= 1e-4, name


def test_transformers_gives_the_same_greedy_tokens(exported):
  """Greedy decoding that stops at the end-of-sequence id (2), as
  transformers' `generate` does by the exported generation_config.json."""
  name, model, params, folder = exported
  hf = load_hf(folder, dtype=torch.float32)
  ids, mask = _batch()
  steps = 8
  ours = sampling.generate(
      model, params, ids, mask, max_new_tokens=steps, stop_tokens=(2,)
  )
  with torch.no_grad():
    theirs = hf.generate(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    ).numpy()[:, ids.shape[1] :]
  theirs = np.pad(theirs, ((0, 0), (0, steps - theirs.shape[1])))
  np.testing.assert_array_equal(ours.tokens, theirs, err_msg=name)


def test_converting_the_export_back_gives_the_same_params(exported, tmp_path):
  name, _, params, folder = exported
  out = str(tmp_path / 'converted')
  hf_convert.convert(folder, out, verbose=False)
  back = flat(hf_convert.load_converted_params(out))
  expected = flat(params)
  assert back.keys() == expected.keys(), name
  for key, value in expected.items():
    assert back[key].dtype == np.float32, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_config_and_generation_config(exported):
  name, _, _, folder = exported
  umask = os.umask(0)
  os.umask(umask)
  for file in os.listdir(folder):  # as any new file (safetensors: 0600)
    assert os.stat(os.path.join(folder, file)).st_mode & 0o777 == (
        0o666 & ~umask
    ), file
  source = CONFIGS[name]
  with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  assert config['architectures'] == [ARCHITECTURES[source['model_type']]]
  assert config['model_type'] == source['model_type']
  assert config['tie_word_embeddings'] == source.get(
      'tie_word_embeddings', source['model_type'] == 'gpt2'
  )
  assert config['dtype'] == 'float32'
  assert (config['bos_token_id'], config['eos_token_id']) == (1, 2)
  generation = transformers.GenerationConfig.from_pretrained(folder)
  assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
  # The tied model has no lm_head tensor; the untied one has it.
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(os.path.join(folder, 'model.safetensors'), 'np') as f:
    names = set(f.keys())
    assert f.metadata() == {'format': 'pt'}
  assert ('lm_head.weight' in names) != config['tie_word_embeddings']


def test_sharded_folder_loads_with_the_same_logits(tmp_path):
  config = CONFIGS['llama']
  model, params = random_params(config, seed=1)
  tensors, hf_config = decoder_hf.export_hf(params, config)
  folder = str(tmp_path / 'sharded')
  written = huggingface_export.write_folder(
      folder, tensors, hf_config, generative=True, max_shard_size='20KB'
  )
  shards = sorted(f for f in written if f.endswith('.safetensors'))
  count = len(shards)
  assert count > 2 and shards == [
      f'model-{i:05d}-of-{count:05d}.safetensors' for i in range(1, count + 1)
  ]
  assert 'model.safetensors' not in os.listdir(folder)
  with open(
      os.path.join(folder, 'model.safetensors.index.json'), encoding='utf-8'
  ) as f:
    index = json.load(f)
  assert index['weight_map'].keys() == tensors.keys()
  assert set(index['weight_map'].values()) == set(shards)
  assert index['metadata']['total_size'] == sum(
      v.nbytes for v in tensors.values()
  )
  assert index['metadata']['total_parameters'] == sum(
      v.size for v in tensors.values()
  )
  # The tensors in transformers' state_dict order; its own save_pretrained
  # writes an index of the same form (which shard holds which tensor is
  # its own choice, from version to version).
  hf = load_hf(folder, dtype=torch.float32)
  assert list(tensors) == [n for n in hf.state_dict() if n in tensors]
  hf.save_pretrained(tmp_path / 'resaved', max_shard_size='20KB')
  with open(
      tmp_path / 'resaved' / 'model.safetensors.index.json', encoding='utf-8'
  ) as f:
    resaved = json.load(f)
  assert resaved['metadata'] == index['metadata']
  assert resaved['weight_map'].keys() == index['weight_map'].keys()
  assert max_logits_diff('llama', params, hf) <= 1e-4
  out = str(tmp_path / 'converted')
  hf_convert.convert(folder, out, verbose=False)
  back = flat(hf_convert.load_converted_params(out))
  for key, value in flat(params).items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bfloat16_export(tmp_path):
  """bfloat16 tensors that transformers loads as bfloat16 (the config's
  dtype) and, upcast, as the bfloat16-rounded parameters' logits."""
  config = CONFIGS['llama_tied']
  model, params = random_params(config, seed=2)
  tensors, hf_config = decoder_hf.export_hf(params, config)
  folder = str(tmp_path / 'bf16')
  huggingface_export.write_folder(
      folder, tensors, hf_config, dtype='bfloat16', generative=True
  )
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(os.path.join(folder, 'model.safetensors'), 'pt') as f:
    assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}
  assert load_hf(folder).dtype == torch.bfloat16
  rounded = jax.tree.map(
      lambda p: p.astype(ml_dtypes.bfloat16).astype(np.float32), params
  )
  hf = load_hf(folder, dtype=torch.float32)
  assert max_logits_diff('llama_tied', rounded, hf) <= 1e-4


def test_bad_dtype_and_shard_size_are_one_line_errors(tmp_path):
  config = CONFIGS['gpt2']
  _, params = random_params(config)
  tensors, hf_config = decoder_hf.export_hf(params, config)
  with pytest.raises(ValueError, match=r"--dtype='int8': use one of float32"):
    huggingface_export.write_folder(
        str(tmp_path / 'a'), tensors, hf_config, dtype='int8'
    )
  for size in ('lots', '0KB', 0):
    with pytest.raises(ValueError, match=r'--max_shard_size=.*: give a size'):
      huggingface_export.write_folder(
          str(tmp_path / 'b'), tensors, hf_config, max_shard_size=size
      )
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(
      tmp_path / 'b'
  )
  (tmp_path / 'c').mkdir()
  (tmp_path / 'c' / 'x').write_text('x')
  with pytest.raises(ValueError, match=r'exists and is not empty'):
    huggingface_export.write_folder(str(tmp_path / 'c'), tensors, hf_config)


def test_a_progress_bar_only_for_many_tensors(tmp_path, capfd):
  tensors = {f't{i}': np.ones(2, np.float32) for i in range(3)}
  huggingface_export.write_weights(str(tmp_path), tensors)
  assert capfd.readouterr().err == ''
  many = {f't{i}': np.ones(2, np.float32) for i in range(60)}
  (tmp_path / 'many').mkdir()
  huggingface_export.write_weights(str(tmp_path / 'many'), many)
  assert re.search(r'writing: 100%.* 60/60', capfd.readouterr().err)
