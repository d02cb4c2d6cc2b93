"""Data sources, cleaning, train-only preprocessing and batching."""

import gzip

import numpy as np
import pytest

from tuning.data import preprocessing
from tuning.data.datasets import build_datasets
from tuning.data.pipeline import TrainStream, eval_batches, trim_to_bucket
from tuning.data.sources import DataError
from tuning.config.defaults import base_config


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
  np.testing.assert_allclose(
      np.abs(data.train['x']), np.abs(projected), rtol=1e-3, atol=1e-3
  )
  # Test rows are transformed with the training statistics, not their own.
  test_z = (plain.test['x'] - mean) / std
  expected = (test_z - z.mean(0)) @ vt[:5].T
  np.testing.assert_allclose(
      np.abs(data.test['x']), np.abs(expected), rtol=1e-3, atol=1e-3
  )
  assert abs(data.train['x'].mean()) < 1e-5  # centred on train...
  test_only = preprocessing.FeatureTransform.fit(plain.test['x'], 'standard')
  assert not np.allclose(test_only.shift, mean)  # ...which differs from test


def test_minmax_scaling_uses_train_range():
  t = preprocessing.FeatureTransform.fit(np.array([[0.0], [10.0]]), 'minmax')
  np.testing.assert_allclose(
      t.transform(np.array([[5.0], [20.0]])), [[0.5], [2.0]]
  )


def test_splits_are_carved_deterministically_and_disjoint():
  c = base_config()
  a, b = build_datasets(c.data), build_datasets(c.data)
  np.testing.assert_array_equal(a.test['x'], b.test['x'])
  c.seed = 7  # the split does not follow the training seed
  np.testing.assert_array_equal(build_datasets(c.data).test['x'], a.test['x'])
  rows = lambda t: {r.tobytes() for r in t['x']}
  assert not rows(a.train) & rows(a.test)
  assert not rows(a.validation) & rows(a.test)
  assert (
      len(a.train['label']) + len(a.validation['label']) + len(a.test['label'])
      <= 1797
  )


def test_cleaning_reports_what_it_dropped(tmp_path):
  path = write(
      tmp_path / 'd.csv',
      'a,b,label\n1,2,0\n1,2,0\n3,,1\n4,5,\n'
      '6,7,1\n8,nan,0\n9,9,1\n'
      + ''.join(f'{i},{i},{i % 2}\n' for i in range(10, 40)),
  )
  data = build_datasets(csv_config(path))
  log = '\n'.join(data.log)
  assert 'train: dropped 1 rows (missing label)' in log
  assert 'train: dropped 2 rows (missing/NaN feature)' in log
  assert 'train: dropped 1 rows (exact duplicate)' in log
  total = sum(
      len(data.split(s)['label']) for s in ('train', 'validation', 'test')
  )
  assert total == 37 - 4


def test_malformed_row_is_an_error_naming_file_and_line(tmp_path):
  path = write(tmp_path / 'bad.csv', 'a,b,label\n1,2,0\n1,2,3,4\n5,6,1\n')
  with pytest.raises(DataError, match=r'bad.csv:3: expected 3 fields'):
    build_datasets(csv_config(path))
  path = write(tmp_path / 'text.csv', 'a,b,label\n1,2,0\n1,x7,1\n')
  with pytest.raises(
      DataError, match=r"text.csv:3: column 'b' is not a " 'number'
  ):
    build_datasets(csv_config(path))


def test_malformed_rows_can_be_dropped_and_counted(tmp_path):
  rows = ''.join(f'{i},{i + 1},{i % 2}\n' for i in range(40))
  path = write(tmp_path / 'bad.csv', 'a,b,label\n' + rows + '1,2,3,4\n1,x,0\n')
  data = build_datasets(csv_config(path, on_bad_rows='drop'))
  assert 'dropped 2 rows while reading: malformed row' in data.log


