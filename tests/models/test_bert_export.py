"""Hugging Face export of the BERT family (bert_hf.export_hf,
hf_linear_names): a tiny random BERT with a classification head written as
`BertForSequenceClassification` and one without as `BertModel`, loaded by
transformers' Auto classes (the same logits / hidden states as tuning's) and
converted back into tuning (the same parameters, bitwise)."""

import json

import jax
import numpy as np
import pytest

from conftest import flat
from models.test_bert_parity import SMALL_CONFIG, _init_small, _inputs
from tuning.formats import huggingface_export
from tuning.models import bert as bert_lib
from tuning.models import bert_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

CLASSES = ['negative', 'neutral', 'positive']
# What the export command passes for a classification run.
CLASSIFICATION_CONFIG = dict(
    SMALL_CONFIG,
    id2label={str(i): n for i, n in enumerate(CLASSES)},
    label2id={n: i for i, n in enumerate(CLASSES)},
    num_labels=len(CLASSES),
    problem_type='single_label_classification',
)


def random_params(num_classes=len(CLASSES)):
  """A BertClassifier's initial parameters with random norms and biases (so
  that a swapped or missing one shows), as float32 numpy."""
  model, params = _init_small(num_classes)
  rng = np.random.default_rng(0)
  return model, jax.tree.map(
      lambda p: np.asarray(p, np.float32)
      + (
          0.1 * rng.normal(size=p.shape).astype(np.float32)
          if p.ndim == 1
          else 0
      ),
      params,
  )


def encoder_only(params, pooler=True):
  """The `bert` subtree alone (a BertModel), with or without its pooler."""
  bert = {k: v for k, v in params['bert'].items() if pooler or k != 'pooler'}
  return {'bert': bert}


def export_folder(tmp_path_factory, name, params, hf_config):
  tensors, config = bert_hf.export_hf(params, hf_config)
  folder = str(tmp_path_factory.mktemp(name) / 'hf')
  huggingface_export.write_folder(folder, tensors, config)
  return folder


def load_hf(auto_class, folder):
  model, info = auto_class.from_pretrained(
      folder, output_loading_info=True, dtype=torch.float32
  )
  return model.eval(), info


def hf_outputs(model):
  ids, mask, types = (torch.tensor(a, dtype=torch.long) for a in _inputs())
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types)


def assert_round_trip(params, hf_config):
  back, _ = bert_hf.convert_hf(*bert_hf.export_hf(params, hf_config))
  back, expected = flat(back), flat(params)
  assert back.keys() == expected.keys()
  for key, value in expected.items():
    assert back[key].dtype == np.float32, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  model, params = random_params()
  folder = export_folder(
      tmp_path_factory, 'classifier', params, CLASSIFICATION_CONFIG
  )
  return model, params, folder


def test_classifier_loads_as_sequence_classification(classifier):
  model, params, folder = classifier
  hf, info = load_hf(transformers.AutoModelForSequenceClassification, folder)
  assert type(hf).__name__ == 'BertForSequenceClassification'
  assert not any(info.values()), info
  assert hf.config.id2label == dict(enumerate(CLASSES))
  assert hf.config.label2id == {n: i for i, n in enumerate(CLASSES)}
  assert hf.config.num_labels == 3
  assert hf.config.problem_type == 'single_label_classification'
  ours = np.asarray(model.apply({'params': params}, *_inputs()))
  diff = float(np.abs(ours - hf_outputs(hf).logits.numpy()).max())
  print(f'classifier: max |logits diff| {diff:.2e}')
  assert diff <= 1e-4


def test_classifier_round_trip_is_bitwise():
  _, params = random_params()
  assert_round_trip(params, CLASSIFICATION_CONFIG)
  tensors, config = bert_hf.export_hf(params, CLASSIFICATION_CONFIG)
  assert config['architectures'] == ['BertForSequenceClassification']
  assert 'num_labels' not in config  # transformers writes id2label instead
  assert all(
      n.startswith('bert.') or n.startswith('classifier.') for n in tensors
  )


def tuning_encoder(params):
  ids, mask, types = _inputs()
  encoder = bert_lib.BertEncoder(bert_hf.bert_config_from_hf(SMALL_CONFIG))
  return encoder.apply({'params': params['bert']}, ids, mask, types)


