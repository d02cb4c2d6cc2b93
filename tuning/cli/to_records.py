"""Converts local files into a sharded ArrayRecord data set, once.

  python -m tuning.data.to_records --input=train.tsv --format=tsv \\
      --text_column=sentence --out=/data/sst2_records [--split=train]
  python -m tuning.data.to_records --input=dev.tsv --format=tsv \\
      --text_column=sentence --out=/data/sst2_records --split=validation

then train with `--config.data.source=array_record
--config.data.records_dir=/data/sst2_records`. With `--tokenizer=PATH`
(a tokenizer.json / vocab.txt or its folder) and `--max_length=N` the text
is tokenized now instead of on the fly while training; every split of one
directory must be converted alike. Headerless CSV/TSV files take their
column names from `--column_names=text,label` (the first line is then data);
files that are not UTF-8 need `--encoding` (e.g. latin-1). `--labels=values`
stores float regression targets, `--labels=none` no label column.
"""

import sys

from absl import app
from absl import flags

from tuning.data import records
from tuning.data.tables import DataError

_INPUT = flags.DEFINE_list(
    'input',
    None,
    'Input file(s), comma-separated; '
    'their rows are concatenated in this order.',
)
_FORMAT = flags.DEFINE_string(
    'format',
    None,
    'csv | tsv | jsonl | text '
    '(text: one example a line, labelled by the '
    "file's name or a '__label__NAME ' prefix).",
)
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_SPLIT = flags.DEFINE_string('split', 'train', 'train | validation | test.')
_LABEL = flags.DEFINE_string('label_column', 'label', 'Label column.')
_LABELS = flags.DEFINE_enum(
    'labels',
    'classes',
    ['classes', 'values', 'none'],
    'What the label column holds: class labels, '
    'float regression targets, or none (no label '
    'column: text-only data).',
)
_COLUMN_NAMES = flags.DEFINE_list(
    'column_names',
    None,
    'Column names of '
    'headerless CSV/TSV files, comma-separated '
    '(the first line is then data).',
)
_ENCODING = flags.DEFINE_string(
    'encoding', 'utf-8', 'Encoding of the input ' 'files (e.g. latin-1).'
)
_TEXT = flags.DEFINE_string('text_column', None, 'Text column.')
_PAIR = flags.DEFINE_string('text_pair_column', None, 'Second text column.')
_FEATURES = flags.DEFINE_list(
    'feature_columns',
    None,
    'Numeric feature '
    'columns (default: every column but the label; '
    'not with --text_column).',
)
_TOKENIZER = flags.DEFINE_string(
    'tokenizer',
    None,
    'Tokenize now with this ' 'pretrained tokenizer (default: keep text).',
)
_MAX_LENGTH = flags.DEFINE_integer('max_length', 128, 'With --tokenizer.')
_SHARD_SIZE = flags.DEFINE_integer('shard_size', 100_000, 'Examples per shard.')
_GROUP_SIZE = flags.DEFINE_integer(
    'group_size',
    records.DEFAULT_GROUP_SIZE,
    'Examples per compressed chunk '
    '(a random read decodes a whole chunk): raise for tiny examples, lower '
    'to 1 for large ones.',
)
_ON_BAD_ROWS = flags.DEFINE_enum(
    'on_bad_rows',
    'error',
    ['error', 'drop'],
    'Malformed rows: an error naming file:line, ' 'or dropped and counted.',
)
_DEDUP = flags.DEFINE_bool(
    'drop_duplicates',
    False,
    'Drop exact duplicate ' 'rows (keeps a 16-byte hash per row in memory).',
)
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show a progress bar.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    for name in ('input', 'format', 'out'):
      if not flags.FLAGS[name].value:
        raise DataError(f'--{name} is required')
    labels = None if _LABELS.value == 'none' else _LABELS.value
    entry = records.convert(
        _INPUT.value,
        _FORMAT.value,
        _OUT.value,
        _SPLIT.value,
        records.Columns(
            _LABEL.value if labels else None,
            _TEXT.value,
            _PAIR.value,
            tuple(_FEATURES.value) if _FEATURES.value else None,
        ),
        _TOKENIZER.value,
        _MAX_LENGTH.value,
        _SHARD_SIZE.value,
        _ON_BAD_ROWS.value,
        _DEDUP.value,
        _PROGRESS.value,
        _GROUP_SIZE.value,
        labels=labels,
        encoding=_ENCODING.value,
        column_names=_COLUMN_NAMES.value,
    )
  except (DataError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  dropped = ', '.join(f'{n} {why}' for why, n in entry['dropped'].items())
  print(
      f'wrote {entry["num_examples"]} {_SPLIT.value} examples in '
      f'{len(entry["shards"])} shard(s) to {_OUT.value}'
      f'{"; dropped " + dropped if dropped else ""}'
  )


if __name__ == '__main__':
  app.run(main)
