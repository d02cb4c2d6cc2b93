"""Running an experiment config: one run, or a sequence of stages.

`run(config, workdir)` writes the resolved `config.json`, then trains (or,
with `mode='eval'`, evaluates) in `workdir`. A config with `stages` runs each
stage in `workdir/<stage>` (its config being the base config with
`stage_overrides[<stage>]` applied; '@<stage>' in `init.checkpoint` names
that stage's work directory) and prints one table comparing the stages on
the test split.
"""

from __future__ import annotations

import copy
import json
import os

import jax
from ml_collections import config_dict

from tuning.config import checks as config_checks
from tuning.terminal import console
from tuning.engine import workdir_lock
from tuning.tasks.registry import task_class
from tuning.config.defaults import FIELD, merge_into
from tuning.multirun.ensemble import evaluate_ensemble
from tuning.modes.evaluate import evaluate_checkpoint
from tuning.engine.run_files import write_config
from tuning.multirun.soup import make_soup
from tuning.modes.train import train_and_evaluate

MODES = FIELD['mode'].allowed.choices  # tuning/config/defaults.py


def stage_config(config, stage: str, workdir: str):
  """The config of one stage: base config + its overrides, '@' resolved."""
  if stage not in config.stage_overrides:
    raise ValueError(
        f'stage {stage!r} has no entry in config.stage_overrides'
        f' (have: {", ".join(config.stage_overrides)})'
    )
  result = copy.deepcopy(config.to_dict())
  merge_into(result, config.stage_overrides[stage].to_dict())
  result['stages'] = ()
  result['stage_overrides'] = {}
  at = (
      lambda p: os.path.join(workdir, p[1:]) if p and p.startswith('@') else p
  )  # pylint: disable=unnecessary-lambda-assignment
  result['init']['checkpoint'] = at(result['init']['checkpoint'])
  for section, field in (
      ('ensemble', 'members'),
      ('soup', 'members'),
      ('distill', 'teacher'),
  ):
    if section in result:
      result[section][field] = tuple(at(p) for p in result[section][field])
  if result.get('soup', {}).get('run'):
    result['soup']['run'] = at(result['soup']['run'])
  return config_dict.ConfigDict(result)


def run(config, workdir: str) -> dict:
  """Runs the experiment in `workdir` (holding its lock); its results."""
  for checked in [stage_config(config, s, workdir) for s in config.stages] or [
      config
  ]:
    config_checks.check(checked)  # every stage's values, before any runs
  with workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _run(config, workdir)


def _run(config, workdir: str) -> dict:
  write_config(config, workdir)
  if not config.stages:
    return _runner(config)(config, workdir)
  results = {}
  for stage in config.stages:
    console.info(f'\n=== stage {stage} (workdir {workdir}/{stage}) ===')
    stage_cfg = stage_config(config, stage, workdir)
    write_config(stage_cfg, os.path.join(workdir, stage))
    results[stage] = _runner(stage_cfg)(stage_cfg, os.path.join(workdir, stage))
    if 'preempted_at_step' in results[stage]:
      return results[stage]  # rerun the same command to resume
  console.info('\n' + comparison_table(results))
  summary = {
      'stages': {
          name: {
              k: r.get(k)
              for k in (
                  'task',
                  'test',
                  'validation',
                  'evaluated_step',
                  'steps',
                  'wall_time_s',
                  'num_parameters',
                  'eval_examples_per_s',
                  'distillation',
              )
          }
          for name, r in results.items()
      }
  }
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  console.info(f'wrote {os.path.join(workdir, "results.json")}')
  return summary


RUNNERS = {
    'train': train_and_evaluate,
    'eval': evaluate_checkpoint,
    'ensemble': evaluate_ensemble,
    'soup': make_soup,
}


def _runner(config):
  """The function that runs a config's mode in a work directory."""
  if config.task == 'grpo' and config.mode == 'train':
    from tuning.modes import grpo  # pylint: disable=g-import-not-at-top

    return grpo.train
  if config.mode not in RUNNERS:
    raise ValueError(
        f'unknown config.mode {config.mode!r}: use one of '
        f'{", ".join(MODES)}'
    )
  return RUNNERS[config.mode]


def comparison_table(results: dict) -> str:
  """Stages side by side on the test split (and a distillation teacher)."""
  rows = dict(results)
  for r in results.values():
    d = r.get('distillation')
    if d and 'teacher' not in rows:
      rows['teacher'] = {
          'test': d['teacher_test'],
          'validation': d['teacher_validation'],
          'num_parameters': d['teacher_parameters'],
          'eval_examples_per_s': d['teacher_eval_examples_per_s'],
      }
  first = next(iter(results.values()), {})
  task = task_class(first.get('task') or 'classification')
  val_header, val_key, val_width, val_spec = task.validation_column
  lines = [
      'test split by stage:',
      f'  {"stage":<12}'
      + ''.join(
          f' {header:>{width}}' for header, _, width, _ in task.table_columns
      )
      + f' {val_header:>{val_width}} {"parameters":>11} '
      f'{"eval ex/s":>10}',
  ]
  for name, r in rows.items():
    if 'test' not in r:
      lines.append(f'  {name:<12} (did not finish)')
      continue
    line = f'  {name:<12}' + ''.join(
        f' {r["test"][key]:{width}{spec}}'
        for _, key, width, spec in task.table_columns
    )
    if r.get('validation'):
      line += f' {r["validation"][val_key]:{val_width}{val_spec}}'
    if r.get('num_parameters'):
      line += f' {r["num_parameters"]:11,d}'
    if r.get('eval_examples_per_s'):
      line += f' {r["eval_examples_per_s"]:10.1f}'
    lines.append(line)
  return '\n'.join(lines)
