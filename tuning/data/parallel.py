"""Parallel text for sequence-to-sequence tasks: pairs, filters, tokenizer.

Sources (`config.data.source`):

* 'parallel': two line-aligned plain-text files per split, named by a
  pattern with `{lang}` in `config.data.path` (and `validation_path`,
  `test_path`), filled with `config.data.source_lang` and `target_lang`:
  `path='data/train.{lang}.gz', source_lang='de', target_lang='en'` reads
  data/train.de.gz and data/train.en.gz. `.gz` files are read directly;
  files whose line counts differ are an error naming both files and counts.
* 'tsv' / 'jsonl': one file per split with the source and target text in
  `config.data.source_column` / `target_column` (a TSV file's first line is
  its header unless `config.data.column_names` names the columns).

* 'array_record': the splits of `config.data.records_dir`, converted by
  `python -m tuning.data.to_records` from such TSV/JSONL files as raw text
  with the source column as `--text_column` and the target column as
  `--text_pair_column` (`--labels=none`, no `--tokenizer`). The metadata
  names the columns, so `source_column` / `target_column` pick the sides
  (either direction); records without them, or holding token ids, are a
  one-line error. Each split is read whole into memory, then treated
  exactly as the same TSV/JSONL rows: the same pairs give the same
  tokenizer, filters and tables. The converter has already dropped (and
  counted, in metadata.json) training rows with a missing side ('', 'NA',
  'None', ...); that count is logged.

A missing validation split is carved from the training pairs
(`validation_fraction`, a fixed seed); a missing test split is the
validation split (logged). Only TRAINING pairs are filtered, and each
filter's count is logged: empty sides, more than `config.data.max_length`
tokens on a side (end-of-sentence token included), and a token-length
ratio above `config.data.max_length_ratio` (None: no ratio filter).
Validation and test pairs are used as given, whatever their length.

Tokenizer: `config.data.tokenizer` unset or 'train' trains a joint subword
tokenizer (`config.data.subword`: 'bpe' or 'unigram', `vocab_size`) on the
training sources and targets, saves it as WORKDIR/tokenizer.json with the
specials <pad>=0, </s>=1, <unk>=2, <s>=3, and reuses that file when it
exists (resume: never retrained); a path (tokenizer.json or its folder)
uses a pretrained tokenizer. Sources and targets both end with the
end-of-sentence token.

Tables (int32, right-padded): `input_ids`, `attention_mask` (source),
`decoder_input_ids` (the decoder start token, then the target but its
last token: teacher forcing), `target_ids` (the target and EOS),
`target_mask`; `raw[split]` keeps each split's 'source' and 'target'
strings in file order.
"""

from __future__ import annotations

import gzip
import io
import json
import os

import numpy as np

from tuning.data import records
from tuning.data.datasets import Datasets
from tuning.data.tables import DataError

SPECIALS = ('<pad>', '</s>', '<unk>', '<s>')
SOURCES = ('parallel', 'tsv', 'jsonl', 'array_record')
_SPLIT_SEED = 20240601
_TRAIN_SPLITS = ('train', 'validation', 'test')