def test_jsonl_errors_and_text_columns(tmp_path):
  path = write(
      tmp_path / 'd.jsonl', '{"text": "good film", "label": 1}\n' 'not json\n'
  )
  with pytest.raises(DataError, match=r'd.jsonl:2: not a JSON object'):
    build_datasets(csv_config(path, source='jsonl', text_column='text'))
  lines = ''.join(
      f'{{"text": "word{i} is {"good" if i % 2 else "bad"}",'
      f' "label": "{"pos" if i % 2 else "neg"}"}}\n'
      for i in range(50)
  )
  path = write(tmp_path / 'ok.jsonl', lines)
  data = build_datasets(
      csv_config(path, source='jsonl', text_column='text', max_length=8)
  )
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
  table = {
      'x': np.arange(20, dtype=np.float32)[:, None],
      'label': np.arange(20) % 2,
  }
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
  halves = [
      TrainStream(table, 6, seed=0, process_index=i, process_count=2)
      for i in range(2)
  ]
  whole = TrainStream(table, 6, seed=0)
  for _ in range(3):
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(
        np.concatenate([p['x'] for p in parts]), next(whole)['x']
    )


def test_length_buckets():
  mask = np.zeros((2, 64), np.int32)
  mask[0, :5] = 1
  mask[1, :20] = 1
  batch = {'input_ids': mask * 7, 'attention_mask': mask, 'label': [0, 1]}
  assert trim_to_bucket(batch, (16, 32, 64))['input_ids'].shape == (2, 32)


def sentences(n, offset=0):
  words = ['good', 'bad', 'fine', 'dull', 'fun', 'slow']
  return [(f'{words[i % 6]} film {i + offset}', str(i % 2)) for i in range(n)]


def write_rows(path, rows, header=('text', 'label'), delimiter='\t'):
  lines = [delimiter.join(header)] if header else []
  lines += [delimiter.join(r) for r in rows]
  return write(path, '\n'.join(lines) + '\n')


def text_config(path, **data):
  return csv_config(
      path, **{'source': 'tsv', 'text_column': 'text', 'max_length': 8, **data}
  )


def test_given_test_and_validation_rows_are_kept_as_given(tmp_path):
  train = sentences(40)
  train_path = write_rows(tmp_path / 'train.tsv', train + train[:3])
  test = [train[0], train[0], ('new film', '1'), ('new film', '1'), train[5]]
  test_path = write_rows(tmp_path / 'test.tsv', test)
  val_path = write_rows(tmp_path / 'val.tsv', [train[1], ('other', '0')] * 2)
  data = build_datasets(
      text_config(
          train_path, test_path=str(test_path), validation_path=str(val_path)
      )
  )
  assert len(data.test['label']) == 5  # every repeated line is kept
  assert len(data.validation['label']) == 4
  assert len(data.train['label']) == 40  # train alone is de-duplicated
  assert 'train: dropped 3 rows (exact duplicate)' in data.log
  assert '3 of 5 test rows also occur in train' in data.log
  assert '2 of 4 validation rows also occur in train' in data.log
  assert not [
      l
      for l in data.log
      if l.startswith(('test: dropped', 'validation: dropped'))
  ]


def test_unusable_test_row_names_file_and_line_or_is_counted(tmp_path):
  train_path = write_rows(tmp_path / 'train.tsv', sentences(30))
  test_path = write_rows(
      tmp_path / 'test.tsv', [('fine', '1'), ('nope', ''), ('', '0')]
  )
  with pytest.raises(
      DataError,
      match=r'test.tsv:3: missing label in a test ' r"row .*on_bad_rows='drop'",
  ):
    build_datasets(text_config(train_path, test_path=str(test_path)))
  data = build_datasets(
      text_config(train_path, test_path=str(test_path), on_bad_rows='drop')
  )
  assert 'test: dropped 1 rows while reading: missing label' in data.log
  assert len(data.test['label']) == 2  # the empty text is still an example


