"""Data sources, cleaning, train-only preprocessing and batching."""

import numpy as np
import pytest

from tuning.data import preprocessing
from tuning.data.datasets import build_datasets
from tuning.data.pipeline import TrainStream, eval_batches, trim_to_bucket
from tuning.data.sources import DataError
from tuning.defaults import base_config


def csv_config(path, **data):
  c = base_config()
  c.data.source = 'csv'
  c.data.path = str(path)
  for k, v in data.items():
    setattr(c.data, k, v)
  return c.data


def write(path, text):
  path.write_text(text)
  return path


def test_preprocessing_is_fitted_on_train_only():
  c = base_config()
  c.data.normalize = 'standard'
  c.data.pca_components = 5
  data = build_datasets(c.data)
  # Refit by hand on the training rows that build_datasets used.
  raw = base_config()
  raw.data.normalize = None
  plain = build_datasets(raw.data)
  train_x = plain.train['x']
  mean, std = train_x.mean(0), train_x.std(0)
  std = np.where(std > 0, std, 1)
  z = (train_x - mean) / std
  _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
  projected = (z - z.mean(0)) @ vt[:5].T
  # Same subspace, up to the sign of each component.
  np.testing.assert_allclose(np.abs(data.train['x']), np.abs(projected),
                             rtol=1e-3, atol=1e-3)
  # Test rows are transformed with the training statistics, not their own.
  test_z = (plain.test['x'] - mean) / std
  expected = (test_z - z.mean(0)) @ vt[:5].T
  np.testing.assert_allclose(np.abs(data.test['x']), np.abs(expected),
                             rtol=1e-3, atol=1e-3)
  assert abs(data.train['x'].mean()) < 1e-5  # centred on train...
  test_only = preprocessing.FeatureTransform.fit(plain.test['x'], 'standard')
  assert not np.allclose(test_only.shift, mean)  # ...which differs from test


def test_minmax_scaling_uses_train_range():
  t = preprocessing.FeatureTransform.fit(np.array([[0.], [10.]]), 'minmax')
  np.testing.assert_allclose(t.transform(np.array([[5.], [20.]])),
                             [[0.5], [2.0]])


def test_splits_are_carved_deterministically_and_disjoint():
  c = base_config()
  a, b = build_datasets(c.data), build_datasets(c.data)
  np.testing.assert_array_equal(a.test['x'], b.test['x'])
  c.seed = 7  # the split does not follow the training seed
  np.testing.assert_array_equal(build_datasets(c.data).test['x'], a.test['x'])
  rows = lambda t: {r.tobytes() for r in t['x']}
  assert not rows(a.train) & rows(a.test)
  assert not rows(a.validation) & rows(a.test)
  assert len(a.train['label']) + len(a.validation['label']) + len(
      a.test['label']) <= 1797


def test_cleaning_reports_what_it_dropped(tmp_path):
  path = write(tmp_path / 'd.csv', 'a,b,label\n1,2,0\n1,2,0\n3,,1\n4,5,\n'
               '6,7,1\n8,nan,0\n9,9,1\n' + ''.join(
                   f'{i},{i},{i % 2}\n' for i in range(10, 40)))
  data = build_datasets(csv_config(path))
  log = '\n'.join(data.log)
  assert 'train: dropped 1 rows (missing label)' in log
  assert 'train: dropped 2 rows (missing/NaN feature)' in log
  assert 'train: dropped 1 rows (exact duplicate)' in log
  total = sum(len(data.split(s)['label']) for s in ('train', 'validation',
                                                    'test'))
  assert total == 37 - 4


def test_malformed_row_is_an_error_naming_file_and_line(tmp_path):
  path = write(tmp_path / 'bad.csv', 'a,b,label\n1,2,0\n1,2,3,4\n5,6,1\n')
  with pytest.raises(DataError, match=r'bad.csv:3: expected 3 fields'):
    build_datasets(csv_config(path))
  path = write(tmp_path / 'text.csv', 'a,b,label\n1,2,0\n1,x7,1\n')
  with pytest.raises(DataError, match=r"text.csv:3: column 'b' is not a "
                     'number'):
    build_datasets(csv_config(path))


