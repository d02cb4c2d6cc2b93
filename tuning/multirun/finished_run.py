"""Finished runs read back: the one loader of a trained run.

Every reader of a run's work directory goes through here: `mode=eval`
(tuning/modes/evaluate.py), ensembles and soups (their members),
distillation (its teachers), `python -m tuning.generate` and
`python -m tuning.translate`. Reading a run is four steps:
  - its `config.json` merged onto today's `base_config()` (`run_config`),
    so that a run written before a field existed gets its default;
  - a checkpoint chosen: best, latest or a step number (`choose_step`; a
    best/latest checkpoint whose files fail their checksums is moved aside
    and the newest one that reads is taken, as when training resumes);
  - its parameters restored against an explicit target (`restore`), the
    EMA parameters where the run evaluated with them
    (`training.evaluate_ema`);
  - LoRA adapters merged into the kernels where the run trained them
    (`load_model`, for the commands that read a run without its data).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from ml_collections import config_dict

from tuning.methods import ema as ema_lib
from tuning.methods import lora as lora_lib
from tuning.engine.checkpoints import RunCheckpoints, load_pretrained_params
from tuning.data.datasets import build_datasets
from tuning.config.defaults import merged_onto_defaults
from tuning.methods.naming import naming_rules
from tuning.engine.run import Run
from tuning.tasks.registry import task_class

# What chooses a run's checkpoint besides a step number.
WHICH = ('best', 'latest')


class FinishedRunError(ValueError):
  """Runs that cannot be loaded or combined, worded for the user."""


def is_run_workdir(path: str) -> bool:
  """A run's work directory: a folder with a checkpoints/ folder or a
  config.json that a run wrote (with `model` and `training` sections), and
  no params/ folder (a converted model's, whose config.json is Hugging
  Face's)."""
  if not os.path.isdir(path) or os.path.isdir(os.path.join(path, 'params')):
    return False
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return True
  config_file = os.path.join(path, 'config.json')
  if not os.path.isfile(config_file):
    return False
  try:
    with open(config_file, encoding='utf-8') as f:
      values = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(values, dict) and {'model', 'training'} <= set(values)


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
          f'{path} is not valid JSON ({e}): give the '
          'work directory of a trained run'
      ) from None
  config = merged_onto_defaults(values)
  if config.stages:
    raise FinishedRunError(
        f'{workdir} is a multi-stage experiment: name one of its stages '
        f'({", ".join(config.stages)}), e.g. '
        f'{os.path.join(workdir, config.stages[0])}'
    )
  return config


def checkpoint_steps(directory: str) -> list[int]:
  """The steps of the checkpoints in a run's checkpoints/ folder."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _no_checkpoint(directory: str, where: str) -> FinishedRunError:
  again = 'train first' if where == '--workdir' else 'train it first'
  return FinishedRunError(
      f'no checkpoint in {directory}: {again}, or point {where} at a '
      'finished run'
  )


def choose_step(
    checkpoints: RunCheckpoints,
    which,
    setting: str = '--step',
    where: str = '--checkpoint',
) -> int:
  """The step of a run's `which` checkpoint: 'best', 'latest' or a step
  number. `setting` names what chose it and `where` what named the run, for
  the error that says how to fix either."""
  steps = checkpoint_steps(checkpoints.directory)
  if not steps:
    raise _no_checkpoint(checkpoints.directory, where)
  if isinstance(which, str) and which in WHICH:
    return checkpoints.verified_step(which)
  if not isinstance(which, int) or isinstance(which, bool):
    raise FinishedRunError(
        f'{setting}={which!r}: use best, latest or a step number'
    )
  if which not in steps:
    raise FinishedRunError(
        f'no checkpoint step {which} in {checkpoints.directory} (steps '
        f'there: {", ".join(map(str, steps))}): set {setting} to one of '
        'them, best or latest'
    )
  return which


def restore(
    workdir: str,
    config,
    target,
    which='best',
    *,
    checkpoints: RunCheckpoints | None = None,
    setting: str = '--step',
    where: str = '--checkpoint',
):
  """(params, step): the run's `which` checkpoint restored against `target`
  (host arrays of the run's model; a missing or reshaped parameter is an
  error), the EMA parameters where the run evaluated with them. LoRA
  adapters stay as trained (see `load_model`). `checkpoints`: the run's
  own manager (a Run's), else one is opened read-only here."""
  own = checkpoints is None
  if own:
    directory = os.path.join(workdir, 'checkpoints')
    if not checkpoint_steps(directory):
      raise _no_checkpoint(directory, where)
    checkpoints = RunCheckpoints(
        directory,
        config.checkpoint.best_metric or None,
        config.checkpoint.best_mode or None,
        read_only=True,
    )
  try:
    step = choose_step(checkpoints, which, setting, where)
    params, _ = load_pretrained_params(checkpoints.directory, target, step=step)
  finally:
    if own:
      checkpoints.close()
  if config.training.evaluate_ema:
    params = ema_lib.load_ema_params(checkpoints.directory, step, params)
  return params, step


def restore_run(
    run: Run,
    which='best',
    *,
    setting: str = '--step',
    where: str = '--checkpoint',
):
  """(params, step) of a Run's `which` checkpoint, against its model's
  parameters (`restore`)."""
  return restore(
      run.workdir,
      run.config,
      run.init_params(),
      which,
      checkpoints=run.checkpoints,
      setting=setting,
      where=where,
  )


def load_model(
    workdir: str,
    config,
    model,
    init,
    which='best',
    *,
    setting: str = '--step',
    merge_lora: bool = True,
):
  """(plain model, host params, step) of a finished run read without its
  data. `model`: the run's model built from `config` (its `run_config`);
  `init(model, key)`: the model's init call on a small example, which
  gives the restore target's shapes. LoRA adapters (where the run trained
  them) are merged into the kernels and the plain model returned, unless
  `merge_lora` is False (then the params keep `lora_a`/`lora_b`)."""
  lora = config.lora if lora_lib.enabled(config.lora) else None
  if lora:
    model = lora_lib.LoraModel(model, lora, naming=naming_rules(config))
  shapes = jax.eval_shape(lambda: init(model, jax.random.key(0)))['params']
  # np.empty does not touch memory until the restore writes it.
  target = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
  params, step = restore(workdir, config, target, which, setting=setting)
  if lora:
    merged = lora_lib.merge(params, lora) if merge_lora else params
    return model.model, merged, step
  return model, params, step


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

  def __init__(
      self,
      workdirs,
      checkpoint: str = 'best',
      named_by: str = 'config.ensemble.members',
      chosen_by: str = 'config.ensemble.checkpoint',
  ):
    """`checkpoint`: best or latest, in every member; `named_by` and
    `chosen_by`: the config fields that named the runs and chose their
    checkpoint (for errors)."""
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
        params, step = restore_run(
            run, checkpoint, setting=chosen_by, where=named_by
        )
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