def open_text(path: str, encoding: str = 'utf-8'):
  """A text file, gzip-compressed when its name ends with .gz."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file (check config.data.path)')
  if path.endswith('.gz'):
    return io.TextIOWrapper(gzip.open(path, 'rb'), encoding=encoding)
  return open(path, encoding=encoding)


def _lines(path: str, encoding: str) -> list[str]:
  with open_text(path, encoding) as f:
    return [line.rstrip('\r\n') for line in f]


def read_line_pair(
    source_path: str, target_path: str, encoding: str = 'utf-8'
) -> tuple[list[str], list[str]]:
  """Two line-aligned files; different line counts are an error."""
  sources, targets = _lines(source_path, encoding), _lines(
      target_path, encoding
  )
  if len(sources) != len(targets):
    raise DataError(
        f'parallel files differ in length: {source_path} has '
        f'{len(sources)} lines, {target_path} has {len(targets)}; they '
        'must be line-aligned'
    )
  return sources, targets


def read_columns(path: str, data_config) -> tuple[list[str], list[str]]:
  """Source and target columns of a TSV or JSON Lines file."""
  src_col, tgt_col = data_config.source_column, data_config.target_column
  jsonl = data_config.source == 'jsonl' or path.endswith(
      ('.jsonl', '.jsonl.gz')
  )
  sources, targets = [], []
  with open_text(path, data_config.encoding) as f:
    if jsonl:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f'{path}:{number}: not JSON ({e.msg})') from None
        for col in (src_col, tgt_col):
          if col not in row:
            raise DataError(
                f'{path}:{number}: no {col!r} field (set '
                'config.data.source_column / target_column)'
            )
        sources.append(str(row[src_col]))
        targets.append(str(row[tgt_col]))
      return sources, targets
    names = data_config.get('column_names')
    lines = iter(f)
    start = 1
    if not names:
      names = next(lines, '').rstrip('\r\n').split('\t')
      start = 2
    names = list(names)
    for col in (src_col, tgt_col):
      if col not in names:
        raise DataError(
            f'{path}: no column {col!r} (columns: {", ".join(names)}); set '
            'config.data.source_column / target_column'
        )
    i, j = names.index(src_col), names.index(tgt_col)
    for number, line in enumerate(lines, start):
      line = line.rstrip('\r\n')
      if not line:
        continue
      cells = line.split('\t')
      if len(cells) != len(names):
        raise DataError(
            f'{path}:{number}: {len(cells)} tab-separated fields, the header '
            f'has {len(names)}'
        )
      sources.append(cells[i])
      targets.append(cells[j])
  return sources, targets


def read_pairs(data_config) -> dict[str, tuple[list[str], list[str]]]:
  """{split: (sources, targets)} for the splits the config names."""
  source = data_config.source
  if source not in SOURCES:
    raise DataError(
        f'config.task=seq2seq reads parallel text from config.data.source '
        f'parallel (two line-aligned files), tsv or jsonl (source and target '
        f'columns) or array_record (records of such columns), not {source!r}'
    )
  if source == 'array_record':
    return read_record_pairs(data_config)
  found = {}
  for split in _TRAIN_SPLITS:
    key = 'path' if split == 'train' else f'{split}_path'
    path = data_config.get(key)
    if not path:
      if split == 'train':
        raise DataError(f'config.data.path is required for source {source!r}')
      continue
    if source == 'parallel':
      if '{lang}' not in path:
        raise DataError(
            f'config.data.{key}={path!r} needs a {{lang}} placeholder (e.g. '
            "'train.{lang}.gz') filled with config.data.source_lang / "
            'target_lang'
        )
      langs = (data_config.get('source_lang'), data_config.get('target_lang'))
      if not all(langs):
        raise DataError(
            "source 'parallel' needs config.data.source_lang and target_lang "
            "(e.g. 'de' and 'en')"
        )
      found[split] = read_line_pair(
          path.format(lang=langs[0]),
          path.format(lang=langs[1]),
          data_config.encoding,
      )
    else:
      found[split] = read_columns(path, data_config)
  return found


def read_record_pairs(
    data_config, log: list[str] | None = None
) -> dict[str, tuple[list[str], list[str]]]:
  """{split: (sources, targets)} of a records directory's raw text
  columns (see the module docstring)."""
  directory = data_config.get('records_dir')
  metadata = records.read_metadata(directory)
  src_col, tgt_col = data_config.source_column, data_config.target_column
  fix = (
      'convert the TSV/JSONL files with python -m tuning.data.to_records '
      f'--text_column={src_col} --text_pair_column={tgt_col} --labels=none '
      '(no --tokenizer), or set config.data.source_column / target_column'
  )
  if metadata.get('tokenizer') or 'text' not in metadata.get('fields', {}):
    raise DataError(
        f'records directory {directory} holds no raw text (token ids or '
        f'features); config.task=seq2seq reads text: {fix}'
    )
  fields = {
      metadata.get('text_column'): 'text',
      metadata.get('text_pair_column'): 'text_pair',
  }
  fields.pop(None, None)
  for col in (src_col, tgt_col):
    if col not in fields:
      raise DataError(
          f'records directory {directory} has no {col!r} column (it has '
          f'{", ".join(map(repr, fields))}): {fix}'
      )
  if src_col == tgt_col:
    raise DataError(
        f'config.data.source_column and target_column are both {src_col!r}'
    )
  found = {}
  for split in _TRAIN_SPLITS:
    if split not in metadata['splits']:
      if split == 'train':
        records.split_paths(directory, split, metadata)  # the error
      continue
    reader = records.RecordSplit(directory, split, metadata)
    rows = list(reader.iter_records())
    found[split] = (
        [str(r[fields[src_col]]) for r in rows],
        [str(r[fields[tgt_col]]) for r in rows],
    )
    dropped = metadata['splits'][split].get('dropped') or {}
    if log is not None and dropped:
      log.append(
          f'{split}: the records conversion dropped '
          + ', '.join(f'{n} {why}' for why, n in dropped.items())
          + f' (metadata.json of {directory})'
      )
  return found


# ------------------------------------------------------------ tokenizer


def train_tokenizer(texts, vocab_size: int, kind: str = 'bpe'):
  """A joint subword tokenizer (Metaspace pre-tokenizer, NFKC) trained on
  `texts`; the specials are SPECIALS (pad 0, eos 1, unk 2, bos 3)."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import normalizers
  from tokenizers import pre_tokenizers
  from tokenizers import trainers

  if kind == 'bpe':
    tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=list(SPECIALS),
        show_progress=False,
    )
  elif kind == 'unigram':
    tokenizer = Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(
        vocab_size=int(vocab_size),
        special_tokens=list(SPECIALS),
        unk_token='<unk>',
        show_progress=False,
    )
  else:
    raise DataError(f"config.data.subword={kind!r}: use 'bpe' or 'unigram'")
  tokenizer.normalizer = normalizers.NFKC()
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def resolve_tokenizer_path(data_config, workdir: str) -> str | None:
  """The tokenizer.json a seq2seq run uses: WORKDIR/tokenizer.json when
  `data.tokenizer` is unset or 'train' (None there: not trained yet)."""
  name = data_config.get('tokenizer')
  if name in (None, '', 'train'):
    path = os.path.join(workdir, 'tokenizer.json')
    return path if os.path.isfile(path) else None
  if os.path.isdir(name):
    name = os.path.join(name, 'tokenizer.json')
  return name


