"""Model families: every registered builder builds and initialises, the
registry's lookups and their errors, BERT's conversion through the registry,
a toy family through the generic conversion path, and the head/LoRA/layer
regexes each family gives a run."""

import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from tuning.formats import huggingface as hf_convert
from tuning.methods import lora
from tuning.config.defaults import base_config
from tuning.models import bert_hf
from tuning.models import encoder_decoder_hf
from tuning.models import registry
from tuning.models.family import Family
from tuning.methods.naming import naming_rules
from tuning.methods.optimizers import parameter_settings

BERT_CONFIG = dict(
    model_type='bert',
    architectures=['BertModel'],
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
)
# A tiny decoder (the decoder family's names build from a Llama config).
LLAMA_CONFIG = dict(
    model_type='llama',
    vocab_size=50,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
    tie_word_embeddings=False,
)
DECODERS = ('decoder', 'gpt2', 'llama')
# A tiny encoder-decoder (Marian shape) for the encoder-decoder's names.
MARIAN_CONFIG = dict(
    model_type='marian',
    vocab_size=50,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=16,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
ENCODER_DECODERS = ('encoder_decoder', 'marian', 't5')
IDS = np.array([[2, 7, 9, 3, 0], [2, 5, 3, 0, 0]], np.int32)
TEXT = {'input_ids': IDS, 'attention_mask': (IDS > 0).astype(np.int32)}
# The model inputs of each config.model.name (a new family adds its own).
INPUTS = {
    'mlp': {'x': np.ones((2, 6), np.float32)},
    'cnn': {'x': np.ones((2, 8, 8, 1), np.float32)},
    'lstm': TEXT,
    'gru': TEXT,
    'bert': TEXT,
    'decoder': TEXT,
    'gpt2': TEXT,
    'llama': TEXT,
    **{
        name: {
            **TEXT,
            'decoder_input_ids': IDS,
            'decoder_attention_mask': (IDS > 0).astype(np.int32),
        }
        for name in ENCODER_DECODERS
    },
    # Knowledge-graph triples: (head, relation, tail) ids.
    **{
        name: {'triples': np.array([[0, 40, 1], [2, 41, 3]], np.int32)}
        for name in ('transe', 'distmult')
    },
}
TRIPLE_SCORERS = ('transe', 'distmult')
# Today's defaults (before the families declared them).
HEAD = (r'(head|classifier)/.*',)
LAYER_REGEX = r'.*layer_(\d+)/.*'
BERT_LORA_TARGETS = (r'.*attention/(query|value)',)
DECODER_HEAD = (r'lm_head/.*', r'decoder/final_norm/.*')
DECODER_LORA_TARGETS = (
    r'.*attention/(query|key|value|out)',
    r'.*mlp/(gate|up|down)',
)
ENCODER_DECODER_HEAD = (r'lm_head/.*', r'final_logits_bias')


def model_config(name, tmp_path):
  config = base_config()
  config.model.name = name
  config.model.hidden = (8,)
  config.model.channels = (4,)
  config.model.embed_dim = 8
  path = os.path.join(tmp_path, 'config.json')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(
        LLAMA_CONFIG
        if name in DECODERS
        else MARIAN_CONFIG
        if name in ENCODER_DECODERS
        else BERT_CONFIG,
        f,
    )
  config.model.hf_config = path
  return config


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def test_every_registered_model_name_has_example_inputs():
  assert set(INPUTS) == set(registry.model_names())


@pytest.mark.parametrize(
    'name', [n for n in registry.model_names() if n not in TRIPLE_SCORERS]
)
def test_every_family_builds_and_initialises(name, tmp_path):
  config = model_config(name, tmp_path)
  # Language models and translators: logits over their vocabulary.
  decoder = name in DECODERS + ENCODER_DECODERS
  model = registry.build_model(
      config.model, 'float32', num_outputs=None if decoder else 3, vocab_size=50
  )
  variables = model.init(
      {'params': jax.random.key(0)}, **INPUTS[name], train=False
  )
  logits = model.apply(variables, **INPUTS[name], train=False)
  assert logits.shape == ((2, 5, 50) if decoder else (2, 3))
  assert logits.dtype == jnp.float32
  # The head the family names is in the tree, and only the head.
  head = [
      p
      for p in flat(variables['params'])
      if any(re.fullmatch(r, p) for r in naming_rules(config).head)
  ]
  roots = (
      ('lm_head', 'final_logits_bias')
      if name in ENCODER_DECODERS
      else ('lm_head', 'decoder/final_norm')
      if decoder
      else ('head', 'classifier')
  )
  assert head and all(p.startswith(roots) for p in head), head


@pytest.mark.parametrize('name', TRIPLE_SCORERS)
def test_triple_scorers_build_with_two_classes_and_no_head(name, tmp_path):
  config = model_config(name, tmp_path)
  model = registry.build_model(config.model, num_outputs=2, vocab_size=50)
  variables = model.init(jax.random.key(0), **INPUTS[name])
  logits = model.apply(variables, **INPUTS[name])
  assert logits.shape == (2, 2) and logits.dtype == jnp.float32
  assert sorted(flat(variables['params'])) == ['bias', 'embeddings']
  with pytest.raises(ValueError, match='2 classes'):
    registry.build_model(config.model, num_outputs=3, vocab_size=50)


def test_builders_take_num_outputs_and_recurrent_needs_a_vocabulary(tmp_path):
  config = model_config('mlp', tmp_path)
  model = registry.build_model(config.model, num_outputs=1)
  params = model.init(jax.random.key(0), INPUTS['mlp']['x'])['params']
  assert params['head']['kernel'].shape == (8, 1)
  with pytest.raises(
      ValueError, match='needs text data: set ' 'config.data.text_column'
  ):
    registry.build_model(model_config('lstm', tmp_path).model, num_outputs=2)
  with pytest.raises(ValueError, match="config.dtype='float16'"):
    registry.build_model(config.model, 'float16', num_outputs=2)


def test_unknown_names_are_one_line_errors_listing_the_choices():
  with pytest.raises(
      ValueError,
      match=r"unknown config.model.name 'vit': "
      r'choose one of bert, cnn, decoder, distmult, encoder_decoder, '
      r'gpt2, gru, llama, lstm, marian, mlp, t5, transe$',
  ):
    registry.family('vit')
  with pytest.raises(ValueError) as error:
    registry.family_for_hf_model_type('mamba')
  message = str(error.value)
  assert '\n' not in message
  assert "model_type='mamba'" in message and "'bert'" in message
  assert registry.family_for_hf_model_type('bert') is bert_hf.FAMILY


def test_bert_name_map_is_the_one_before_the_move():
  config = bert_hf.bert_config_from_hf(BERT_CONFIG)
  got = {
      k: ('/'.join(p), t) for k, (p, t) in bert_hf.hf_name_map(config).items()
  }
  layer = 'encoder.layer.0'
  fx = 'bert/encoder/layer_0'
  expected = {
      'embeddings.word_embeddings.weight': (
          'bert/embeddings/word_embeddings/embedding',
          False,
      ),
      'embeddings.position_embeddings.weight': (
          'bert/embeddings/position_embeddings/embedding',
          False,
      ),
      'embeddings.token_type_embeddings.weight': (
          'bert/embeddings/token_type_embeddings/embedding',
          False,
      ),
      'embeddings.LayerNorm.weight': ('bert/embeddings/LayerNorm/scale', False),
      'embeddings.LayerNorm.bias': ('bert/embeddings/LayerNorm/bias', False),
      'pooler.dense.weight': ('bert/pooler/dense/kernel', True),
      'pooler.dense.bias': ('bert/pooler/dense/bias', False),
  }
  for hf, path in (
      ('attention.self.query', 'attention/query'),
      ('attention.self.key', 'attention/key'),
      ('attention.self.value', 'attention/value'),
      ('attention.output.dense', 'attention_output/dense'),
      ('intermediate.dense', 'intermediate/dense'),
      ('output.dense', 'output/dense'),
  ):
    expected[f'{layer}.{hf}.weight'] = (f'{fx}/{path}/kernel', True)
    expected[f'{layer}.{hf}.bias'] = (f'{fx}/{path}/bias', False)
  for hf, path in (
      ('attention.output.LayerNorm', 'attention_output/LayerNorm'),
      ('output.LayerNorm', 'output/LayerNorm'),
  ):
    expected[f'{layer}.{hf}.weight'] = (f'{fx}/{path}/scale', False)
    expected[f'{layer}.{hf}.bias'] = (f'{fx}/{path}/bias', False)
  assert got == expected


def test_bert_conversion_through_the_registry_round_trips():
  model = bert_hf.from_hf_config(BERT_CONFIG, 3)
  params = flat(model.init(jax.random.key(0), IDS)['params'])
  config = bert_hf.bert_config_from_hf(BERT_CONFIG)
  tensors = {}
  for hf, (path, transpose) in bert_hf.hf_name_map(config).items():
    value = np.asarray(params['/'.join(path)])
    tensors['bert.' + hf] = value.T if transpose else value
  tensors['classifier.weight'] = np.asarray(params['classifier/kernel']).T
  tensors['classifier.bias'] = np.asarray(params['classifier/bias'])
  tensors['cls.predictions.bias'] = np.zeros(50, np.float32)
  converted, summary = hf_convert.convert_tensors(tensors, BERT_CONFIG)
  assert summary['has_classifier'] and not summary['pooler_missing']
  assert summary['left_out'] == {'cls.predictions.bias': 'pretraining head'}
  got = flat(converted)
  assert got.keys() == params.keys()
  for k, v in params.items():
    np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=k)