def test_headerless_csv_and_tsv_take_column_names(tmp_path):
  rows = sentences(30)
  for name, delimiter in (('d.tsv', '\t'), ('d.csv', ',')):
    path = write_rows(tmp_path / name, rows, header=None, delimiter=delimiter)
    data = build_datasets(
        text_config(path, column_names=('text', 'label'), source=name[-3:])
    )
    assert (
        sum(
            len(data.split(s)['label']) for s in ('train', 'validation', 'test')
        )
        == 30
    )
    assert data.class_names == ['0', '1']
  with pytest.raises(DataError, match=r'd.csv:1: expected 3 fields'):
    build_datasets(
        text_config(path, column_names=('a', 'text', 'label'), source='csv')
    )
  headed = write_rows(tmp_path / 'h.tsv', rows)
  with pytest.raises(
      DataError,
      match=r'h.tsv:1: the first line repeats ' r'config.data.column_names',
  ):
    build_datasets(text_config(headed, column_names=('text', 'label')))


def test_invalid_utf8_names_file_and_line_and_encoding_reads_it(tmp_path):
  path = tmp_path / 'latin.tsv'
  path.write_bytes(
      b'text\tlabel\ngood film\t1\ncaf\xe9 film\t0\n'
      + ''.join(f'film {i}\t{i % 2}\n' for i in range(30)).encode()
  )
  with pytest.raises(
      DataError,
      match=r'latin.tsv:3: not valid utf-8 .*'
      r"config.data.encoding='latin-1'",
  ):
    build_datasets(text_config(path))
  data = build_datasets(
      text_config(path, encoding='latin-1', test_fraction=0.5)
  )
  assert 'café film' in set(data.raw['train']['text']) | set(
      data.raw['test']['text']
  ) | set(data.raw['validation']['text'])


def test_regression_values(tmp_path):
  rows = ''.join(f'{i},{i % 5},{0.5 * i}\n' for i in range(40))
  path = write(tmp_path / 'r.csv', 'a,b,label\n' + rows + '1,2,\n')
  data = build_datasets(csv_config(path), labels='values')
  assert data.num_classes is None and data.labels == 'values'
  for name in ('train', 'validation', 'test'):
    assert data.split(name)['label'].dtype == np.float32
  np.testing.assert_array_equal(
      data.train['label'], 0.5 * data.raw['train']['x'][:, 0]
  )
  assert 'train: dropped 1 rows (missing label)' in data.log
  assert data.log[-1].endswith('; regression values')
  bad = write(tmp_path / 'bad.csv', 'a,b,label\n' + rows + '1,2,high\n')
  with pytest.raises(
      DataError, match=r"bad.csv:42: label 'label' is not a " "number: 'high'"
  ):
    build_datasets(csv_config(bad), labels='values')
  with pytest.raises(DataError, match='examples_per_class needs class labels'):
    build_datasets(csv_config(path, examples_per_class=3), labels='values')
  x = np.random.default_rng(0).normal(size=(30, 2))
  np.savez(tmp_path / 'r.npz', x=x, label=x[:, 0])
  data = build_datasets(
      csv_config(tmp_path / 'r.npz', source='npz'), labels='values'
  )
  assert data.test['label'].dtype == np.float32


def test_text_without_labels(tmp_path):
  path = write(
      tmp_path / 'lm.jsonl',
      ''.join(f'{{"text": "line {i} of the corpus"}}\n' for i in range(30)),
  )
  data = build_datasets(
      csv_config(path, source='jsonl', text_column='text', max_length=8),
      labels=None,
  )
  assert data.num_classes is None and data.class_names is None
  for name in ('train', 'validation', 'test'):
    assert 'label' not in data.split(name)
    assert data.split(name)['input_ids'].shape[1] == 8
  assert data.log[-1].endswith('; no labels')
  batch = next(TrainStream(data.train, 4, seed=0))
  assert batch['input_ids'].shape[0] == 4
  assert sum(len(b['weight']) for b in eval_batches(data.test, 4)) == 8
  headerless = write_rows(
      tmp_path / 'lm.tsv', [(f'line {i}',) for i in range(30)], header=None
  )
  data = build_datasets(
      text_config(headerless, column_names=('text',)), labels=None
  )
  assert len(data.train['input_ids']) == 22  # 30 - 6 test - 2 validation
  # A gzip-compressed plain-text file (e.g. Multi30k's train.en.gz) reads
  # the same rows.
  with open(headerless, 'rb') as f, gzip.open(tmp_path / 'lm.gz', 'wb') as g:
    g.write(f.read())
  compressed = build_datasets(
      text_config(tmp_path / 'lm.gz', column_names=('text',), source='tsv'),
      labels=None,
  )
  for name in ('train', 'validation', 'test'):
    np.testing.assert_array_equal(
        compressed.split(name)['input_ids'], data.split(name)['input_ids']
    )