def trains_tokenizer(data_config) -> bool:
  return data_config.get('tokenizer') in (None, '', 'train')


class Specials:
  """The token ids a seq2seq model and decoding need."""

  def __init__(self, tokenizer):
    vocab = tokenizer.get_vocab()

    def find(*names):
      for name in names:
        if name in vocab:
          return vocab[name]
      return None

    self.pad = find('<pad>', '[PAD]', '<PAD>')
    self.eos = find('</s>', '<eos>', '[SEP]', '<|endoftext|>')
    self.bos = find('<s>', '<bos>', '[CLS]')
    self.unk = find('<unk>', '[UNK]')
    if self.pad is None or self.eos is None:
      raise DataError(
          'the tokenizer has no pad or end-of-sentence token (<pad>, </s>): '
          'seq2seq needs both'
      )


def load_or_train_tokenizer(
    data_config, workdir: str, texts_fn, log: list[str]
):
  """(tokenizer, path): WORKDIR/tokenizer.json trained once (reused on
  resume), or the pretrained `data.tokenizer`."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  if data_config.get('tokenizer') == 'whitespace':
    raise DataError(
        'config.task=seq2seq needs a subword tokenizer: set '
        "config.data.tokenizer='train' (trained on the training pairs) or "
        'a tokenizer.json path'
    )
  path = resolve_tokenizer_path(data_config, workdir)
  if path is not None:
    if not os.path.isfile(path):
      raise DataError(
          f'config.data.tokenizer={data_config.tokenizer!r}: no tokenizer '
          "file there; give a tokenizer.json (or its folder), or 'train'"
      )
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    what = 'reused' if trains_tokenizer(data_config) else 'pretrained'
    log.append(
        f'tokenizer: {what} {path} ({tokenizer.get_vocab_size()} tokens)'
    )
    return tokenizer, path
  kind = data_config.subword
  tokenizer = train_tokenizer(texts_fn(), data_config.vocab_size, kind)
  path = os.path.join(workdir, 'tokenizer.json')
  os.makedirs(workdir, exist_ok=True)
  tmp = path + '.tmp'
  tokenizer.save(tmp)
  os.replace(tmp, path)
  log.append(
      f'tokenizer: trained joint {kind} ({tokenizer.get_vocab_size()} '
      f'tokens) on the training pairs, saved {path}'
  )
  return tokenizer, path


def encode(tokenizer, texts: list[str], eos: int) -> list[list[int]]:
  """Token ids of each text, ending with `eos`."""
  # The Metaspace pre-tokenizer adds no special tokens; no post-processor.
  return [
      e.ids + [eos]
      for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)
  ]


# ------------------------------------------------------------ tables


def pair_table(
    sources: list[list[int]], targets: list[list[int]], specials: Specials
) -> dict[str, np.ndarray]:
  """The model-ready columns of token-id pairs (right-padded)."""
  n = len(sources)
  s_width = max([len(s) for s in sources] + [1])
  t_width = max([len(t) for t in targets] + [1])
  input_ids = np.full((n, s_width), specials.pad, np.int32)
  attention_mask = np.zeros((n, s_width), np.int32)
  target_ids = np.full((n, t_width), specials.pad, np.int32)
  target_mask = np.zeros((n, t_width), np.int32)
  decoder_input_ids = np.full((n, t_width), specials.pad, np.int32)
  start = decoder_start(specials)
  for row, (s, t) in enumerate(zip(sources, targets)):
    input_ids[row, : len(s)] = s
    attention_mask[row, : len(s)] = 1
    target_ids[row, : len(t)] = t
    target_mask[row, : len(t)] = 1
    decoder_input_ids[row, 0] = start
    decoder_input_ids[row, 1 : len(t)] = t[:-1]
  return {
      'input_ids': input_ids,
      'attention_mask': attention_mask,
      'decoder_input_ids': decoder_input_ids,
      'target_ids': target_ids,
      'target_mask': target_mask,
  }


def decoder_start(specials: Specials) -> int:
  """The decoder start token: the pad token (Marian's convention)."""
  return specials.pad


def filter_training_pairs(
    sources, targets, texts, max_length: int, max_ratio, log: list[str]
):
  """Indices of the training pairs kept; drops counted per reason."""
  keep = []
  dropped = {'empty side': 0, 'too long': 0, 'length ratio': 0}
  for i, (s, t) in enumerate(zip(sources, targets)):
    if not texts[0][i].strip() or not texts[1][i].strip():
      dropped['empty side'] += 1
    elif len(s) > max_length or len(t) > max_length:
      dropped['too long'] += 1
    elif max_ratio and max(len(s), len(t)) > max_ratio * min(len(s), len(t)):
      dropped['length ratio'] += 1
    else:
      keep.append(i)
  log.append(
      f'train: kept {len(keep)} of {len(sources)} pairs; dropped '
      f'{dropped["empty side"]} with an empty side, {dropped["too long"]} '
      f'longer than {max_length} tokens on a side (config.data.max_length), '
      f'{dropped["length ratio"]} with a token-length ratio above '
      f'{max_ratio} (config.data.max_length_ratio); validation and test '
      'pairs are not filtered'
  )
  return keep, dropped


def build_parallel_datasets(data_config, workdir: str) -> Datasets:
  """Train/validation/test pair tables (see the module docstring)."""
  log: list[str] = []
  if data_config.source == 'array_record':
    pairs = read_record_pairs(data_config, log)
  else:
    pairs = read_pairs(data_config)
  if 'validation' not in pairs:
    src, tgt = pairs['train']
    n = len(src)
    count = int(round(n * data_config.validation_fraction))
    if not 0 < count < n:
      raise DataError(
          f'cannot carve a validation split of fraction '
          f'{data_config.validation_fraction} from {n} training pairs'
      )
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    dev, rest = np.sort(order[:count]), np.sort(order[count:])
    pairs['validation'] = ([src[i] for i in dev], [tgt[i] for i in dev])
    pairs['train'] = ([src[i] for i in rest], [tgt[i] for i in rest])
    log.append(f'validation: carved {count} of {n} training pairs')
  limit = data_config.get('max_validation_examples')
  if limit and limit < len(pairs['validation'][0]):
    n = len(pairs['validation'][0])
    keep = np.sort(
        np.random.default_rng(_SPLIT_SEED + 2).permutation(n)[:limit]
    )
    pairs['validation'] = tuple(
        [side[i] for i in keep] for side in pairs['validation']
    )
    log.append(f'validation: kept {limit} of {n} pairs')
  if 'test' not in pairs:
    pairs['test'] = pairs['validation']
    log.append('test: none given (config.data.test_path); test = validation')
  train_src, train_tgt = pairs['train']
  tokenizer, path = load_or_train_tokenizer(
      data_config, workdir, lambda: train_src + train_tgt, log
  )
  specials = Specials(tokenizer)
  tables, raw = {}, {}
  for split in _TRAIN_SPLITS:
    src, tgt = pairs[split]
    src_ids = encode(tokenizer, src, specials.eos)
    tgt_ids = encode(tokenizer, tgt, specials.eos)
    if split == 'train':
      keep, _ = filter_training_pairs(
          src_ids,
          tgt_ids,
          (src, tgt),
          int(data_config.max_length),
          data_config.get('max_length_ratio'),
          log,
      )
      src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
      src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
      if not keep:
        raise DataError(
            'no training pair is left after the filters: raise '
            'config.data.max_length or max_length_ratio'
        )
    tables[split] = pair_table(src_ids, tgt_ids, specials)
    raw[split] = {'source': list(src), 'target': list(tgt)}
    lengths = tables[split]['attention_mask'].sum(1)
    t_lengths = tables[split]['target_mask'].sum(1)
    log.append(
        f'{split}: {len(src)} pairs; tokens per source mean '
        f'{lengths.mean():.1f} max {lengths.max()}, per target mean '
        f'{t_lengths.mean():.1f} max {t_lengths.max()}'
    )
  data = Datasets(
      tables['train'],
      tables['validation'],
      tables['test'],
      None,
      None,
      log,
      streamed_vocab_size=int(tokenizer.get_vocab_size()),
      raw=raw,
  )
  data.labels = None
  data.tokenizer = tokenizer
  data.tokenizer_path = path
  data.specials = specials
  return data
