"""Triple classification by the WN11 protocol: a threshold per relation.

A classifier of triples (source 'triples') scores each one (the true
class's logit minus the false one's); WN11's protocol (Socher et al. 2013)
calls a triple true when its score reaches its relation's threshold, each
threshold the one with the best validation accuracy. Chosen and scored on
the same validation triples, that accuracy flatters the model; so beside it
this reports the 2-fold figure (thresholds chosen on one seeded half of the
validation triples, scored on the other, both ways) and the test
split (given, or carved from the training triples and their corruptions)
with the validation thresholds.
"""

from __future__ import annotations

import numpy as np

from tuning.terminal import console

_HALVES_SEED = 20240601


def relation_thresholds(scores, relations, labels) -> dict[int, float]:
  """{relation: the threshold with the best accuracy on these triples}.

  Candidates are the midpoints between consecutive distinct scores and one
  below the lowest / above the highest; ties keep the lowest threshold.
  """
  scores, relations = np.asarray(scores), np.asarray(relations)
  labels = np.asarray(labels)
  out = {}
  for r in np.unique(relations):
    m = relations == r
    s, y = scores[m], labels[m] == 1
    u = np.unique(s)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    accs = [np.sum((s >= c) == y) for c in cands]
    out[int(r)] = float(cands[int(np.argmax(accs))])
  return out


def threshold_accuracy(scores, relations, labels, thresholds) -> float:
  """Accuracy with per-relation thresholds (a relation without one: 0)."""
  th = np.asarray([thresholds.get(int(r), 0.0) for r in relations])
  predicted = np.asarray(scores) >= th
  return float(np.mean(predicted == (np.asarray(labels) == 1)))


def two_fold_accuracy(scores, relations, labels) -> float:
  """Thresholds chosen on one seeded half, scored on the other, both ways:
  the share of triples classified right."""
  n = len(scores)
  order = np.random.default_rng(_HALVES_SEED).permutation(n)
  halves = (order[: n // 2], order[n // 2 :])
  right = 0.0
  for fit, score_on in (halves, halves[::-1]):
    th = relation_thresholds(scores[fit], relations[fit], labels[fit])
    right += threshold_accuracy(
        scores[score_on], relations[score_on], labels[score_on], th
    ) * len(score_on)
  return right / n


def evaluate(run, params) -> dict:
  """The protocol's figures for a finished run's laid-out `params`."""
  splits = {}
  for name in ('validation', 'test'):
    outputs, labels = run.predict(params, name)
    relations = run.data.raw[name]['triples'][:, 1]
    splits[name] = (outputs[:, 1] - outputs[:, 0], relations, labels)
  s, r, y = splits['validation']
  th = relation_thresholds(s, r, y)
  result = {
      'validation_chosen_on_itself': threshold_accuracy(s, r, y, th),
      'validation_two_fold': two_fold_accuracy(s, r, y),
  }
  result['test'] = threshold_accuracy(*splits['test'], th)
  console.info(
      'triple classification, a threshold per relation chosen on '
      f'validation: validation {result["validation_chosen_on_itself"]:.4f} '
      '(chosen and scored on the same triples), 2-fold '
      f'{result["validation_two_fold"]:.4f} (chosen on one half, scored on '
      'the other)'
      f', test {result["test"]:.4f}'
  )
  return result
