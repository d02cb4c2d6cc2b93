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

import time

import numpy as np

from tuning.terminal import console
from tuning.multirun.finished_run import Members
from tuning.engine.run_files import write_results
from tuning.tasks import classification

COMBINATIONS = ('mean_probs', 'mean_logits', 'vote')
SPLITS = ('validation', 'test')


class EnsembleError(ValueError):
  """Members that cannot be combined, worded for the user."""


def softmax(logits: np.ndarray) -> np.ndarray:
  return np.exp(classification.log_softmax(np.asarray(logits, np.float64)))


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
  raise ValueError(
      f'unknown combination {how!r}: use one of ' f'{", ".join(COMBINATIONS)}'
  )


def combination_metrics(
    logits: list[np.ndarray], labels: np.ndarray, num_classes: int, how: str
) -> dict:
  metrics = classification.metrics_from_logits(
      combine(logits, how), labels, num_classes
  )
  if how == 'vote':  # votes are no distribution: report mean_probs' loss
    metrics['loss'] = classification.metrics_from_logits(
        combine(logits, 'mean_probs'), labels, num_classes
    )['loss']
  return metrics


def evaluate_ensemble(config, workdir: str) -> dict:
  """`mode='ensemble'`: members and their combinations on validation/test."""
  start = time.time()
  members = Members(
      tuple(config.ensemble.members),
      config.ensemble.checkpoint,
      named_by='config.ensemble.members',
      chosen_by='config.ensemble.checkpoint',
  )
  if members.task.name != 'classification':
    raise EnsembleError(
        f'ensembles combine class probabilities; the members'
        f' are {members.task.name} runs (use a soup of them,'
        ' config.mode=soup, to average their weights)'
    )
  num_classes = members.task.num_classes
  results = {'members': {}, 'ensemble': {c: {} for c in COMBINATIONS}}
  for split in SPLITS:
    logits, labels = members.all_predictions(split)
    for name, member_logits, step in zip(members.names, logits, members.steps):
      results['members'].setdefault(name, {'step': step})[split] = (
          classification.metrics_from_logits(member_logits, labels, num_classes)
      )
    for how in COMBINATIONS:
      results['ensemble'][how][split] = combination_metrics(
          logits, labels, num_classes, how
      )
  console.info(ensemble_table(results))
  # The headline (e.g. for a stage table): the mean-probability ensemble.
  results.update(results['ensemble']['mean_probs'])
  results['member_dirs'] = members.workdirs
  results['wall_time_s'] = time.time() - start
  write_results(workdir, results)
  return results


def ensemble_table(results: dict, split: str = 'test') -> str:
  rows = [(name, r[split]) for name, r in results['members'].items()]
  rows += [
      (f'ensemble: {how}', r[split]) for how, r in results['ensemble'].items()
  ]
  return metrics_table(
      rows,
      f'{split} split, {len(results["members"])} '
      'members and their ensembles:',
  )


def metrics_table(
    rows, title: str, columns=classification.TASK.table_columns
) -> str:
  """(name, metrics) rows under the task's columns (tuning/tasks/base.py)."""
  width = max(12, *(len(name) for name, _ in rows))
  lines = [
      title,
      f'  {"model":<{width}}'
      + ''.join(f' {header:>{w}}' for header, _, w, _ in columns),
  ]
  for name, m in rows:
    lines.append(
        f'  {name:<{width}}'
        + ''.join(f' {m[key]:{w}{spec}}' for _, key, w, spec in columns)
    )
  return '\n'.join(lines)
