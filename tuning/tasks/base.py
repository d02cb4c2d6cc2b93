"""The task interface: what a kind of problem owns, apart from the model.

A task (chosen by `config.task`) tells the rest of the code:
- which label column the data pipeline reads (`labels`: 'classes',
  'values' or None) and what the model builder needs (`model_dims`);
- the training loss as a (sum, weight) pair: `loss(outputs, batch)` gives
  the sum of the per-example (or per-token) losses and of the train-step
  metrics over the batch's rows, `loss_weight(batch)` what they are divided
  by (rows, or loss-bearing tokens), so that token-level losses are weighted
  by tokens across micro-batches, devices and processes;
- evaluation totals, computed on the device and added up there across
  batches, devices and processes, so that large outputs (e.g. `[batch,
  length, vocab]` logits) never leave the device: `eval_rows(outputs,
  batch)` gives float values per row (already weighted: padding rows carry
  `batch['weight'] = 0`), which are gathered over devices and summed in
  row order, so that the totals do not depend on the device count;
  `eval_counts(outputs, batch)` gives integer totals of the batch (exact in
  any order), summed over devices; `metrics(totals)` turns the host copy
  of both into final metrics;
- optionally which batch columns the model takes (`inputs`);
- optionally `build_data(config, workdir)` (a static method building the
  task's own `Datasets` instead of `build_datasets`) and `host_metrics`
  (metrics computed on the host at each evaluation, e.g. BLEU);
- the default `checkpoint.best_metric`/`best_mode`, the validation scalars
  that are logged and compared, the printed report, the columns of the
  stage table and its part of `results.json`.

Train-step outputs are per-example model outputs (the step applies the
model example by example); everything here is written for a batch of rows.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


class Task:
  """Base class: see the module docstring for the contract."""

  name = ''
  # The label column the data pipeline reads: 'classes' (encoded class
  # ids), 'values' (float targets) or None (no label column).
  labels: str | None = 'classes'
  # Whether each text ends with its tokenizer's end-of-text token.
  append_eos = False
  best_metric = 'loss'
  best_mode = 'min'
  # Stage-table columns: (header, metric key, width, format spec); the
  # validation column likewise.
  table_columns: tuple[tuple[str, str, int, str], ...] = ()
  validation_column: tuple[str, str, int, str] = ('val loss', 'loss', 8, '.4f')

  def __init__(self, config, data):
    self.config = config
    self.data = data

  # The model's inputs from a batch: a function `batch -> {name: array}`
  # (None: every column but labels, weights and indices).
  inputs = None

  # What the model builder receives.
  def model_dims(self) -> dict[str, Any]:
    raise NotImplementedError

  # Training.
  def loss(self, outputs, batch) -> tuple[Any, dict[str, Any]]:
    """(sum of the losses, {metric: sum}) over the batch's rows."""
    raise NotImplementedError

  def loss_weight(self, batch):
    """What the sums of `loss` are divided by (float32 scalar)."""
    raise NotImplementedError

  # Evaluation.
  def eval_rows(self, outputs, batch) -> dict[str, Any]:
    """{name: float array [rows, ...]}: each row's weighted values."""
    raise NotImplementedError

  def eval_counts(self, outputs, batch) -> dict[str, Any]:
    """{name: integer array}: totals over the batch's weighted rows."""
    del outputs, batch
    return {}

  def metrics(self, totals: dict[str, Any]) -> dict[str, Any]:
    """Final metrics (plain Python numbers and lists) from the totals."""
    raise NotImplementedError

  def scalars(self, metrics: dict) -> dict[str, float]:
    """The validation metrics that are logged, checkpointed and compared."""
    raise NotImplementedError

  def summary(self, metrics: dict) -> str:
    """One line, e.g. 'loss 0.1234  accuracy 0.9500'."""
    return '  '.join(f'{k} {v:.4f}' for k, v in self.scalars(metrics).items())

  def report(self, metrics: dict, title: str) -> str:
    """The printed evaluation of a split (the test table)."""
    return f'{title}: {self.summary(metrics)}  ({metrics["examples"]} examples)'

  def samples(self, model, params) -> list[dict[str, Any]]:
    """What the model produces at an evaluation, for the log (e.g. text
    continuations); `params` are plain host parameters. None: nothing."""
    del model, params
    return []

  def host_metrics(
      self, model, params, split: str, step: int | None = None
  ) -> dict[str, Any]:
    """Metrics computed on the host at each evaluation of `split` (e.g.
    BLEU of decoded translations), merged into the device totals' metrics
    by `Run.evaluate`; `params` are plain host parameters, `step` the
    evaluated step (None: unknown). Only called where a task overrides it."""
    del model, params, split, step
    return {}

  def results(self) -> dict[str, Any]:
    """What results.json records about the task besides the metrics."""
    return {'task': self.name}


def token_cross_entropy(logits, targets):
  """(cross-entropy, logsumexp, correct) per position of [..., vocab]
  logits and [...] integer targets, in float32.

  One pass finds each position's largest logit, one sums the exponentials
  (the logsumexp, whose gradient is the softmax); a target is correct when
  its logit is that largest one. That is argmax == target except at an
  exact tie for the top, which then counts as correct, and it spares a
  third pass over the logits: an argmax over a 49k vocabulary took 2.5% of
  SmolLM2's bfloat16 train step on CPU (issue #14).
  """
  logits = logits.astype(jnp.float32)
  top = jax.lax.stop_gradient(logits.max(axis=-1))
  lse = top + jnp.log(jnp.exp(logits - top[..., None]).sum(axis=-1))
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target, lse, (target >= top).astype(jnp.float32)


def token_rows(losses, tokens, correct, weight) -> dict[str, Any]:
  """The token-level tasks' `eval_rows`: per row, the summed loss, token
  count and correct tokens of [B, L] per-token terms, and one example;
  each times the row's weight (0 on padding rows)."""
  w = weight.astype(jnp.float32)
  values = {
      'loss_sum': losses.sum(axis=1),
      'tokens': tokens.astype(jnp.float32).sum(axis=1),
      'correct': correct.sum(axis=1),
      'examples': jnp.ones_like(w),
  }
  return {k: v * w for k, v in values.items()}


def token_metrics(totals: dict[str, Any]) -> dict[str, Any]:
  """Per-token loss, perplexity and token accuracy from the device totals
  `loss_sum`, `tokens`, `correct` and `examples` (the token-level tasks'
  `metrics`)."""
  tokens = float(totals['tokens'])
  loss = float(totals['loss_sum']) / max(tokens, 1.0)
  return {
      'loss': loss,
      'perplexity': math.exp(min(loss, 700.0)),
      'token_accuracy': float(totals['correct']) / max(tokens, 1.0),
      'tokens': int(round(tokens)),
      'examples': int(round(float(totals['examples']))),
  }