def test_one_row_parser_for_memory_and_conversion(tmp_path):
  records = pytest.importorskip('tuning.data.records')
  for name, text in (
      ('fields.tsv', 'text\tlabel\nfine\t1\ntoo\tmany\t2\n'),
      ('number.tsv', 'a\tlabel\n1\t1\nx7\t0\n'),
      ('json.jsonl', '{"text": "ok", "label": 1}\n[1, 2]\n'),
      ('absent.jsonl', '{"text": "ok", "label": 1}\n{"text": "no"}\n'),
      ('bytes.tsv', 'text\tlabel\nfine\t1\n\xff\t0\n'),
  ):
    path = tmp_path / name
    if name == 'bytes.tsv':
      path.write_bytes(b'text\tlabel\nfine\t1\n\xff\t0\n')
    else:
      path.write_text(text)
    fmt = name.split('.')[1]
    text_column = (
        'text'
        if 'text' in text.splitlines()[0] or name.startswith(('json', 'absent'))
        else None
    )
    with pytest.raises(DataError) as memory:
      build_datasets(csv_config(path, source=fmt, text_column=text_column))
    with pytest.raises(DataError) as converted:
      records.convert(
          [str(path)],
          fmt,
          str(tmp_path / name.split('.')[0]),
          columns=records.Columns('label', text_column),
          progress=False,
      )
    what = lambda e: str(e.value).split(' (')[0].split('; ')[0]
    assert what(memory).startswith(
        f'{path}:3: ' if fmt == 'tsv' else f'{path}:2: '
    )
    assert what(memory) == what(converted), (
        str(memory.value),
        str(converted.value),
    )
    assert 'config.data.' in str(memory.value)
    assert '--' in str(converted.value)


def test_unusable_rows_of_npz_test_split_are_an_error_or_counted(tmp_path):
  x = np.random.default_rng(0).normal(size=(40, 3))
  np.savez(tmp_path / 'train.npz', x=x, label=(x[:, 0] > 0).astype(int))
  test_x = x[:6].copy()
  test_x[2, 1] = np.nan
  np.savez(
      tmp_path / 'test.npz',
      x=np.concatenate([test_x, test_x]),
      label=np.arange(12) % 2,
  )
  config = csv_config(
      tmp_path / 'train.npz', source='npz', test_path=str(tmp_path / 'test.npz')
  )
  with pytest.raises(
      DataError,
      match=r'the test split has 2 rows with a '
      r'missing/NaN feature \(first: row 2\)',
  ):
    build_datasets(config)
  config.on_bad_rows = 'drop'
  data = build_datasets(config)
  assert 'test: dropped 2 rows (missing/NaN feature)' in data.log
  assert len(data.test['label']) == 10  # duplicates kept
  assert '10 of 10 test rows also occur in train' in data.log


def test_digits_are_read_as_scikit_learn_loads_them():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  from tuning.data import sources  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  table = sources._read_digits()  # pylint: disable=protected-access
  np.testing.assert_array_equal(table['x'], digits.data)
  np.testing.assert_array_equal(table['label'], digits.target)
  assert table['x'].dtype == np.float64 and table['x'].shape == (1797, 64)
  assert table['label'].dtype == digits.target.dtype