def test_unsupported_architecture_is_a_one_line_error():
  config = dict(BERT_CONFIG, architectures=['RobertaModel'])
  with pytest.raises(hf_convert.ConversionError) as error:
    hf_convert.convert_tensors({}, config)
  assert "'RobertaModel'" in str(error.value) and '\n' not in str(error.value)


def _toy_convert(tensors, hf_config):
  del hf_config
  params = {'head': {'kernel': tensors['w'].T}}
  return params, {
      'converted': 1,
      'left_out': {'extra': 'not used'},
      'notes': ['A toy note.'],
  }


def test_a_new_family_converts_through_the_generic_path(
    tmp_path, monkeypatch, capsys
):
  toy = Family(
      names=('toy',),
      build=lambda *a, **k: None,
      hf_model_types=('toy',),
      convert_hf=_toy_convert,
  )
  monkeypatch.setattr(registry, 'FAMILIES', registry.FAMILIES + (toy,))
  src = tmp_path / 'src'
  src.mkdir()
  (src / 'config.json').write_text(json.dumps({'model_type': 'toy'}))
  (src / 'vocab.txt').write_text('a\nb\n')
  save_file(
      {
          'w': np.arange(6, dtype=np.float32).reshape(2, 3),
          'extra': np.zeros(1, np.float32),
      },
      str(src / 'model.safetensors'),
  )
  out = hf_convert.ensure_converted(str(src), str(tmp_path / 'cache'))
  printed = capsys.readouterr().out
  assert 'A toy note.' in printed and 'extra (not used)' in printed
  params = hf_convert.load_converted_params(out)
  np.testing.assert_array_equal(
      params['head']['kernel'], np.arange(6, dtype=np.float32).reshape(2, 3).T
  )
  assert os.path.isfile(os.path.join(out, 'vocab.txt'))
  with open(os.path.join(out, 'conversion.json'), encoding='utf-8') as f:
    assert json.load(f)['source'] == str(src)


