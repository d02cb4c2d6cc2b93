"""Ensembles: fine-tuned runs evaluated together (`mode='ensemble'`).

Each member is a run's work directory; its own `config.json` says how to
build its data and model, so members may differ in seed, hyperparameters,
architecture or tokenizer, as long as they are evaluated on the same
examples in the same order (checked). Three combinations are reported
beside every member:
  mean_probs   the average of the members' softmax probabilities;
  mean_logits  the average of their logits;
  vote         majority vote of their predicted classes (ties go to the
               class with the higher mean probability); its loss is the
               mean-probability loss, since votes are not a distribution.

  python main.py --config=experiments/<exp>.py --config.mode=ensemble \\
      --config.ensemble.members=/runs/seed0,/runs/seed1,/runs/seed2 \\
      --workdir=/runs/ensemble
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from ml_collections import config_dict

from tuning import console
from tuning import evaluation

COMBINATIONS = ('mean_probs', 'mean_logits', 'vote')
SPLITS = ('validation', 'test')


class EnsembleError(ValueError):
  """Members that cannot be combined, worded for the user."""


def member_config(workdir: str) -> config_dict.ConfigDict:
  """The config a member run was trained with (its `config.json`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise EnsembleError(f'{workdir} has no config.json: a member must be the '
                        'work directory of a trained run')
  with open(path, encoding='utf-8') as f:
    config = config_dict.ConfigDict(json.load(f))
  if config.get('stages'):
    raise EnsembleError(f'{workdir} is a multi-stage experiment: name one of '
                        f'its stages ({", ".join(config.stages)}), e.g. '
                        f'{os.path.join(workdir, config.stages[0])}')
  return config


def softmax(logits: np.ndarray) -> np.ndarray:
  return np.exp(evaluation.log_softmax(np.asarray(logits, np.float64)))


def combine(logits: list[np.ndarray], how: str) -> np.ndarray:
  """Class scores of the ensemble (log-probabilities where they exist)."""
  if how == 'mean_logits':
    return np.mean(np.stack(logits), axis=0)
  mean_probs = np.mean(np.stack([softmax(l) for l in logits]), axis=0)
  log_probs = np.log(np.maximum(mean_probs, 1e-30))
  if how == 'mean_probs':
    return log_probs
  if how == 'vote':
    num_classes = logits[0].shape[-1]
    votes = sum(np.eye(num_classes)[l.argmax(-1)] for l in logits)
    return votes + 0.5 * mean_probs  # < 1: only breaks ties
  raise ValueError(f'unknown combination {how!r}: use one of '
                   f'{", ".join(COMBINATIONS)}')


def combination_metrics(logits: list[np.ndarray], labels: np.ndarray,
                        num_classes: int, how: str) -> dict:
  metrics = evaluation.classification_metrics(
      combine(logits, how), labels, num_classes)
  if how == 'vote':  # votes are no distribution: report mean_probs' loss
    metrics['loss'] = evaluation.classification_metrics(
        combine(logits, 'mean_probs'), labels, num_classes)['loss']
  return metrics


class Members:
  """Member runs with their restored parameters; data built once per
  distinct data config."""

  def __init__(self, workdirs, checkpoint: str = 'best'):
    from tuning import train  # pylint: disable=g-import-not-at-top
    from tuning.data.datasets import build_datasets  # pylint: disable=g-import-not-at-top
    if len(workdirs) < 1:
      raise EnsembleError('no members: set config.ensemble.members (or '
                          'soup.members) to run work directories')
    self.workdirs = [os.path.abspath(w) for w in workdirs]
    self.names = _short_names(self.workdirs)
    self.runs, self.params, self.steps = [], [], []
    data_cache = {}
    for workdir in self.workdirs:
      config = member_config(workdir)
      key = json.dumps(config.data.to_dict(), sort_keys=True)
      if key not in data_cache:
        data_cache[key] = build_datasets(config.data)
      run = train.Run(config, workdir, data=data_cache[key])
      try:
        params, step = run.restore_params(checkpoint)
      finally:
        run.checkpoints.close()
      self.runs.append(run)
      self.params.append(params)
      self.steps.append(step)
    classes = {tuple(r.data.class_names) for r in self.runs}
    if len(classes) > 1:
      raise EnsembleError('members were trained on different classes: ' +
                          '; '.join(f'{n}: {r.data.class_names}' for n, r in
                                    zip(self.names, self.runs)))

  def predict(self, index: int, split: str, params=None):
    """Logits and labels of one member on a split (optionally with other
    parameters of the same architecture)."""
    run = self.runs[index]
    params = self.params[index] if params is None else params
    return run.predict(params, split)

  def all_predictions(self, split: str):
    """Every member's logits on a split, and the (shared) labels."""
    logits, labels = [], None
    for i, name in enumerate(self.names):
      member_logits, member_labels = self.predict(i, split)
      if labels is None:
        labels = member_labels
      elif len(member_labels) != len(labels) or \
          not np.array_equal(member_labels, labels):
        raise EnsembleError(
            f'member {name} sees other {split} examples than {self.names[0]} '
            f'({len(member_labels)} vs {len(labels)} examples, or another '
            'order): members must be evaluated on the same data files and '
            'split settings')
      logits.append(member_logits)
    return logits, labels


def _short_names(workdirs: list[str]) -> list[str]:
  """Distinct, short names: the trailing path parts that tell them apart."""
  for depth in range(1, 6):
    names = [os.path.join(*w.split(os.sep)[-depth:]) for w in workdirs]
    if len(set(names)) == len(names):
      return names
  return [f'{n} ({i + 1})' for i, n in enumerate(names)]  # a member twice


def evaluate_ensemble(config, workdir: str) -> dict:
  """`mode='ensemble'`: members and their combinations on validation/test."""
  from tuning import train  # pylint: disable=g-import-not-at-top
  start = time.time()
  members = Members(tuple(config.ensemble.members),
                    config.ensemble.checkpoint)
  num_classes = members.runs[0].num_classes
  results = {'members': {}, 'ensemble': {c: {} for c in COMBINATIONS}}
  for split in SPLITS:
    logits, labels = members.all_predictions(split)
    for name, member_logits, step in zip(members.names, logits,
                                         members.steps):
      results['members'].setdefault(name, {'step': step})[split] = \
          evaluation.classification_metrics(member_logits, labels,
                                            num_classes)
    for how in COMBINATIONS:
      results['ensemble'][how][split] = combination_metrics(
          logits, labels, num_classes, how)
  console.info(ensemble_table(results))
  # The headline (e.g. for a stage table): the mean-probability ensemble.
  results.update(results['ensemble']['mean_probs'])
  results['member_dirs'] = members.workdirs
  results['wall_time_s'] = time.time() - start
  train.write_results(workdir, results)
  return results


def ensemble_table(results: dict, split: str = 'test') -> str:
  rows = [(name, r[split]) for name, r in results['members'].items()]
  rows += [(f'ensemble: {how}', r[split])
           for how, r in results['ensemble'].items()]
  return metrics_table(rows, f'{split} split, {len(results["members"])} '
                       'members and their ensembles:')


def metrics_table(rows, title: str) -> str:
  width = max(12, *(len(name) for name, _ in rows))
  lines = [title, f'  {"model":<{width}} {"accuracy":>9} {"macro-F1":>9} '
           f'{"loss":>8} {"examples":>9}']
  for name, m in rows:
    lines.append(f'  {name:<{width}} {m["accuracy"]:9.4f} '
                 f'{m["macro_f1"]:9.4f} {m["loss"]:8.4f} {m["examples"]:9d}')
  return '\n'.join(lines)

