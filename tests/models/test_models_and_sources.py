"""The CNN and recurrent models end to end, and TFDS as a data source."""

import os

import pytest

from conftest import ROOT, TINY, read_json, run_main_in_process

SST2 = os.path.join(ROOT, '..', 'shared', 'data', 'sst2')


def test_cnn_on_digit_images(tmp_path):
  run_main_in_process(
      f'--config={TINY}',
      f'--workdir={tmp_path}',
      '--config.model.name=cnn',
      '--config.data.image_shape=(8, 8, 1)',
      '--config.model.channels=(8, 16)',
      '--config.training.total_steps=60',
  )
  results = read_json(str(tmp_path / 'results.json'))
  assert results['test']['accuracy'] > 0.3  # 10 classes: well above chance


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_recurrent_text_classifier_on_sst2(tmp_path, cell):
  if not os.path.isdir(SST2):
    pytest.skip('../shared/data/sst2 is absent')
  out = run_main_in_process(
      f'--config={TINY}',
      f'--workdir={tmp_path}',
      f'--config.model.name={cell}',
      '--config.data.source=tsv',
      f'--config.data.path={SST2}/train.tsv',
      f'--config.data.validation_path={SST2}/dev.tsv',
      '--config.data.text_column=sentence',
      '--config.data.max_train_examples=3000',
      '--config.data.max_validation_examples=300',
      '--config.data.vocab_size=5000',
      '--config.data.max_length=32',
      '--config.data.normalize=none',
      '--config.model.hidden=(32,)',
      '--config.model.embed_dim=32',
      '--config.model.dropout=0.2',
      '--config.training.total_steps=150',
      '--config.training.eval_every_steps=150',
  ).stdout
  assert 'text: tokenizer' in out
  results = read_json(str(tmp_path / 'results.json'))
  assert results['test']['accuracy'] > 0.6  # binary sentiment, above chance


def test_tfds_source_by_name(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  from tuning.data.datasets import build_datasets  # pylint: disable=g-import-not-at-top
  from tuning.config.defaults import base_config  # pylint: disable=g-import-not-at-top

  c = base_config()
  c.data.source = 'tfds'
  c.data.tfds_name = 'mnist'
  c.data.test_split = 'test'
  c.data.normalize = 'minmax'
  with tfds.testing.mock_data(num_examples=60):
    data = build_datasets(c.data)
  assert data.train['x'].shape[1] == 28 * 28
  assert len(data.test['label']) == 60
  assert len(data.train['label']) + len(data.validation['label']) == 60
  c.data.tfds_name = 'no_such_dataset_xyz'
  with pytest.raises(ValueError, match="TFDS dataset 'no_such_dataset_xyz'"):
    build_datasets(c.data)
