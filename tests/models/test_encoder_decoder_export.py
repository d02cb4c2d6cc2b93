"""Hugging Face export of the encoder-decoder family
(encoder_decoder_hf.export_hf, hf_linear_names): tiny random Marian (tied,
untied, separate vocabularies) and T5 (tied; t5 v1.1's gated-GELU with an
untied output layer) written as a model folder, loaded by transformers'
`AutoModelForSeq2SeqLM.from_pretrained` (the same teacher-forced logits as
tuning's EncoderDecoder) and converted back into tuning (the same
parameters, bitwise)."""

import re

import jax
import numpy as np
import pytest

from conftest import flat
from models.test_encoder_decoder_parity import MODELS, SOURCE, TARGET
from models.test_encoder_decoder_parity import _hf_logits, _masks
from tuning.formats import huggingface_export
from tuning.models import encoder_decoder as ed
from tuning.models import encoder_decoder_hf as ed_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ARCHITECTURES = {'marian': 'MarianMTModel', 't5': 'T5ForConditionalGeneration'}
# The tensors each export writes besides the layers, as transformers 5 does.
T5_NORMS = {
    'encoder.final_layer_norm.weight',
    'decoder.final_layer_norm.weight',
}
OUTSIDE_LAYERS = {
    'marian': {'model.shared.weight', 'final_logits_bias'},
    'marian_untied': {
        'model.shared.weight',
        'model.encoder.embed_tokens.weight',
        'model.decoder.embed_tokens.weight',
        'lm_head.weight',
        'final_logits_bias',
    },
    'marian_unshared': {
        'model.encoder.embed_tokens.weight',
        'model.decoder.embed_tokens.weight',
        'final_logits_bias',
    },
    't5': {'shared.weight'} | T5_NORMS,
    't5_v1_1': {'shared.weight', 'lm_head.weight'} | T5_NORMS,
}


def hf_config(name):
  """A full config.json for model `name` of the parity tests, as the files
  are published (t5 v1.1: tie_word_embeddings false, no output rescale)."""
  kind, overrides = MODELS[name]
  if kind == 'marian':
    return transformers.MarianConfig(**overrides).to_dict()
  config = transformers.T5Config(**overrides).to_dict()
  if name == 't5_v1_1':
    config.pop('scale_decoder_outputs', None)
    config['tie_word_embeddings'] = False
  return config


def random_params(config, seed=0):
  """An EncoderDecoder and random float32 numpy parameters of its shapes
  (norm scales near 1, the rest around 0; no `init`, which is slow)."""
  model = ed.EncoderDecoder(ed_hf.config_from_hf(config))
  ids = jax.ShapeDtypeStruct((1, 3), np.int32)
  shapes = jax.eval_shape(
      lambda i: model.init(jax.random.key(seed), i, i, i), ids
  )['params']
  rng = np.random.default_rng(seed)

  def random(path, shape):
    scale = path[-1].key == 'scale'
    values = rng.normal(0.0, 0.1 if scale else 0.2, shape.shape) + scale
    return values.astype(np.float32)

  return model, jax.tree_util.tree_map_with_path(random, shapes)


@pytest.fixture(scope='module', params=sorted(MODELS))
def exported(request, tmp_path_factory):
  """(name, config, model, params, tensors, folder)."""
  config = hf_config(request.param)
  model, params = random_params(config)
  tensors, out_config = ed_hf.export_hf(params, config)
  folder = str(tmp_path_factory.mktemp(request.param) / 'hf')
  huggingface_export.write_folder(folder, tensors, out_config, generative=True)
  return request.param, config, model, params, tensors, folder


def test_transformers_gives_the_same_logits(exported):
  name, _, model, params, tensors, folder = exported
  outside = {n for n in tensors if not re.search(r'\.(layers|block)\.', n)}
  assert outside == OUTSIDE_LAYERS[name]
  hf, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
      folder, output_loading_info=True, dtype=torch.float32
  )
  assert type(hf).__name__ == ARCHITECTURES[MODELS[name][0]]
  assert not any(info.values()), info
  source_mask, target_mask = _masks()
  ours = np.asarray(
      jax.jit(model.apply)(
          {'params': params}, SOURCE, source_mask, TARGET, target_mask
      )
  )
  diff = float(np.abs(ours - _hf_logits(hf.eval())).max())
  print(f'{name}: max |logits diff| {diff:.2e}')
  assert diff <= 1e-4, name


def test_converting_the_export_back_gives_the_same_params(exported):
  name, config, _, params, _, _ = exported
  back, _ = ed_hf.convert_hf(*ed_hf.export_hf(params, config))
  back, expected = flat(back), flat(params)
  assert back.keys() == expected.keys(), name
  for key, value in expected.items():
    assert back[key].dtype == np.float32, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bad_parameters_are_named():
  config = hf_config('marian')
  _, params = random_params(config)
  params = jax.tree.map(lambda x: x, params)
  del params['decoder']['layer_1']['cross_attention']['value']['bias']
  params['extra'] = {'kernel': np.zeros((2, 2), np.float32)}
  with pytest.raises(
      ValueError,
      match=r'missing: decoder/layer_1/cross_attention/value/bias; '
      r'unexpected: extra/kernel$',
  ):
    ed_hf.export_hf(params, config)


@pytest.mark.parametrize('name', ['marian_untied', 't5_v1_1'])
def test_linear_names_are_transformers_linear_modules(name):
  config = hf_config(name)
  _, params = random_params(config)
  names = ed_hf.FAMILY.hf_linear_names(config)
  kernels = {k[: -len('/kernel')] for k in flat(params) if k.endswith('kernel')}
  assert set(names) == kernels  # every Dense, the untied lm_head too
  kind = MODELS[name][0]
  if kind == 'marian':
    hf = transformers.MarianMTModel(transformers.MarianConfig(**config))
    assert (
        names['decoder/layer_0/cross_attention/query']
        == 'model.decoder.layers.0.encoder_attn.q_proj'
    )
  else:
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**config)
    )
    assert (
        names['decoder/layer_1/cross_attention/out']
        == 'decoder.block.1.layer.1.EncDecAttention.o'
    )
  modules = dict(hf.named_modules())
  for path, module in names.items():
    assert isinstance(modules.get(module), torch.nn.Linear), (path, module)
    shape = flat(params)[path + '/kernel'].shape
    assert tuple(modules[module].weight.shape) == shape[::-1], path
