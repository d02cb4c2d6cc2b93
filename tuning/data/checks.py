"""Checks of built datasets that no reader makes: what cannot train.

`check(data, config)` runs right after the datasets are built, before
a model or checkpoint is touched: a numeric model given text, a
training split of one class, and
feature values that are infinite (NaN rows are dropped while cleaning;
an inf would turn the normalised features and the loss into NaN).
"""

from __future__ import annotations

import numpy as np

NUMERIC_MODELS = ('mlp', 'cnn')


class DataCheckError(ValueError):
  """Data that cannot train a classifier, worded for the user."""


def _where(data_config, split: str) -> str:
  path = (
      data_config.get(f'{split}_path')
      if split != 'train'
      else data_config.get('path')
  )
  return (
      path
      or f'the {split} split of config.data.source='
      f'{data_config.get("source")!r}'
  )


def check(data, config):
  """Raises DataCheckError naming the file, the problem and the fix."""
  data_config = config.data
  text = 'input_ids' in data.validation
  model = config.model.name
  if text and model in NUMERIC_MODELS:
    raise DataCheckError(
        f'config.model.name={model!r} takes numeric features, but the data '
        f'is text (config.data.text_column={data_config.text_column!r}): use '
        'a text model (--config.model.name=lstm, gru or bert) or unset '
        'config.data.text_column'
    )
  if config.task == 'classification' and data.num_classes < 2:
    names = ', '.join(str(c) for c in data.class_names)
    raise DataCheckError(
        f'{_where(data_config, "train")}: the training data has one class '
        f'({names}); a classifier needs at least two (check '
        'config.data.label_column and config.data.classes)'
    )
  for split in ('train', 'validation', 'test'):
    x = (data.raw.get(split) or {}).get('x')
    if x is None or not np.issubdtype(np.asarray(x).dtype, np.number):
      continue
    bad = ~np.isfinite(np.asarray(x, dtype=np.float64))
    if bad.any():
      rows = int(bad.reshape(len(x), -1).any(axis=1).sum())
      raise DataCheckError(
          f'{_where(data_config, split)}: {rows} {split} row(s) hold '
          'infinite feature values (not finite; missing/NaN rows are dropped, '
          'inf are not): fix or remove them'
      )
