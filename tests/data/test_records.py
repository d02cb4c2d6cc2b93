"""ArrayRecord data sets: conversion, streaming reads, resumable batches."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, read_json, run_main_in_process
from experiments.minilm_sst2 import minilm_source
from tuning.data import records
from tuning.data.datasets import build_datasets
from tuning.data.pipeline import TrainStream
from tuning.data.sources import DataError, read_split_files
from tuning.config.defaults import base_config

WORDS = {
    '0': ['dull', 'bad', 'slow', 'boring'],
    '1': ['great', 'fun', 'good', 'lively'],
}
FILLER = ['the', 'film', 'is', 'a', 'plot', 'and', 'very', 'quite', 'cast']


def text_rows(n, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    label = str(i % 2)
    words = list(rng.choice(FILLER, rng.integers(1, 10))) + [
        rng.choice(WORDS[label])
    ]
    rng.shuffle(words)
    rows.append((' '.join(words), label))
  return rows


def write_tsv(path, rows, header=('sentence', 'label')):
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\t'.join(header) + '\n')
    for row in rows:
      f.write('\t'.join(row) + '\n')
  return str(path)


def data_config(**fields):
  c = base_config().data
  for k, v in fields.items():
    setattr(c, k, v)
  return c


def convert(inputs, out, split='train', fmt='tsv', **kwargs):
  kwargs.setdefault('columns', records.Columns('label', 'sentence'))
  return records.convert(
      inputs if isinstance(inputs, list) else [inputs],
      fmt,
      str(out),
      split,
      progress=False,
      **kwargs,
  )


def assert_tables_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_csv_round_trip_in_shards_equals_the_source_rows(tmp_path):
  path = tmp_path / 'reviews.csv'
  path.write_text(
      'text,label\n'
      '"a, quoted ""comma"" text",pos\n'
      'plain text,neg\n'
      'ünïcödé ✓,pos\n'
      + ''.join(f'row {i},{"pos" if i % 3 else "neg"}\n' for i in range(7))
  )
  entry = records.convert(
      [str(path)],
      'csv',
      str(tmp_path / 'rec'),
      columns=records.Columns('label', 'text'),
      shard_size=3,
      progress=False,
  )
  assert entry['num_examples'] == 10
  assert entry['shards'] == [
      f'train-{i:05d}-of-00004.array_record' for i in range(4)
  ]
  assert sorted(os.listdir(tmp_path / 'rec')) == sorted(
      entry['shards'] + ['metadata.json']
  )
  assert entry['label_counts'] == {'pos': 6, 'neg': 4}
  metadata = records.read_metadata(str(tmp_path / 'rec'))
  split = records.RecordSplit(str(tmp_path / 'rec'), 'train', metadata)
  expected, _ = read_split_files(
      data_config(source='csv', path=str(path), text_column='text')
  )
  got = split.raw_table()
  np.testing.assert_array_equal(got['label'], expected['train']['label'])
  np.testing.assert_array_equal(got['text'], expected['train']['text'])
  # Random access: any positions, across shards, in the order asked.
  np.testing.assert_array_equal(
      split.raw_table([9, 0, 4])['text'], expected['train']['text'][[9, 0, 4]]
  )


def test_jsonl_features_and_text_files_round_trip(tmp_path):
  path = tmp_path / 'points.jsonl'
  rows = [{'a': 0.5 * i, 'b': -i, 'label': i % 3} for i in range(8)]
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n\n')
  convert(
      str(path), tmp_path / 'rec', fmt='jsonl', columns=records.Columns('label')
  )
  metadata = records.read_metadata(str(tmp_path / 'rec'))
  assert metadata['features'] == ['a', 'b']
  table = records.RecordSplit(
      str(tmp_path / 'rec'), 'train', metadata
  ).raw_table()
  expected, _ = read_split_files(data_config(source='jsonl', path=str(path)))
  np.testing.assert_array_equal(table['x'], expected['train']['x'])
  assert list(table['label']) == [r['label'] for r in rows]

  (tmp_path / 'pos.txt').write_text('loved it\n\nwhat fun\n')
  (tmp_path / 'neg.txt').write_text('dull\n__label__pos actually fine\n')
  convert(
      [str(tmp_path / 'pos.txt'), str(tmp_path / 'neg.txt')],
      tmp_path / 'txt',
      fmt='text',
  )
  metadata = records.read_metadata(str(tmp_path / 'txt'))
  table = records.RecordSplit(
      str(tmp_path / 'txt'), 'train', metadata
  ).raw_table()
  assert list(table['text']) == [
      'loved it',
      'what fun',
      'dull',
      'actually fine',
  ]
  assert list(table['label']) == ['pos', 'pos', 'neg', 'pos']


def test_malformed_rows_name_file_and_line_or_are_counted(tmp_path):
  path = tmp_path / 'bad.tsv'
  path.write_text(
      'sentence\tlabel\nfine\t1\nalso fine\t0\ntoo\tmany\t2\n'
      'missing label\t\n'
  )
  with pytest.raises(DataError, match=r'bad\.tsv:4: expected 2 fields'):
    convert(str(path), tmp_path / 'rec')
  assert not os.path.exists(tmp_path / 'rec' / 'metadata.json')
  assert not [f for f in os.listdir(tmp_path / 'rec') if 'tmp' in f]
  entry = convert(str(path), tmp_path / 'rec', on_bad_rows='drop')
  assert entry['num_examples'] == 2
  assert entry['dropped'] == {'malformed row': 1, 'missing label': 1}
  jsonl = tmp_path / 'bad.jsonl'
  jsonl.write_text('{"sentence": "ok", "label": 1}\n[1, 2]\n')
  with pytest.raises(DataError, match=r'bad\.jsonl:2: not a JSON object'):
    convert(str(jsonl), tmp_path / 'rec2', fmt='jsonl')
  with pytest.raises(DataError, match="unsupported format 'parquet'"):
    convert(str(path), tmp_path / 'rec3', fmt='parquet')


def test_to_records_command_reports_one_line_errors(tmp_path):
  path = write_tsv(tmp_path / 'train.tsv', text_rows(20))
  command = [
      sys.executable,
      '-m',
      'tuning.cli.to_records',
      f'--input={path}',
      '--text_column=sentence',
      f'--out={tmp_path / "rec"}',
      '--noprogress',
  ]
  bad = subprocess.run(
      command + ['--format=xlsx'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines() == [
      "error: unsupported format 'xlsx': use one of csv, tsv, jsonl, text "
      '(--format)'
  ]
  ok = subprocess.run(
      command + ['--format=tsv', '--shard_size=8'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert ok.returncode == 0, ok.stderr
  assert 'wrote 20 train examples in 3 shard(s)' in ok.stdout


def sst_like(tmp_path, n_train=300, n_dev=40):
  train = write_tsv(tmp_path / 'train.tsv', text_rows(n_train, 0))
  dev = write_tsv(tmp_path / 'dev.tsv', text_rows(n_dev, 1))
  return train, dev


def config_pair(train, dev, records_dir, **fields):
  memory = data_config(
      source='tsv',
      path=train,
      validation_path=dev,
      text_column='sentence',
      max_length=16,
      length_buckets=(8, 16),
      drop_duplicates=False,
      test_fraction=0.1,
      **fields,
  )
  streamed = data_config(
      source='array_record',
      records_dir=str(records_dir),
      max_length=16,
      length_buckets=(8, 16),
      drop_duplicates=False,
      test_fraction=0.1,
      **fields,
  )
  return memory, streamed


@pytest.mark.parametrize('tokenize', ['on_the_fly', 'conversion'])
def test_stream_over_records_gives_the_in_memory_batches(tmp_path, tokenize):
  train, dev = sst_like(tmp_path)
  rec = tmp_path / 'rec'
  tokenizer = minilm_source() if tokenize == 'conversion' else None
  kwargs = dict(tokenizer=tokenizer, max_length=16, shard_size=64)
  convert(train, rec, **kwargs)
  convert(dev, rec, 'validation', **kwargs)
  fields = dict(max_train_examples=200, tokenizer=minilm_source())
  memory_config, streamed_config = config_pair(train, dev, rec, **fields)
  memory = build_datasets(memory_config)
  streamed = build_datasets(streamed_config)
  assert not isinstance(streamed.train, dict)
  assert len(streamed.train) == 200 == len(memory.train['label'])
  for name in ('validation', 'test'):
    assert_tables_equal(streamed.split(name), memory.split(name))
  assert_tables_equal(
      streamed.first_train_example(), memory.first_train_example()
  )
  assert streamed.class_names == memory.class_names
  a = TrainStream(memory.train, 4, seed=3, buckets=(8, 16))
  b = TrainStream(streamed.train, 4, seed=3, buckets=(8, 16), read_threads=3)
  assert a.steps_per_epoch == b.steps_per_epoch == 50
  lengths = set()
  for _ in range(60):  # into the second epoch
    x, y = next(a), next(b)
    assert_tables_equal(y, x)
    lengths.add(x['input_ids'].shape[1])
  assert lengths == {8, 16}  # the buckets were exercised


def test_whitespace_vocabulary_and_classes_on_records(tmp_path):
  train, dev = sst_like(tmp_path)
  rows = text_rows(60, 2)
  train3 = write_tsv(
      tmp_path / 'three.tsv',
      [(t, '2' if i % 5 == 0 else label) for i, (t, label) in enumerate(rows)],
  )
  rec = tmp_path / 'rec'
  convert(train3, rec)
  convert(dev, rec, 'validation')
  memory_config, streamed_config = config_pair(
      train3, dev, rec, classes=('1', '2'), vocab_size=30, examples_per_class=5
  )
  memory, streamed = (
      build_datasets(memory_config),
      build_datasets(streamed_config),
  )
  assert streamed.class_names == memory.class_names == ['1', '2']
  assert len(streamed.train) == 10
  assert_tables_equal(
      streamed.train.take(np.arange(10)),
      {k: v for k, v in memory.train.items()},
  )
  assert_tables_equal(streamed.validation, memory.validation)
  assert streamed.vocab_size(streamed_config) == 30


def test_stream_state_restores_exactly(tmp_path):
  train, dev = sst_like(tmp_path)
  rec = tmp_path / 'rec'
  convert(train, rec, shard_size=50)
  convert(dev, rec, 'validation')
  _, streamed_config = config_pair(train, dev, rec)
  data = build_datasets(streamed_config)
  stream = TrainStream(data.train, 16, seed=0, buckets=(8, 16))
  for _ in range(20):  # past the first epoch (270 / 16 batches)
    next(stream)
  state = stream.get_state()
  expected = [next(stream) for _ in range(5)]
  fresh = TrainStream(
      build_datasets(streamed_config).train, 16, seed=0, buckets=(8, 16)
  )
  first = next(fresh)
  fresh.set_state(json.loads(json.dumps(state)))  # as a checkpoint holds it
  for want in expected:
    assert_tables_equal(next(fresh), want)
  assert not np.array_equal(first['input_ids'], expected[0]['input_ids'])


def test_records_errors_are_one_line(tmp_path):
  train, dev = sst_like(tmp_path, 50, 10)
  with pytest.raises(DataError, match='records_dir is required'):
    build_datasets(data_config(source='array_record'))
  with pytest.raises(DataError, match='nowhere: directory not found'):
    build_datasets(
        data_config(
            source='array_record', records_dir=str(tmp_path / 'nowhere')
        )
    )
  rec = tmp_path / 'rec'
  convert(train, rec, tokenizer=minilm_source(), max_length=16)
  good = dict(
      source='array_record',
      records_dir=str(rec),
      max_length=16,
      tokenizer=minilm_source(),
  )
  build_datasets(data_config(**good))
  with pytest.raises(
      DataError, match='max_length 16, not config.data.' 'max_length=32'
  ):
    build_datasets(data_config(**dict(good, max_length=32)))
  with pytest.raises(
      DataError,
      match='tokenized at conversion with .*not ' 'config.data.tokenizer=',
  ):
    other = tmp_path / 'other'
    shutil.copytree(
        minilm_source(),
        other,
        ignore=lambda d, names: [
            n for n in names if n.endswith('.safetensors')
        ],
    )
    with open(records.tokenizer_file(str(other)), 'a') as f:
      f.write('\n')
    build_datasets(data_config(**dict(good, tokenizer=str(other))))
  with pytest.raises(DataError, match='has no .validation. split'):
    records.RecordSplit(str(rec), 'validation', records.read_metadata(str(rec)))
  with pytest.raises(DataError, match='converted with tokenizer=None'):
    convert(dev, tmp_path / 'rec4')
    convert(dev, tmp_path / 'rec4', 'validation', tokenizer=minilm_source())
  os.remove(rec / 'train-00000-of-00001.array_record')
  with pytest.raises(DataError, match="no shards for split 'train'"):
    build_datasets(data_config(**good))


def test_main_trains_from_records_like_from_the_files(tmp_path):
  """A run on the converted TSV ends exactly as the run on the TSV."""
  train, dev = sst_like(tmp_path, 200, 40)
  rec = tmp_path / 'rec'
  convert(train, rec)
  convert(dev, rec, 'validation')
  common = [
      '--config=tests/tiny_config.py',
      '--config.model.name=lstm',
      '--config.model.embed_dim=16',
      '--config.model.hidden=(16,)',
      '--config.data.normalize=none',
      '--config.data.max_length=16',
      '--config.data.length_buckets=(8,16)',
      '--config.data.test_fraction=0.1',
      '--config.data.drop_duplicates=False',
      '--config.training.total_steps=12',
      '--config.training.eval_every_steps=6',
      '--config.training.checkpoint_every_steps=6',
  ]
  out = run_main_in_process(
      *common,
      f'--workdir={tmp_path / "streamed"}',
      '--config.data.source=array_record',
      f'--config.data.records_dir={rec}',
  ).stdout
  assert 'records: ' in out and 'tokenized on the fly' in out
  run_main_in_process(
      *common,
      f'--workdir={tmp_path / "memory"}',
      '--config.data.source=tsv',
      f'--config.data.path={train}',
      f'--config.data.validation_path={dev}',
      '--config.data.text_column=sentence',
  )
  streamed = read_json(tmp_path / 'streamed' / 'results.json')['test']
  memory = read_json(tmp_path / 'memory' / 'results.json')['test']
  assert streamed['examples'] == 20
  assert streamed == memory

  missing = run_main_in_process(
      *common,
      f'--workdir={tmp_path / "missing"}',
      '--config.data.source=array_record',
      f'--config.data.records_dir={tmp_path / "none"}',
      check=False,
  )
  assert missing.returncode == 1
  lines = [
      l
      for l in (missing.stdout + missing.stderr).splitlines()
      if 'error' in l.lower()
  ]
  assert len(lines) == 1 and 'directory not found' in lines[0], lines


def test_validation_and_test_conversions_keep_rows_as_given(tmp_path):
  train, _ = sst_like(tmp_path, 60, 0)
  rows = text_rows(6, 1)
  dev = write_tsv(tmp_path / 'dev.tsv', rows + rows[:2] + [text_rows(1)[0]])
  rec = tmp_path / 'rec'
  convert(train, rec)
  assert convert(dev, rec, 'validation')['num_examples'] == 9  # duplicates
  with pytest.raises(
      DataError, match='--drop_duplicates cleans the train ' 'split only'
  ):
    convert(dev, rec, 'test', drop_duplicates=True)
  bad = tmp_path / 'bad.tsv'
  bad.write_text('sentence\tlabel\nfine\t1\nno label\t\n')
  with pytest.raises(
      DataError,
      match=r'bad\.tsv:3: missing label in a test ' 'row .*--on_bad_rows=drop',
  ):
    convert(str(bad), rec, 'test')
  entry = convert(str(bad), rec, 'test', on_bad_rows='drop')
  assert entry['num_examples'] == 1
  assert entry['dropped'] == {'missing label': 1}
  memory, streamed = config_pair(train, dev, rec, on_bad_rows='drop')
  memory.test_path = str(bad)
  a, b = build_datasets(memory), build_datasets(streamed)
  assert len(b.validation['label']) == 9
  assert_tables_equal(b.test, a.test)
  overlap = [l for l in a.log if 'also occur in train' in l]
  assert overlap == [
      '1 of 9 validation rows also occur in train',
      '0 of 1 test rows also occur in train',
  ]
  assert overlap == [l for l in b.log if 'also occur in train' in l]


def test_regression_values_and_unlabelled_text_stream_as_in_memory(tmp_path):
  rng = np.random.default_rng(0)
  rows = [
      (' '.join(rng.choice(FILLER, 4)), f'{v:.3f}') for v in rng.normal(size=80)
  ]
  train = write_tsv(tmp_path / 'train.tsv', rows)
  dev = write_tsv(tmp_path / 'dev.tsv', rows[:10])
  rec = tmp_path / 'rec'
  convert(train, rec, labels='values')
  convert(dev, rec, 'validation', labels='values')
  with pytest.raises(
      DataError, match='converted with labels=.values., not ' '.classes.'
  ):
    convert(dev, rec, 'test')
  for labels in ('values', None):
    memory_config, streamed_config = config_pair(train, dev, rec)
    memory = build_datasets(memory_config, labels=labels)
    streamed = build_datasets(streamed_config, labels=labels)
    for name in ('validation', 'test'):
      assert_tables_equal(streamed.split(name), memory.split(name))
    assert_tables_equal(
        streamed.train.take(np.arange(len(streamed.train))), memory.train
    )
    assert ('label' in memory.train) == (labels == 'values')
  assert memory.train['input_ids'].shape == (72, 16)  # 80 - 8 test
  with pytest.raises(DataError, match='holds labels as values, not classes'):
    build_datasets(streamed_config)
  bad = write_tsv(tmp_path / 'bad.tsv', rows[:3] + [('dull plot', 'n/a')])
  with pytest.raises(
      DataError, match=r"bad\.tsv:5: label 'label' is not a " "number: 'n/a'"
  ):
    convert(bad, tmp_path / 'rec2', labels='values')


def test_to_records_reads_headerless_files_in_another_encoding(tmp_path):
  path = tmp_path / 'latin.tsv'
  path.write_bytes(
      ''.join(f'caf\xe9 {t}\t{label}\n' for t, label in text_rows(12)).encode(
          'latin-1'
      )
  )
  command = [
      sys.executable,
      '-m',
      'tuning.cli.to_records',
      f'--input={path}',
      '--format=tsv',
      '--text_column=text',
      f'--out={tmp_path / "rec"}',
      '--noprogress',
      '--column_names=text,label',
  ]
  bad = subprocess.run(
      command, cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines() == [
      f"error: {path}:1: not valid utf-8 (byte b'\\xe9' at column 4); set "
      "--encoding=latin-1 or the file's own encoding, or convert the file "
      'to UTF-8'
  ]
  ok = subprocess.run(
      command + ['--encoding=latin-1'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert ok.returncode == 0, ok.stderr
  assert 'wrote 12 train examples' in ok.stdout
  metadata = records.read_metadata(str(tmp_path / 'rec'))
  table = records.RecordSplit(
      str(tmp_path / 'rec'), 'train', metadata
  ).raw_table()
  assert table['text'][0].startswith('café ')
  assert list(table['label']) == [label for _, label in text_rows(12)]
  headerless = tmp_path / 'plain.csv'
  headerless.write_text('a film,1\nanother,0\n')
  entry = convert(
      str(headerless),
      tmp_path / 'rec2',
      fmt='csv',
      columns=records.Columns('label', 'text'),
      column_names=('text', 'label'),
  )
  assert entry['num_examples'] == 2
