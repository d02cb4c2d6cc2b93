"""Model soups: weight averages of runs fine-tuned from one start.

`mode='soup'` averages the parameters of `soup.members` (run work
directories of the same architecture, e.g. seeds or learning rates from one
pretrained checkpoint; Wortsman et al. 2022):
  uniform  the average of all members;
  greedy   members sorted by validation accuracy, best first; each is kept
           only if adding it does not lower the soup's validation accuracy.
Both are evaluated and shown beside the members; the one `soup.method`
names is written to WORKDIR/checkpoints as an ordinary run checkpoint (with
the first member's config.json), so that

  python main.py --config=<the members' experiment> --config.mode=eval --workdir=WORKDIR
  python main.py --config=... --config.init.checkpoint=WORKDIR ...   # fine-tune it further

evaluate it or start from it, and it can be an ensemble member or a teacher.

With `soup.run` (a run work directory) instead of members, the soup is the
uniform average of that run's last `soup.last_checkpoints` checkpoints
(checkpoint averaging, e.g. for translation): the run must have kept them
(`checkpoint.keep` >= N). Each checkpoint and the average are evaluated
through the run's task; the average is written as above (with the run's
tokenizer.json, when it has one, so that `python -m tuning.translate
--checkpoint=WORKDIR` reads it).
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import numpy as np

from tuning.terminal import console
from tuning.engine.checkpoints import RunCheckpoints
from tuning.data.pipeline import TrainStream
from tuning.multirun.ensemble import EnsembleError, metrics_table
from tuning.multirun.finished_run import (
    FinishedRunError,
    Members,
    checkpoint_steps,
    restore,
    run_config,
)
from tuning.methods.optimizers import build_optimizer, parameter_paths
from tuning.engine.run import Run
from tuning.engine.run_files import write_config, write_results
from tuning.engine.train_step import initial_state

METHODS = ('greedy', 'uniform')


def average(trees: list) -> dict:
  """The element-wise mean of parameter trees (accumulated in float64)."""
  return jax.tree.map(
      lambda *xs: (
          np.sum([np.asarray(x, np.float64) for x in xs], axis=0) / len(xs)
      ).astype(np.asarray(xs[0]).dtype),
      *trees,
  )


def check_same_architecture(names: list[str], trees: list):
  """Raises EnsembleError naming the first parameter members disagree on."""
  reference = parameter_paths(trees[0])
  for name, tree in zip(names[1:], trees[1:]):
    paths = parameter_paths(tree)
    for path in sorted(set(reference) | set(paths)):
      if reference.get(path) != paths.get(path):
        raise EnsembleError(
            f'soup members must share an architecture: parameter {path} is '
            f'{reference.get(path) or "absent"} in {names[0]} but '
            f'{paths.get(path) or "absent"} in {name} (average runs '
            'fine-tuned from the same model, or use mode=ensemble)'
        )


def greedy_order(accuracies: list[float]) -> list[int]:
  """Member indices by validation accuracy, best first (stable)."""
  return sorted(range(len(accuracies)), key=lambda i: -accuracies[i])


def make_soup(config, workdir: str) -> dict:
  """`mode='soup'`: averages the members (or the last checkpoints of
  `soup.run`) and writes the chosen soup."""
  if config.soup.run:
    return average_last_checkpoints(config, workdir)
  start = time.time()
  if config.soup.method not in METHODS:
    raise ValueError(
        f'config.soup.method={config.soup.method!r}: use '
        f'{" or ".join(METHODS)}'
    )
  workdir = os.path.abspath(workdir)
  if workdir in [os.path.abspath(m) for m in config.soup.members]:
    raise ValueError(
        f'the soup work directory {workdir} is one of its '
        'members: give the soup a directory of its own'
    )
  members = Members(
      tuple(config.soup.members),
      config.soup.checkpoint,
      named_by='config.soup.members',
      chosen_by='config.soup.checkpoint',
  )
  check_same_architecture(members.names, members.params)
  for name, run in zip(members.names, members.runs):
    if run.lora:
      raise EnsembleError(
          f'member {name} trained LoRA adapters: averaging A and B factors '
          'is not averaging the weights; soup runs without LoRA (or '
          'fine-tune from their merged checkpoints first)'
      )
  run = members.runs[0]
  metric, sign = run.best_metric, 1.0 if run.best_mode == 'max' else -1.0

  def metrics(params, split):
    return run.evaluate(params, split)

  member_val = [metrics(p, 'validation') for p in members.params]
  # Greedy compares the task's checkpoint metric (classification: accuracy).
  accuracies = [sign * m[metric] for m in member_val]
  uniform = average(members.params)
  order = greedy_order(accuracies)
  chosen = order[:1]  # the best member; its accuracy is known
  greedy, greedy_accuracy = members.params[order[0]], accuracies[order[0]]
  for i in order[1:]:
    candidate = average([members.params[j] for j in chosen + [i]])
    accuracy = sign * metrics(candidate, 'validation')[metric]
    if accuracy >= greedy_accuracy:
      chosen.append(i)
      greedy, greedy_accuracy = candidate, accuracy
  console.info(
      'soup: greedy kept '
      + ', '.join(
          f'{members.names[i]} (val {metric} {sign * accuracies[i]:.4f})'
          for i in chosen
      )
      + f' of {len(members.names)} members'
  )

  results = {
      'members': {},
      'soups': {},
      'greedy_members': [members.names[i] for i in chosen],
      'method': config.soup.method,
  }
  for name, params, val, step in zip(
      members.names, members.params, member_val, members.steps
  ):
    results['members'][name] = {
        'step': step,
        'validation': val,
        'test': metrics(params, 'test'),
    }
  for method, params in (('uniform', uniform), ('greedy', greedy)):
    results['soups'][method] = {
        s: metrics(params, s) for s in ('validation', 'test')
    }
  rows = [(n, r['test']) for n, r in results['members'].items()]
  rows += [(f'soup: {m}', r['test']) for m, r in results['soups'].items()]
  console.info(
      metrics_table(
          rows,
          f'test split, {len(members.names)} '
          'members and their weight averages:',
          run.task.table_columns,
      )
  )

  soup = uniform if config.soup.method == 'uniform' else greedy
  write_checkpoint(
      members.runs[0],
      soup,
      workdir,
      results['soups'][config.soup.method]['validation'],
  )
  results.update(results['soups'][config.soup.method])  # the headline
  results.update(run.task.results())
  results['checkpoint'] = os.path.join(workdir, 'checkpoints')
  results['wall_time_s'] = time.time() - start
  write_results(workdir, results)
  console.info(
      f'soup: wrote the {config.soup.method} soup to '
      f'{results["checkpoint"]} (evaluate it with --config.mode=eval '
      f'--workdir={workdir}, or start from it with '
      f'--config.init.checkpoint={workdir})'
  )
  return results


def write_checkpoint(run, params, workdir: str, validation: dict):
  """Saves `params` as step 0 of an ordinary run checkpoint in `workdir`
  (fresh optimizer state, the data stream at its start), with the member's
  config.json beside it."""
  config = run.config
  directory = os.path.join(workdir, 'checkpoints')
  if jax.process_index() == 0 and os.path.exists(directory):
    shutil.rmtree(directory)  # an earlier soup of this work directory
  tx, _ = build_optimizer(
      config.optimizer, params, 1, 0, None, naming=run.naming
  )
  state = initial_state(
      params,
      tx,
      ema=config.training.ema_decay is not None,
      count_skipped=config.training.on_nonfinite == 'skip',
  )
  stream = TrainStream(
      run.data.train,
      config.training.batch_size,
      config.seed,
      tuple(config.data.length_buckets),
  )
  checkpoints = RunCheckpoints(directory, run.best_metric, run.best_mode)
  try:
    checkpoints.save(
        0, state, stream.get_state(), metrics=run.task.scalars(validation)
    )
    checkpoints.wait()
  finally:
    checkpoints.close()
  write_config(config, workdir)


def last_steps(checkpoint_dir: str, count: int, keep: int) -> list[int]:
  """The `count` latest checkpoint steps in a run's checkpoints folder;
  FinishedRunError unless the run kept that many (`keep` latest)."""
  steps = checkpoint_steps(checkpoint_dir)
  if count > keep:
    raise FinishedRunError(
        f'config.soup.last_checkpoints={count} but the run kept only its '
        f'latest {keep} checkpoint{"s" * (keep != 1)} (its checkpoint.keep='
        f'{keep}): train it with --config.checkpoint.keep={count} or more, '
        f'or average fewer'
    )
  if len(steps) < count:
    raise FinishedRunError(
        f'config.soup.last_checkpoints={count} but {checkpoint_dir} holds '
        f'{len(steps)} checkpoint{"s" * (len(steps) != 1)} (steps: '
        f'{", ".join(map(str, steps)) or "none"}): average fewer, or '
        'checkpoint more often (training.checkpoint_every_steps)'
    )
  return steps[-count:]


def average_last_checkpoints(config, workdir: str) -> dict:
  """`mode='soup'` with `soup.run`: the mean of its last N checkpoints."""
  start = time.time()
  source = os.path.abspath(config.soup.run)
  count = config.soup.last_checkpoints
  if not isinstance(count, int) or count < 1:
    raise ValueError(
        f'config.soup.last_checkpoints={count!r}: set how many of the '
        "run's latest checkpoints to average, e.g. 5"
    )
  workdir = os.path.abspath(workdir)
  if workdir == source:
    raise ValueError(
        f'the soup work directory {workdir} is the run it averages: give '
        'the soup a directory of its own'
    )
  member_config = run_config(source)
  if member_config.lora.rank:
    raise EnsembleError(
        f'{source} trained LoRA adapters: averaging A and B factors is not '
        'averaging the weights; average runs without LoRA'
    )
  steps = last_steps(
      os.path.join(source, 'checkpoints'),
      count,
      member_config.checkpoint.keep,
  )
  run = Run(member_config, source)
  try:
    target = run.init_params()
    trees = [
        restore(
            source,
            member_config,
            target,
            step,
            checkpoints=run.checkpoints,
            setting='config.soup.last_checkpoints',
            where='config.soup.run',
        )[0]
        for step in steps
    ]
  finally:
    run.checkpoints.close()
  averaged = average(trees)
  results = {
      'run': source,
      'averaged_steps': steps,
      'checkpoints': {},
      'method': f'last {count} checkpoints',
  }
  for step, params in zip(steps, trees):
    results['checkpoints'][str(step)] = {
        s: run.evaluate(params, s) for s in ('validation', 'test')
    }
  average_metrics = {
      s: run.evaluate(averaged, s) for s in ('validation', 'test')
  }
  results['average'] = average_metrics
  name = f'average of {count}'
  for split in ('validation', 'test'):
    rows = [
        (f'step {step}', results['checkpoints'][str(step)][split])
        for step in steps
    ]
    rows.append((name, average_metrics[split]))
    console.info(
        metrics_table(
            rows,
            f'{split} split, the last {count} checkpoints of {source} and '
            'their average:',
            run.task.table_columns,
        )
    )
  write_checkpoint(run, averaged, workdir, average_metrics['validation'])
  tokenizer = os.path.join(source, 'tokenizer.json')
  if os.path.isfile(tokenizer) and jax.process_index() == 0:
    shutil.copyfile(tokenizer, os.path.join(workdir, 'tokenizer.json'))
  results.update(average_metrics)  # the headline
  results.update(run.task.results())
  results['checkpoint'] = os.path.join(workdir, 'checkpoints')
  results['wall_time_s'] = time.time() - start
  write_results(workdir, results)
  console.info(
      f'soup: wrote the average of steps {", ".join(map(str, steps))} to '
      f'{results["checkpoint"]} (evaluate it with --config.mode=eval '
      f'--workdir={workdir}, or start from it with '
      f'--config.init.checkpoint={workdir})'
  )
  return results
