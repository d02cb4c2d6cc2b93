"""Encoder-decoder family without PyTorch: models from config fields, the
parameter names the family's regexes rely on, dtypes, dropout, learned
positions with the cache, length limits and conversion errors."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tuning.decoding import encoder_decoder as ed_decoding
from tuning.methods import lora
from tuning.models import encoder_decoder as ed
from tuning.models import encoder_decoder_hf as ed_hf

SOURCE = np.array(
    [[5, 9, 3, 7, 8, 2, 1, 0, 0, 0], [4, 7, 4, 9, 3, 6, 2, 11, 6, 1]], np.int32
)
TARGET = np.array([[0, 4, 8, 15, 3, 0], [0, 11, 2, 7, 11, 5]], np.int32)


def _fields(**overrides):
  fields = dict(
      shape='marian',
      encoder_layers=1,
      decoder_layers=2,
      width=32,
      heads=4,
      ffn_width=48,
      dropout=0.1,
      pad_id=0,
      eos_id=1,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _init(model):
  mask = (SOURCE != 0).astype(np.int32)
  # rbg keys: threefry's random bits are slow to compile on CPU.
  params = model.init(jax.random.key(0, impl='rbg'), SOURCE, mask, TARGET)[
      'params'
  ]
  return params, mask


def _apply(model, *args, **kwargs):
  """model.apply under jit (op-by-op dispatch compiles every op)."""
  return jax.jit(lambda *a: model.apply(*a, **kwargs))(*args)


_MODELS = {}


def _model(shape):
  """A from-scratch model and its params, made once per shape."""
  if shape not in _MODELS:
    # marian: learned positions and an untied output layer (the options).
    fields = (
        _fields(shape=shape)
        if shape == 't5'
        else _fields(
            tie_embeddings=False, positions='learned', max_positions=16
        )
    )
    model = ed_hf.build(fields, 'float32', vocab_size=20)
    _MODELS[shape] = (model,) + _init(model)
  return _MODELS[shape]


def _paths(params):
  return {
      '/'.join(k.key for k in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  }


@pytest.mark.parametrize('shape', ['marian', 't5'])
def test_from_fields_names_and_family_regexes(shape):
  _, params, _ = _model(shape)
  paths = _paths(params)
  for path in (
      'shared/embedding',
      'encoder/layer_0/attention/query/kernel',
      'encoder/layer_0/mlp/wi/kernel',
      'decoder/layer_1/self_attention/value/kernel',
      'decoder/layer_0/cross_attention/out/kernel',
      'decoder/layer_1/mlp_norm/scale',
  ):
    assert path in paths, path
  if shape == 't5':
    assert not any(p.endswith('/bias') for p in paths)
    assert 'decoder/relative_attention_bias/embedding' in paths
    assert 'encoder/final_norm/scale' in paths
  else:
    assert 'final_logits_bias' in paths
    assert 'decoder/layer_0/cross_attention_norm/bias' in paths
    assert 'decoder/position_embedding/embedding' in paths
  family = ed_hf.FAMILY
  dense = lora.dense_modules(params)
  targets = {
      m for m in dense if any(re.fullmatch(t, m) for t in family.lora_targets)
  }
  assert targets == set(dense) - {'lm_head'}  # every projection
  assert len(targets) == 6 + 2 * 10
  layers = {
      re.fullmatch(family.layer_regex, p).group(1)
      for p in paths
      if re.fullmatch(family.layer_regex, p)
  }
  assert layers == {'0', '1'}
  heads = {
      p for p in paths if any(re.fullmatch(h, p) for h in family.head_regex)
  }
  assert heads == (
      set() if shape == 't5' else {'final_logits_bias', 'lm_head/kernel'}
  )


def test_dtypes_dropout_and_bad_fields():
  model, params, mask = _model('marian')
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
  logits = _apply(model, {'params': params}, SOURCE, mask, TARGET)
  assert logits.shape == (2, 6, 20) and logits.dtype == jnp.float32
  train = _apply(
      model,
      {'params': params},
      SOURCE,
      mask,
      TARGET,
      train=True,
      rngs={'dropout': jax.random.key(1, impl='rbg')},
  )
  assert not np.allclose(train, logits)
  bf16 = ed.EncoderDecoder(model.config, jnp.bfloat16)
  low = _apply(bf16, {'params': params}, SOURCE, mask, TARGET)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, logits, atol=0.1)
  with pytest.raises(ValueError, match='shape'):
    ed_hf.build(_fields(shape='bart'), 'float32', vocab_size=20)
  with pytest.raises(ValueError, match='divisible'):
    ed_hf.build(_fields(heads=5), 'float32', vocab_size=20)
  with pytest.raises(ValueError, match='vocab_size'):
    ed_hf.build(_fields(), 'float32')


def test_learned_positions_cache_and_length_limits():
  model, params, mask = _model('marian')
  variables = {'params': params}
  full = _apply(model, variables, SOURCE, mask, TARGET)
  # Three tokens at a time: the cache takes several tokens per call too.
  decode = jax.jit(
      lambda tokens, cache: model.apply(
          variables,
          tokens,
          model.apply(variables, SOURCE, mask, method=ed.EncoderDecoder.encode),
          mask,
          cache=cache,
          method=ed.EncoderDecoder.decode,
      )
  )
  first, cache = decode(TARGET[:, :3], ed_decoding.init_cache(model, 2, 8))
  rest, cache = decode(TARGET[:, 3:], cache)
  np.testing.assert_allclose(np.concatenate([first, rest], 1), full, atol=2e-5)
  # Each source gets floor(1 + 0.5 * its length) tokens: 4 and 6.
  beams = ed_decoding.generate(
      model,
      params,
      SOURCE,
      mask,
      beam_size=2,
      max_new_tokens=1,
      length_ratio=0.5,
  )
  assert beams.tokens.shape == (2, 2, 6)
  np.testing.assert_array_equal(beams.tokens[0, :, 4:], 0)
  with pytest.raises(ValueError, match='positions'):
    ed_decoding.init_cache(model, 2, 17)


def test_conversion_errors():
  hf_config = dict(
      model_type='marian',
      vocab_size=20,
      d_model=32,
      encoder_layers=1,
      decoder_layers=1,
      encoder_attention_heads=4,
      decoder_attention_heads=4,
      encoder_ffn_dim=48,
      decoder_ffn_dim=48,
  )
  with pytest.raises(ValueError, match='missing tensors: .*fc1'):
    ed_hf.convert_hf({'model.shared.weight': np.zeros((20, 32))}, hf_config)
  with pytest.raises(ValueError, match="model_type='bert'"):
    ed_hf.convert_hf({}, dict(hf_config, model_type='bert'))
  with pytest.raises(ValueError, match='unexpected tensors: extra'):
    ed_hf.convert_hf({'extra': np.zeros(2)}, hf_config)
