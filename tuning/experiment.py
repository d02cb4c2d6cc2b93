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

from ml_collections import config_dict

from tuning import config_checks
from tuning import console
from tuning import workdir_lock

MODES = ('train', 'eval', 'ensemble', 'soup')


def stage_config(config, stage: str, workdir: str):
  """The config of one stage: base config + its overrides, '@' resolved."""
  if stage not in config.stage_overrides:
    raise ValueError(f'stage {stage!r} has no entry in config.stage_overrides'
                     f' (have: {", ".join(config.stage_overrides)})')
  result = copy.deepcopy(config.to_dict())
  _merge(result, config.stage_overrides[stage].to_dict())
  result['stages'] = ()
  result['stage_overrides'] = {}
  at = lambda p: os.path.join(workdir, p[1:]) if p and p.startswith('@') \
      else p  # pylint: disable=unnecessary-lambda-assignment
  result['init']['checkpoint'] = at(result['init']['checkpoint'])
  for section, field in (('ensemble', 'members'), ('soup', 'members'),
                         ('distill', 'teacher')):
    if section in result:
      result[section][field] = tuple(at(p) for p in result[section][field])
  return config_dict.ConfigDict(result)


def _merge(base: dict, overrides: dict):
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      _merge(base[key], value)
    else:
      base[key] = value


def write_config(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w',
              encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def run(config, workdir: str) -> dict:
  """Runs the experiment in `workdir` (holding its lock); its results."""
  for checked in [stage_config(config, s, workdir)
                  for s in config.stages] or [config]:
    config_checks.check(checked)  # every stage's values, before any runs
  import jax  # pylint: disable=g-import-not-at-top
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
    results[stage] = _runner(stage_cfg)(stage_cfg,
                                        os.path.join(workdir, stage))
    if 'preempted_at_step' in results[stage]:
      return results[stage]  # rerun the same command to resume
  console.info('\n' + comparison_table(results))
  summary = {'stages': {name: {k: r.get(k) for k in (
      'test', 'validation', 'evaluated_step', 'steps', 'wall_time_s',
      'num_parameters', 'eval_examples_per_s', 'distillation')}
                        for name, r in results.items()}}
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  console.info(f'wrote {os.path.join(workdir, "results.json")}')
  return summary


def _runner(config):
  """The function that runs a config's mode in a work directory."""
  # pylint: disable=g-import-not-at-top
  if config.mode == 'train':
    from tuning.train import train_and_evaluate
    return train_and_evaluate
  if config.mode == 'eval':
    from tuning.train import evaluate_checkpoint
    return evaluate_checkpoint
  if config.mode == 'ensemble':
    from tuning.ensemble import evaluate_ensemble
    return evaluate_ensemble
  if config.mode == 'soup':
    from tuning.soup import make_soup
    return make_soup
  raise ValueError(f'unknown config.mode {config.mode!r}: use one of '
                   f'{", ".join(MODES)}')


def comparison_table(results: dict) -> str:
  """Stages side by side on the test split (and a distillation teacher)."""
  rows = dict(results)
  for r in results.values():
    d = r.get('distillation')
    if d and 'teacher' not in rows:
      rows['teacher'] = {'test': d['teacher_test'],
                         'validation': d['teacher_validation'],
                         'num_parameters': d['teacher_parameters'],
                         'eval_examples_per_s':
                             d['teacher_eval_examples_per_s']}
  lines = ['test split by stage:',
           f'  {"stage":<12} {"accuracy":>9} {"macro-F1":>9} {"loss":>8} '
           f'{"examples":>9} {"val acc":>8} {"parameters":>11} '
           f'{"eval ex/s":>10}']
  for name, r in rows.items():
    if 'test' not in r:
      lines.append(f'  {name:<12} (did not finish)')
      continue
    t = r['test']
    line = (f'  {name:<12} {t["accuracy"]:9.4f} {t["macro_f1"]:9.4f} '
            f'{t["loss"]:8.4f} {t["examples"]:9d}')
    if r.get('validation'):
      line += f' {r["validation"]["accuracy"]:8.4f}'
    if r.get('num_parameters'):
      line += f' {r["num_parameters"]:11,d}'
    if r.get('eval_examples_per_s'):
      line += f' {r["eval_examples_per_s"]:10.1f}'
    lines.append(line)
  return '\n'.join(lines)