def test_malformed_rows_can_be_dropped_and_counted(tmp_path):
  rows = ''.join(f'{i},{i + 1},{i % 2}\n' for i in range(40))
  path = write(tmp_path / 'bad.csv', 'a,b,label\n' + rows + '1,2,3,4\n1,x,0\n')
  data = build_datasets(csv_config(path, on_bad_rows='drop'))
  assert 'dropped 2 rows while reading: malformed row' in data.log


def test_jsonl_errors_and_text_columns(tmp_path):
  path = write(tmp_path / 'd.jsonl', '{"text": "good film", "label": 1}\n'
               'not json\n')
  with pytest.raises(DataError, match=r'd.jsonl:2: not a JSON object'):
    build_datasets(csv_config(path, source='jsonl', text_column='text'))
  lines = ''.join(f'{{"text": "word{i} is {"good" if i % 2 else "bad"}",'
                  f' "label": "{"pos" if i % 2 else "neg"}"}}\n'
                  for i in range(50))
  path = write(tmp_path / 'ok.jsonl', lines)
  data = build_datasets(csv_config(path, source='jsonl', text_column='text',
                                   max_length=8))
  assert data.class_names == ['neg', 'pos']
  assert data.train['input_ids'].shape[1] == 8
  assert data.train['attention_mask'].sum(1).max() == 3


def test_npz_and_missing_file(tmp_path):
  x = np.random.default_rng(0).normal(size=(50, 3))
  np.savez(tmp_path / 'd.npz', x=x, label=(x[:, 0] > 0).astype(int))
  data = build_datasets(csv_config(tmp_path / 'd.npz', source='npz'))
  assert data.num_classes == 2 and data.train['x'].shape[1] == 3
  with pytest.raises(DataError, match='data file not found'):
    build_datasets(csv_config(tmp_path / 'nope.csv'))


def test_classes_select_merge_and_subsample():
  c = base_config()
  c.data.classes = ((0, 2, 4, 6, 8), (1, 3, 5, 7, 9))
  c.data.class_names = ('even', 'odd')
  c.data.examples_per_class = 5
  data = build_datasets(c.data)
  assert data.class_names == ['even', 'odd']
  assert np.bincount(data.train['label']).tolist() == [5, 5]
  assert len(data.test['label']) == 359  # evaluation keeps every example


def test_train_stream_is_resumable_and_eval_pads_without_loss():
  table = {'x': np.arange(20, dtype=np.float32)[:, None],
           'label': np.arange(20) % 2}
  a = TrainStream(table, 6, seed=0)
  first = [next(a)['x'].ravel().tolist() for _ in range(4)]
  state = a.get_state()
  rest = [next(a)['x'].ravel().tolist() for _ in range(3)]
  b = TrainStream(table, 6, seed=0)
  b.set_state(state)
  assert [next(b)['x'].ravel().tolist() for _ in range(3)] == rest
  assert sorted(sum(first[:3], [])[:18]) != list(range(18))  # shuffled
  batches = list(eval_batches(table, 8, multiple_of=8))
  assert [len(b['label']) for b in batches] == [8, 8, 8]
  weights = np.concatenate([b['weight'] for b in batches])
  assert weights.sum() == 20
  halves = [TrainStream(table, 6, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  whole = TrainStream(table, 6, seed=0)
  for _ in range(3):
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(
        np.concatenate([p['x'] for p in parts]), next(whole)['x'])


def test_length_buckets():
  mask = np.zeros((2, 64), np.int32)
  mask[0, :5] = 1
  mask[1, :20] = 1
  batch = {'input_ids': mask * 7, 'attention_mask': mask, 'label': [0, 1]}
  assert trim_to_bucket(batch, (16, 32, 64))['input_ids'].shape == (2, 32)
