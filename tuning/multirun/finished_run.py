"""Loading finished runs: their config, data, model and chosen parameters.

Used wherever a trained run is read back: ensembles and soups (members),
distillation (teachers), generation from a causal_lm run (`restore_decoder`,
which reads no data). A run's `config.json` is merged onto today's
`base_config()`, so runs written before a field existed get its default.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from ml_collections import config_dict

from tuning.methods import ema as ema_lib
from tuning.methods import lora as lora_lib
from tuning.engine.checkpoints import load_pretrained_params, run_checkpoint_dir
from tuning.data.datasets import build_datasets
from tuning.config.defaults import merged_onto_defaults
from tuning.models.registry import build_model
from tuning.methods.naming import naming_rules
from tuning.engine.run import Run
from tuning.tasks.registry import task_class


class FinishedRunError(ValueError):
  """Runs that cannot be loaded or combined, worded for the user."""


def run_config(workdir: str) -> config_dict.ConfigDict:
  """The config a run was trained with (its `config.json` on the defaults)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FinishedRunError(
        f'{workdir} has no config.json: a member must be the '
        'work directory of a trained run'
    )
  with open(path, encoding='utf-8') as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise FinishedRunError(
          f'{path} is not valid JSON ({e}): give the work '
          'work directory of a trained run'
      ) from None
  config = merged_onto_defaults(values)
  if config.get('stages'):
    raise FinishedRunError(
        f'{workdir} is a multi-stage experiment: name one of its stages '
        f'({", ".join(config.stages)}), e.g. '
        f'{os.path.join(workdir, config.stages[0])}'
    )
  return config


def _short_names(workdirs: list[str]) -> list[str]:
  """Distinct, short names: the trailing path parts that tell them apart."""
  for depth in range(1, 6):
    names = [os.path.join(*w.split(os.sep)[-depth:]) for w in workdirs]
    if len(set(names)) == len(names):
      return names
  return [f'{n} ({i + 1})' for i, n in enumerate(names)]  # a member twice


class Members:
  """Finished runs with their restored parameters; data built once per
  distinct data config."""

  def __init__(self, workdirs, checkpoint: str = 'best'):
    if len(workdirs) < 1:
      raise FinishedRunError(
          'no members: set config.ensemble.members (or '
          'soup.members) to run work directories'
      )
    self.workdirs = [os.path.abspath(w) for w in workdirs]
    self.names = _short_names(self.workdirs)
    self.runs, self.params, self.steps = [], [], []
    data_cache = {}
    for workdir in self.workdirs:
      config = run_config(workdir)
      key = json.dumps(config.data.to_dict(), sort_keys=True)
      if key not in data_cache:
        data_cache[key] = build_datasets(
            config.data,
            labels=task_class(config.task).labels,
            append_eos=task_class(config.task).append_eos,
        )
      run = Run(config, workdir, data=data_cache[key])
      try:
        params, step = run.restore_params(checkpoint)
      finally:
        run.checkpoints.close()
      self.runs.append(run)
      self.params.append(params)
      self.steps.append(step)
    kinds = {r.task.name for r in self.runs}
    if len(kinds) > 1:
      raise FinishedRunError(
          'members were trained on different tasks: '
          + '; '.join(
              f'{n}: {r.task.name}' for n, r in zip(self.names, self.runs)
          )
      )
    classes = {tuple(r.data.class_names or ()) for r in self.runs}
    if len(classes) > 1:
      raise FinishedRunError(
          'members were trained on different classes: '
          + '; '.join(
              f'{n}: {r.data.class_names}'
              for n, r in zip(self.names, self.runs)
          )
      )

  @property
  def task(self):
    return self.runs[0].task

  def predict(self, index: int, split: str, params=None):
    """Outputs and labels of one member on a split (optionally with other
    parameters of the same architecture)."""
    run = self.runs[index]
    params = self.params[index] if params is None else params
    return run.predict(params, split)

  def all_predictions(self, split: str):
    """Every member's outputs on a split, and the (shared) labels."""
    outputs, labels = [], None
    for i, name in enumerate(self.names):
      member_outputs, member_labels = self.predict(i, split)
      if labels is None:
        labels = member_labels
      elif len(member_labels) != len(labels) or not np.array_equal(
          member_labels, labels
      ):
        raise FinishedRunError(
            f'member {name} sees other {split} examples than {self.names[0]} '
            f'({len(member_labels)} vs {len(labels)} examples, or another '
            'order): members must be evaluated on the same data files and '
            'split settings'
        )
      outputs.append(member_outputs)
    return outputs, labels


def restore_decoder(workdir: str, which='best', dtype: str | None = None):
  """(plain decoder, host params, run config, step) of a finished causal_lm
  run, read without its data: the `which` checkpoint ('best', 'latest' or a
  step), EMA parameters where the run evaluated with them, LoRA adapters
  merged into the kernels. `dtype`: the compute dtype (None: the run's)."""
  config = run_config(workdir)
  if config.get('task') != 'causal_lm':
    raise FinishedRunError(
        f'{workdir} is a {config.get("task")} run: generation needs a '
        'causal_lm run (config.task=causal_lm with a decoder)'
    )
  if run_checkpoint_dir(workdir) is None:
    raise FinishedRunError(
        f'no checkpoint in {os.path.join(workdir, "checkpoints")}: the run '
        'has not saved one yet (train it first, or give another work '
        'directory)'
    )
  task = task_class(config.task)(config, None)
  model = build_model(config.model, dtype or config.dtype, **task.model_dims())
  lora = config.lora if lora_lib.enabled(config.get('lora')) else None
  if lora:
    model = lora_lib.LoraModel(model, lora, naming=naming_rules(config))
  example = np.zeros((1, 8), np.int32)
  shapes = jax.eval_shape(
      lambda: model.init(
          {'params': jax.random.key(0)},
          input_ids=example,
          attention_mask=np.ones_like(example),
          train=False,
      )
  )['params']
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params, report = load_pretrained_params(workdir, target, step=which)
  if config.training.get('evaluate_ema', False):
    params = ema_lib.load_ema_params(
        run_checkpoint_dir(workdir), report['step'], params
    )
  if lora:
    return model.model, lora_lib.merge(params, lora), config, report['step']
  return model, params, config, report['step']
