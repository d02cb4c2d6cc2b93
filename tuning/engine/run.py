"""`Run`: what training and evaluation of one run share.

The task (`config.task`), the data it reads, the model it tells the
registry to build, how arrays are laid out over devices, the run's
checkpoints, and the compiled evaluation steps. Evaluation is a full,
ordered pass over a split whose task totals are added up on the device
(`evaluate`); `predict` instead brings a split's outputs to the host, for
methods that combine models (ensembles, distillation teachers).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from tuning.terminal import console
from tuning.data import checks as data_checks
from tuning.methods import lora as lora_lib
from tuning.tasks.base import Task
from tuning.tasks.registry import task_class
from tuning.engine.checkpoints import RunCheckpoints
from tuning.data.datasets import Datasets, build_datasets
from tuning.data.pipeline import eval_batches
from tuning.models.registry import build_model
from tuning.methods.naming import naming_rules
from tuning.engine.layouts import local_rows, make_layout
from tuning.engine.train_step import eval_fn, eval_totals_fn, features_of


class Run:
  """Data, task, model, layout and checkpoints of one run."""

  def __init__(self, config, workdir: str, data: Datasets | None = None):
    """`data`: already built datasets for `config.data` (else built here)."""
    self.config = config
    self.workdir = workdir
    task_kind = task_class(config.task)
    # How arrays are laid out over devices (pmap replicas or a mesh).
    self.layout = make_layout(config)
    self.devices = self.layout.devices
    if data is None:
      build_data = getattr(task_kind, 'build_data', None)
      data = (
          build_data(config, workdir)
          if build_data
          else build_datasets(
              config.data,
              labels=task_kind.labels,
              append_eos=task_kind.append_eos,
          )
      )
      for line in data.log:
        console.info(f'data: {line}')
      data_checks.check(data, config)
    self.data = data
    self.task = task_kind(config, data)
    self.task.workdir = workdir
    self.model = build_model(
        config.model, config.dtype, **self.task.model_dims()
    )
    # Head, LoRA-target and layer-index regexes: the user's or the family's.
    self.naming = naming_rules(config)
    self.lora = config.lora if lora_lib.enabled(config.lora) else None
    if self.lora:
      self.model = lora_lib.LoraModel(self.model, self.lora, naming=self.naming)
    self.buckets = tuple(config.data.length_buckets)
    self.best_metric = config.checkpoint.best_metric or self.task.best_metric
    self.best_mode = config.checkpoint.best_mode or self.task.best_mode
    self.checkpoints = RunCheckpoints(
        os.path.join(workdir, 'checkpoints'),
        self.best_metric,
        self.best_mode,
        keep=config.checkpoint.keep,
    )
    self.eval_totals = self.layout.compile_eval_totals(
        eval_totals_fn(
            self.model,
            self.task,
            self.layout.sum_over_devices,
            self.layout.gather_rows,
            inputs_of=self.task.inputs,
        )
    )
    self._eval_step = None  # compiled on the first `predict`
    self._zero_totals = None  # placed on the first `evaluate`

  def init_params(self):
    example = (self.task.inputs or features_of)(self.data.first_train_example())
    key = jax.random.fold_in(jax.random.key(self.config.seed), 2**31 - 1)
    variables = jax.jit(
        lambda k: self.model.init({'params': k}, **example, train=False)
    )(key)
    return jax.tree.map(np.asarray, variables['params'])

  def _placed(self, params):
    """`params` laid out for the steps (host params are placed here)."""
    if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params)):
      return self.layout.place_params(params)
    return params

  def _batches(self, table, progress: str = ''):
    """This process's eval batches of `table`; `progress` names a long
    pass whose progress is printed."""
    n, done, shown = (
        len(table['weight' if 'weight' in table else next(iter(table))]),
        0,
        time.time(),
    )
    for batch in eval_batches(
        table,
        self.config.training.eval_batch_size,
        jax.device_count(),
        self.buckets,
        jax.process_index(),
        jax.process_count(),
    ):
      done += len(batch['weight']) * jax.process_count()
      if progress and time.time() - shown > 30:
        console.info(f'{progress}: {min(done, n)}/{n} examples')
        shown = time.time()
      yield batch

  def evaluate(self, params, split: str, step: int | None = None) -> dict:
    """The task's metrics of a full, ordered pass over one split, its
    totals accumulated on the device, and the task's `host_metrics` (for
    tasks that define them; `step` names the evaluated step there).

    `params`: host (numpy) parameters, or parameters already laid out by
    `self.layout.place_params` (or the train state's, as the loop has them).
    """
    params = self._placed(params)
    totals = None
    for batch in self._batches(self.data.split(split)):
      batch = self.layout.place_batch(batch)
      if (
          self._zero_totals is None
      ):  # totals' shapes: the task's, not the batch's
        self._zero_totals = self.layout.place_totals(
            jax.tree.map(
                lambda s: np.zeros(s.shape, s.dtype),
                jax.eval_shape(self.eval_totals, params, batch),
            )
        )
      totals = self.eval_totals(
          params, batch, self._zero_totals if totals is None else totals
      )
    metrics = self.task.metrics(jax.tree.map(self.layout.fetch, totals))
    if type(self.task).host_metrics is not Task.host_metrics:
      plain = self.plain_model_params(params)
      if plain is not None:
        metrics.update(self.task.host_metrics(*plain, split, step))
    return metrics

  def predict(self, params, split, progress: str = ''):
    """Outputs [N, ...] (e.g. logits) and labels [N] of a split (its name,
    or a table of features and labels) on the host, in order."""
    if self._eval_step is None:
      self._eval_step = self.layout.compile_eval_step(
          eval_fn(self.model, self.task.inputs)
      )
    params = self._placed(params)
    table = self.data.split(split) if isinstance(split, str) else split
    outputs, labels = [], []
    for batch in self._batches(table, progress):
      out = local_rows(self._eval_step(params, self.layout.place_batch(batch)))
      if self.layout.name == 'pmap':  # [devices, rows, ...] -> [rows, ...]
        out = out.reshape((-1,) + out.shape[2:])
      keep = batch['weight'] > 0
      outputs.append(out[keep])
      labels.append(batch['label'][keep])
    outputs, labels = np.concatenate(outputs), np.concatenate(labels)
    if jax.process_count() > 1:  # every process gets every example
      outputs, labels = _all_examples(outputs, labels)
    return outputs, labels

  def plain_model_params(self, params):
    """(the model without adapters, its host parameters) from the loop's
    laid-out parameters (LoRA adapters merged); None with several
    processes, where parameters are not all on this host."""
    if jax.process_count() > 1:
      return None
    if self.layout.name == 'pmap':
      params = jax.tree.map(self.layout.fetch, params)
    params = jax.tree.map(np.asarray, params)
    if self.lora:
      return self.model.model, lora_lib.merge(params, self.lora)
    return self.model, params

  def num_parameters(self, params) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def _all_examples(outputs: np.ndarray, labels: np.ndarray):
  """Gathers every process's evaluated rows (sizes may differ by padding)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  counts = multihost_utils.process_allgather(np.array([len(labels)]))
  width = int(counts.max())
  pad = width - len(labels)
  outputs = np.pad(outputs, ((0, pad),) + ((0, 0),) * (outputs.ndim - 1))
  labels = np.pad(labels, (0, pad))
  all_outputs = multihost_utils.process_allgather(outputs)
  all_labels = multihost_utils.process_allgather(labels)
  n = counts.reshape(-1)
  return (
      np.concatenate([o[:c] for o, c in zip(all_outputs, n)]),
      np.concatenate([l[:c] for l, c in zip(all_labels, n)]),
  )