@pytest.mark.parametrize('pooler', [True, False])
def test_encoder_loads_as_bert_model(pooler, tmp_path_factory):
  _, full = random_params()
  params = encoder_only(full, pooler)
  folder = export_folder(
      tmp_path_factory, f'encoder_pooler_{pooler}', params, SMALL_CONFIG
  )
  hf, info = load_hf(transformers.AutoModel, folder)
  assert type(hf).__name__ == 'BertModel'
  assert not info['unexpected_keys'] and not info['mismatched_keys'], info
  # Without a pooler transformers initialises BertModel's randomly.
  expected_missing = (
      set()
      if pooler
      else {
          'pooler.dense.weight',
          'pooler.dense.bias',
      }
  )
  assert set(info['missing_keys']) == expected_missing, info
  hidden, pooled = tuning_encoder(full)
  out = hf_outputs(hf)
  mask = _inputs()[1] > 0
  diff = np.abs(np.asarray(hidden) - out.last_hidden_state.numpy())[mask]
  print(f'BertModel (pooler={pooler}): max |hidden diff| {diff.max():.2e}')
  assert diff.max() <= 1e-4
  if pooler:
    np.testing.assert_allclose(
        np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4
    )
  assert_round_trip(params, SMALL_CONFIG)


def test_regression_head_gets_default_labels():
  _, params = random_params(num_classes=1)
  # A regression run: the pretrained config's default labels (two) stay.
  hf_config = dict(
      SMALL_CONFIG,
      id2label={'0': 'LABEL_0', '1': 'LABEL_1'},
      num_labels=1,
      problem_type='regression',
  )
  _, config = bert_hf.export_hf(params, hf_config)
  assert config['id2label'] == {'0': 'LABEL_0'}
  assert config['label2id'] == {'LABEL_0': 0}
  assert config['problem_type'] == 'regression'
  assert_round_trip(params, hf_config)


def test_bad_parameters_are_named():
  _, params = random_params()
  missing = jax.tree.map(lambda x: x, params)
  del missing['bert']['encoder']['layer_1']['output']['dense']['bias']
  with pytest.raises(
      ValueError, match=r'missing: bert/encoder/layer_1/output/dense/bias$'
  ):
    bert_hf.export_hf(missing, CLASSIFICATION_CONFIG)
  extra = dict(params, head={'kernel': np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match=r'unexpected: head/kernel$'):
    bert_hf.export_hf(extra, CLASSIFICATION_CONFIG)
  no_pooler = dict(
      encoder_only(params, pooler=False), classifier=params['classifier']
  )
  with pytest.raises(ValueError, match='pooler/dense/bias.*classifies the'):
    bert_hf.export_hf(no_pooler, CLASSIFICATION_CONFIG)
  two_names = dict(CLASSIFICATION_CONFIG, id2label={'0': 'a', '1': 'b'})
  with pytest.raises(ValueError, match='names 2 labels .* has 3 outputs'):
    bert_hf.export_hf(params, two_names)


def test_linear_names_are_transformers_linear_modules():
  _, params = random_params()
  names = bert_hf.FAMILY.hf_linear_names(CLASSIFICATION_CONFIG)
  assert (
      names['bert/encoder/layer_0/attention/query']
      == 'bert.encoder.layer.0.attention.self.query'
  )
  kernels = {k[: -len('/kernel')] for k in flat(params) if k.endswith('kernel')}
  assert set(names) == kernels  # every Dense of a BertClassifier
  hf = transformers.BertForSequenceClassification(
      transformers.BertConfig(**CLASSIFICATION_CONFIG)
  )
  modules = dict(hf.named_modules())
  for path, module in names.items():
    assert isinstance(modules.get(module), torch.nn.Linear), (path, module)
    shape = flat(params)[path + '/kernel'].shape
    assert tuple(modules[module].weight.shape) == shape[::-1], path


def test_a_run_that_did_not_classify_the_pooler_output_does_not_export(
    tmp_path,
):
  """BertForSequenceClassification classifies the pooler output: a run with
  model.pooling 'cls' or 'mean' would export different logits."""
  from tuning.cli import export  # pylint: disable=g-import-not-at-top

  run = {
      'task': 'classification',
      'model': {'name': 'bert', 'pooling': 'mean', 'hf_config': 'unused'},
      'training': {},
  }
  (tmp_path / 'config.json').write_text(json.dumps(run))
  with pytest.raises(ValueError, match=r"model.pooling='mean'.*pooler output"):
    export.load(str(tmp_path), fmt='hf')
