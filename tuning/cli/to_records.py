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

from absl import flags

from tuning.cli import flags as cli_flags
from tuning.data import records
from tuning.data.tables import DataError

PROG = 'python -m tuning.data.to_records'


def define_flags(fv: flags.FlagValues):
  flags.DEFINE_list(
      'input',
      None,
      'Input file(s), comma-separated; '
      'their rows are concatenated in this order.',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'format',
      None,
      'csv | tsv | jsonl | text '
      '(text: one example a line, labelled by the '
      "file's name or a '__label__NAME ' prefix).",
      flag_values=fv,
  )
  flags.DEFINE_string('out', None, 'Output directory.', flag_values=fv)
  flags.DEFINE_string(
      'split', 'train', 'train | validation | test.', flag_values=fv
  )
  flags.DEFINE_string('label_column', 'label', 'Label column.', flag_values=fv)
  flags.DEFINE_enum(
      'labels',
      'classes',
      ['classes', 'values', 'none'],
      'What the label column holds: class labels, '
      'float regression targets, or none (no label '
      'column: text-only data).',
      flag_values=fv,
  )
  flags.DEFINE_list(
      'column_names',
      None,
      'Column names of '
      'headerless CSV/TSV files, comma-separated '
      '(the first line is then data).',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'encoding',
      'utf-8',
      'Encoding of the input ' 'files (e.g. latin-1).',
      flag_values=fv,
  )
  flags.DEFINE_string('text_column', None, 'Text column.', flag_values=fv)
  flags.DEFINE_string(
      'text_pair_column', None, 'Second text column.', flag_values=fv
  )
  flags.DEFINE_list(
      'feature_columns',
      None,
      'Numeric feature '
      'columns (default: every column but the label; '
      'not with --text_column).',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'tokenizer',
      None,
      'Tokenize now with this ' 'pretrained tokenizer (default: keep text).',
      flag_values=fv,
  )
  flags.DEFINE_integer('max_length', 128, 'With --tokenizer.', flag_values=fv)
  flags.DEFINE_integer(
      'shard_size', 100_000, 'Examples per shard.', flag_values=fv
  )
  flags.DEFINE_integer(
      'group_size',
      records.DEFAULT_GROUP_SIZE,
      'Examples per compressed chunk '
      '(a random read decodes a whole chunk): raise for tiny examples, lower '
      'to 1 for large ones.',
      flag_values=fv,
  )
  flags.DEFINE_enum(
      'on_bad_rows',
      'error',
      ['error', 'drop'],
      'Malformed rows: an error naming file:line, ' 'or dropped and counted.',
      flag_values=fv,
  )
  flags.DEFINE_bool(
      'drop_duplicates',
      False,
      'Drop exact duplicate ' 'rows (keeps a 16-byte hash per row in memory).',
      flag_values=fv,
  )
  flags.DEFINE_bool('progress', True, 'Show a progress bar.', flag_values=fv)


def to_records(fv: flags.FlagValues, positional: list[str]):
  """The command, its flags parsed."""
  cli_flags.no_positional(positional)
  for name in ('input', 'format', 'out'):
    if not fv[name].value:
      raise DataError(f'--{name} is required')
  labels = None if fv.labels == 'none' else fv.labels
  entry = records.convert(
      fv.input,
      fv.format,
      fv.out,
      fv.split,
      records.Columns(
          fv.label_column if labels else None,
          fv.text_column,
          fv.text_pair_column,
          tuple(fv.feature_columns) if fv.feature_columns else None,
      ),
      fv.tokenizer,
      fv.max_length,
      fv.shard_size,
      fv.on_bad_rows,
      fv.drop_duplicates,
      fv.progress,
      fv.group_size,
      labels=labels,
      encoding=fv.encoding,
      column_names=fv.column_names,
  )
  dropped = ', '.join(f'{n} {why}' for why, n in entry['dropped'].items())
  print(
      f'wrote {entry["num_examples"]} {fv.split} examples in '
      f'{len(entry["shards"])} shard(s) to {fv.out}'
      f'{"; dropped " + dropped if dropped else ""}'
  )


def main(argv=None) -> int:
  """The command; `argv`: its arguments (None: sys.argv[1:])."""
  return cli_flags.run(PROG, __doc__, define_flags, to_records, argv)


if __name__ == '__main__':
  sys.exit(main())
