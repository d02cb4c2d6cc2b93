"""Metrics against scikit-learn's, and the printed table."""

import numpy as np
from sklearn import metrics as skm

from tuning.tasks import classification


def test_metrics_match_scikit_learn():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 200)
  logits = rng.normal(size=(200, 4)) + 2 * np.eye(4)[labels]
  m = classification.metrics_from_logits(logits, labels, 4)
  predictions = logits.argmax(1)
  assert np.isclose(m['accuracy'], skm.accuracy_score(labels, predictions))
  assert np.isclose(
      m['macro_f1'], skm.f1_score(labels, predictions, average='macro')
  )
  np.testing.assert_allclose(
      m['precision'], skm.precision_score(labels, predictions, average=None)
  )
  np.testing.assert_allclose(
      m['recall'], skm.recall_score(labels, predictions, average=None)
  )
  assert (
      m['confusion_matrix']
      == skm.confusion_matrix(labels, predictions).tolist()
  )
  probabilities = np.exp(classification.log_softmax(logits))
  assert np.isclose(m['loss'], skm.log_loss(labels, probabilities))


def test_table_lists_every_class():
  m = classification.metrics_from_logits(np.eye(3) * 5, np.arange(3), 3)
  table = classification.format_metrics(m, ['cat', 'dog', 'eel'], 'test')
  assert 'accuracy 1.0000' in table
  for name in ('cat', 'dog', 'eel'):
    assert name in table
