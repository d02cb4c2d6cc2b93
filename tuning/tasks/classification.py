"""Classification: class ids as labels, softmax cross-entropy, accuracy,
macro-F1, per-class precision/recall and the confusion matrix.

Evaluation accumulates the loss sum and the confusion matrix on the device;
the metrics follow from those on the host. Ensembles, soups and
distillation, which need class scores, use `Run.predict`'s logits and the
host functions `log_softmax` and `metrics_from_logits` here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from tuning.tasks import base


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels
  )


def loss(logits, batch):
  """(sum of the cross-entropies, {'accuracy': correct}) over the rows.

  A batch mixed by mixup or cutmix (tuning/data/augmentation.py) carries
  `label_mix` and `mix_weight` (lam): each row's loss is then
  lam * CE(label) + (1 - lam) * CE(label_mix), and accuracy counts `label`.
  """
  correct = (logits.argmax(-1) == batch['label']).astype(jnp.float32)
  losses = cross_entropy(logits, batch['label'])
  if 'mix_weight' in batch:
    lam = batch['mix_weight'].astype(jnp.float32)
    losses = lam * losses + (1 - lam) * cross_entropy(
        logits, batch['label_mix']
    )
  return losses.sum(), {'accuracy': correct.sum()}


def rows_weight(batch):
  """Every row weighs one: the loss is a mean over examples."""
  return jnp.float32(batch['label'].shape[0])


def log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def metrics_from_totals(loss_sum: float, confusion: np.ndarray) -> dict:
  """All metrics of one split, as plain Python numbers and lists."""
  confusion = np.asarray(confusion, np.int64)
  num_classes = len(confusion)
  examples = int(confusion.sum())
  true_positive = np.diag(confusion).astype(np.float64)
  predicted = confusion.sum(axis=0)
  actual = confusion.sum(axis=1)
  precision = np.divide(
      true_positive, predicted, out=np.zeros(num_classes), where=predicted > 0
  )
  recall = np.divide(
      true_positive, actual, out=np.zeros(num_classes), where=actual > 0
  )
  denominator = precision + recall
  f1 = np.divide(
      2 * precision * recall,
      denominator,
      out=np.zeros(num_classes),
      where=denominator > 0,
  )
  present = actual > 0  # macro-average over the classes in this split
  return {
      'loss': float(loss_sum) / max(examples, 1),
      'accuracy': float(true_positive.sum() / max(examples, 1)),
      'macro_f1': float(f1[present].mean()) if present.any() else 0.0,
      'precision': precision.tolist(),
      'recall': recall.tolist(),
      'confusion_matrix': confusion.tolist(),
      'examples': examples,
  }


def metrics_from_logits(
    logits: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict:
  """The metrics of host logits (float64), e.g. of an ensemble."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  losses = -log_softmax(logits)[np.arange(len(labels)), labels]
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, logits.argmax(axis=-1)), 1)
  metrics = metrics_from_totals(losses.sum(), confusion)
  metrics['loss'] = float(losses.mean())
  return metrics


def format_metrics(metrics: dict, class_names, title: str) -> str:
  """A printable table: summary line, per-class rows, confusion matrix."""
  lines = [
      f'{title}: loss {metrics["loss"]:.4f}  accuracy '
      f'{metrics["accuracy"]:.4f}  macro-F1 {metrics["macro_f1"]:.4f}  '
      f'({metrics["examples"]} examples)'
  ]
  names = [str(n) for n in class_names]
  width = max(5, *(len(n) for n in names))
  lines.append(f'  {"class":<{width}}  precision  recall  support')
  confusion = metrics['confusion_matrix']
  for i, name in enumerate(names):
    lines.append(
        f'  {name:<{width}}  {metrics["precision"][i]:9.3f}  '
        f'{metrics["recall"][i]:6.3f}  {sum(confusion[i]):7d}'
    )
  lines.append('  confusion matrix (rows: true, columns: predicted)')
  cell = max(4, len(str(max(max(r) for r in confusion))) + 1)
  lines.append(
      '  ' + ' ' * width + ''.join(f'{n[:cell - 1]:>{cell}}' for n in names)
  )
  for name, row in zip(names, confusion):
    lines.append(f'  {name:<{width}}' + ''.join(f'{v:>{cell}d}' for v in row))
  return '\n'.join(lines)


class Classification(base.Task):
  """Class ids in `label`; the model outputs one logit per class."""

  name = 'classification'
  labels = 'classes'
  best_metric = 'accuracy'
  best_mode = 'max'
  table_columns = (
      ('accuracy', 'accuracy', 9, '.4f'),
      ('macro-F1', 'macro_f1', 9, '.4f'),
      ('loss', 'loss', 8, '.4f'),
      ('examples', 'examples', 9, 'd'),
  )
  validation_column = ('val acc', 'accuracy', 8, '.4f')

  def __init__(self, config, data):
    super().__init__(config, data)
    num_classes = config.model.get('num_classes') or data.num_classes
    if num_classes < data.num_classes:
      raise ValueError(
          f'config.model.num_classes={num_classes} is smaller '
          f'than the {data.num_classes} classes in the data'
      )
    self.num_classes = num_classes
    self.class_names = data.class_names

  def model_dims(self):
    return {
        'num_outputs': self.num_classes,
        'vocab_size': self.data.vocab_size(self.config.data),
    }

  loss = staticmethod(loss)
  loss_weight = staticmethod(rows_weight)

  def eval_rows(self, outputs, batch):
    return {'loss': cross_entropy(outputs, batch['label']) * batch['weight']}

  def eval_counts(self, outputs, batch):
    c = self.num_classes
    return {
        'confusion': jnp.zeros((c, c), jnp.int32)
        .at[batch['label'], outputs.argmax(-1)]
        .add(batch['weight'].astype(jnp.int32))
    }

  def metrics(self, totals):
    return metrics_from_totals(totals['loss'], totals['confusion'])

  def scalars(self, metrics):
    return {k: metrics[k] for k in ('loss', 'accuracy', 'macro_f1')}

  def summary(self, metrics):
    return (
        f'loss {metrics["loss"]:.4f}  accuracy {metrics["accuracy"]:.4f}'
        f'  macro-F1 {metrics["macro_f1"]:.4f}'
    )

  def report(self, metrics, title):
    return format_metrics(metrics, self.class_names, title)

  def results(self):
    return {'task': self.name, 'class_names': self.class_names}


TASK = Classification
