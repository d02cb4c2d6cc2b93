"""Classification metrics and their printed table.

Loss, accuracy, macro-F1, per-class precision/recall and the confusion
matrix, computed on the host from the logits of a full pass over a split.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           num_classes: int) -> dict:
  """All metrics of one split, as plain Python numbers and lists."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  loss = float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())
  predictions = logits.argmax(axis=-1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  true_positive = np.diag(confusion).astype(np.float64)
  predicted = confusion.sum(axis=0)
  actual = confusion.sum(axis=1)
  precision = np.divide(true_positive, predicted,
                        out=np.zeros(num_classes), where=predicted > 0)
  recall = np.divide(true_positive, actual, out=np.zeros(num_classes),
                     where=actual > 0)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator,
                 out=np.zeros(num_classes), where=denominator > 0)
  present = actual > 0  # macro-average over the classes in this split
  return {
      'loss': loss,
      'accuracy': float((predictions == labels).mean()),
      'macro_f1': float(f1[present].mean()) if present.any() else 0.0,
      'precision': precision.tolist(),
      'recall': recall.tolist(),
      'confusion_matrix': confusion.tolist(),
      'examples': int(len(labels)),
  }


def format_metrics(metrics: dict, class_names, title: str) -> str:
  """A printable table: summary line, per-class rows, confusion matrix."""
  lines = [f'{title}: loss {metrics["loss"]:.4f}  accuracy '
           f'{metrics["accuracy"]:.4f}  macro-F1 {metrics["macro_f1"]:.4f}  '
           f'({metrics["examples"]} examples)']
  names = [str(n) for n in class_names]
  width = max(5, *(len(n) for n in names))
  lines.append(f'  {"class":<{width}}  precision  recall  support')
  confusion = metrics['confusion_matrix']
  for i, name in enumerate(names):
    lines.append(f'  {name:<{width}}  {metrics["precision"][i]:9.3f}  '
                 f'{metrics["recall"][i]:6.3f}  {sum(confusion[i]):7d}')
  lines.append('  confusion matrix (rows: true, columns: predicted)')
  cell = max(4, len(str(max(max(r) for r in confusion))) + 1)
  lines.append('  ' + ' ' * width + ''.join(f'{n[:cell - 1]:>{cell}}'
                                            for n in names))
  for name, row in zip(names, confusion):
    lines.append(f'  {name:<{width}}' + ''.join(f'{v:>{cell}d}' for v in row))
  return '\n'.join(lines)