@pytest.mark.parametrize('name', registry.model_names())
def test_each_family_gives_todays_default_regexes(name, tmp_path):
  rules = naming_rules(model_config(name, tmp_path))
  if name in DECODERS:  # new family: its own head and LoRA targets
    assert rules.head == DECODER_HEAD and rules.layer_regex == LAYER_REGEX
    assert rules.lora_targets == DECODER_LORA_TARGETS
    return
  if name in ENCODER_DECODERS:
    assert rules.head == ENCODER_DECODER_HEAD
    assert rules.lora_targets == encoder_decoder_hf.FAMILY.lora_targets
    assert re.fullmatch(rules.layer_regex, 'decoder/layer_3/mlp/wo/kernel')
    return
  assert rules.head == HEAD
  assert rules.layer_regex == LAYER_REGEX
  # Only BERT has default LoRA targets; today's default (attention
  # query/value) matched no layer of the other families.
  assert rules.lora_targets == (BERT_LORA_TARGETS if name == 'bert' else ())


def test_config_values_override_the_family_and_print_as_null(tmp_path):
  config = model_config('mlp', tmp_path)
  assert json.loads(config.to_json_best_effort())['optimizer']['head'] is None
  config.optimizer.head = ('dense_0/.*',)
  config.optimizer.layer_index_regex = r'dense_(\d+)/.*'
  config.lora.targets = ('dense_.*',)
  rules = naming_rules(config)
  assert rules.head == ('dense_0/.*',)
  assert rules.layer_regex == r'dense_(\d+)/.*'
  assert rules.lora_targets == ('dense_.*',)
  model = registry.build_model(config.model, num_outputs=3)
  params = model.init(jax.random.key(0), INPUTS['mlp']['x'])['params']
  config.optimizer.linear_probing = True
  settings = parameter_settings(params, config.optimizer, naming=rules)
  assert {p for p, s in settings.items() if s.trains} == {
      'dense_0/kernel',
      'dense_0/bias',
  }


def test_lora_adapts_the_family_targets_unless_the_config_names_them(tmp_path):
  config = model_config('bert', tmp_path)
  config.lora.rank = 2
  model = registry.build_model(config.model, num_outputs=2)
  adapted = lora.LoraModel(model, config.lora, naming_rules(config))
  params = flat(adapted.init({'params': jax.random.key(0)}, IDS)['params'])
  assert sorted(p for p in params if p.endswith('lora_a')) == [
      'bert/encoder/layer_0/attention/query/lora_a',
      'bert/encoder/layer_0/attention/value/lora_a',
  ]
  mlp_config = model_config('mlp', tmp_path)
  mlp_config.lora.rank = 2
  mlp = registry.build_model(mlp_config.model, num_outputs=2)
  with pytest.raises(ValueError, match='config.lora.targets is not set'):
    lora.LoraModel(mlp, mlp_config.lora, naming_rules(mlp_config)).init(
        jax.random.key(0), INPUTS['mlp']['x']
    )
