"""The local data of the lm-eval tasks in this folder (the machines are
offline, so no task downloads anything).

Paths in the task YAMLs (`dataset_kwargs: path:`) are relative to the
repository root (the folder above experiments/), so a task reads the same
file from any working directory; an absent file is one line naming it and
where the data come from.

GSM8K: the data folder holds only the training split (7,473 rows), so the
last `GSM8K_HELD_OUT` rows are held out: the tasks evaluate on them (their
`test` split), and experiments/smollm2_gsm8k.py trains only on the rows
before them (`gsm8k_split`).
"""

from __future__ import annotations

import csv
import gzip
import json
import os

REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
GSM8K_HELD_OUT = 500


def resolve(path: str) -> str:
  """`path` (relative to the repository root, or absolute), checked."""
  full = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
  if not os.path.isfile(full):
    raise ValueError(
        f'task data not found: {full} (the tasks read ../shared/data from the '
        'repository root; see ../shared/data/README.md, or give the task a '
        'path: under dataset_kwargs)'
    )
  return full


def _open(path: str):
  if path.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8')
  return open(path, encoding='utf-8')


def gsm8k_split(path: str) -> tuple[list[dict], list[dict]]:
  """GSM8K rows {question, answer}: (training rows, held-out rows)."""
  with _open(resolve(path)) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if len(rows) <= GSM8K_HELD_OUT:
    raise ValueError(
        f'{path} has {len(rows)} rows: holding out the last '
        f'{GSM8K_HELD_OUT} needs more'
    )
  return rows[:-GSM8K_HELD_OUT], rows[-GSM8K_HELD_OUT:]


def gsm8k(path: str, **unused_metadata):
  """The GSM8K task's data: `train` (few-shot examples) and `test` (the
  held-out rows)."""
  import datasets  # pylint: disable=g-import-not-at-top

  train, test = gsm8k_split(path)
  return datasets.DatasetDict(
      train=datasets.Dataset.from_list(train),
      test=datasets.Dataset.from_list(test),
  )


def sentences(path: str, **unused_metadata):
  """A `sentence<TAB>label` file (SST-2) as the `validation` split, labels
  as ints."""
  import datasets  # pylint: disable=g-import-not-at-top

  with _open(resolve(path)) as f:
    rows = [
        {'sentence': r['sentence'], 'label': int(r['label'])}
        for r in csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
    ]
  return datasets.DatasetDict(validation=datasets.Dataset.from_list(rows))
