"""Training and evaluation of one run: `train_and_evaluate(config, workdir)`.

Initialisation order (as in big_vision): a checkpoint already in
`WORKDIR/checkpoints` (resume) -> `config.init.checkpoint` (pretrained
parameters) -> fresh initialisation. The loop runs the train step (pmapped,
or jitted on a data x fsdp mesh: `config.parallelism`, tuning/sharding.py),
logs progress, evaluates on the validation split, saves checkpoints (latest
and best), and finally evaluates the chosen checkpoint on the test split and
writes `results.json`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import numpy as np

from tuning import console
from tuning import data_checks
from tuning import distillation
from tuning import evaluation
from tuning.checkpoints import (RunCheckpoints, load_pretrained_params,
                                resolve_init_source)
from tuning.data.datasets import Datasets, build_datasets
from tuning.data.pipeline import TrainStream, eval_batches
from tuning.durations import resolve_steps
from tuning.models.registry import build_model
from tuning import ema as ema_lib
from tuning import lora as lora_lib
from tuning.early_stopping import EarlyStopping
from tuning.optimizers import (build_optimizer, describe_parameters,
                               trainable_mask)
from tuning.sharding import local_rows, make_layout
from tuning.train_step import (classification_loss, eval_fn, features_of,
                               initial_state, train_step_fn)


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss), worded for the user."""


class Run:
  """What training and evaluation share: data, model, steps, checkpoints."""

  def __init__(self, config, workdir: str, data: Datasets | None = None):
    """`data`: already built datasets for `config.data` (else built here)."""
    self.config = config
    self.workdir = workdir
    # How arrays are laid out over devices (pmap replicas or a mesh).
    self.layout = make_layout(config)
    self.devices = self.layout.devices
    if data is None:
      data = build_datasets(config.data)
      for line in data.log:
        console.info(f'data: {line}')
      data_checks.check(data, config)
    self.data = data
    num_classes = config.model.num_classes or self.data.num_classes
    if num_classes < self.data.num_classes:
      raise ValueError(f'config.model.num_classes={num_classes} is smaller '
                       f'than the {self.data.num_classes} classes in the data')
    self.num_classes = num_classes
    self.model = build_model(config.model, num_classes, config.dtype,
                             self.data.vocab_size(config.data))
    self.lora = config.get('lora') if lora_lib.enabled(config.get('lora')) \
        else None
    if self.lora:
      self.model = lora_lib.LoraModel(self.model, self.lora)
    self.buckets = tuple(config.data.length_buckets)
    self.checkpoints = RunCheckpoints(
        os.path.join(workdir, 'checkpoints'), config.checkpoint.best_metric,
        config.checkpoint.best_mode)
    self.eval_step = self.layout.compile_eval_step(eval_fn(self.model))

  def init_params(self):
    example = features_of(self.data.first_train_example())
    key = jax.random.fold_in(jax.random.key(self.config.seed), 2**31 - 1)
    variables = jax.jit(lambda k: self.model.init(
        {'params': k}, **example, train=False))(key)
    return jax.tree.map(np.asarray, variables['params'])

  def evaluate(self, params, split: str) -> dict:
    """Metrics of a full, ordered pass over one split."""
    logits, labels = self.predict(params, split)
    return evaluation.classification_metrics(logits, labels,
                                             self.num_classes)

  def predict(self, params, split, progress: str = ''):
    """Logits [N, classes] and labels [N] of a split (its name, or a table
    of features and labels), in order; `progress` names a long pass whose
    progress is printed.

    `params`: host (numpy) parameters, or parameters already laid out by
    `self.layout.place_params` (or the train state's, as the loop has them).
    """
    if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params)):
      params = self.layout.place_params(params)
    table = self.data.split(split) if isinstance(split, str) else split
    logits, labels = [], []
    n, done, shown = len(table['label']), 0, time.time()
    for batch in eval_batches(table, self.config.training.eval_batch_size,
                              jax.device_count(), self.buckets,
                              jax.process_index(), jax.process_count()):
      done += len(batch['label']) * jax.process_count()
      if progress and time.time() - shown > 30:
        console.info(f'{progress}: {min(done, n)}/{n} examples')
        shown = time.time()
      out = local_rows(self.eval_step(params,
                                      self.layout.place_batch(batch)))
      keep = batch['weight'] > 0
      logits.append(out.reshape(-1, out.shape[-1])[keep])
      labels.append(batch['label'][keep])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    if jax.process_count() > 1:  # every process gets every example
      logits, labels = _all_examples(logits, labels)
    return logits, labels

  def restore_params(self, which: str):
    """Parameters of the run's best or latest checkpoint, and its step."""
    if self.checkpoints.latest_step() is None:
      raise FileNotFoundError(
          f'no checkpoint in {self.checkpoints.directory}: train first, or '
          'point --workdir at a finished run')
    params, report = load_pretrained_params(
        self.checkpoints.directory, self.init_params(),
        step=self.checkpoints.verified_step(which))
    if self.config.training.get('evaluate_ema', False):
      params = ema_lib.load_ema_params(self.checkpoints.directory,
                                       report['step'], params)
    return params, report['step']


def _all_examples(logits: np.ndarray, labels: np.ndarray):
  """Gathers every process's evaluated rows (sizes may differ by padding)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.array([len(labels)]))
  width = int(counts.max())
  pad = width - len(labels)
  logits = np.pad(logits, ((0, pad), (0, 0)))
  labels = np.pad(labels, (0, pad))
  all_logits = multihost_utils.process_allgather(logits)
  all_labels = multihost_utils.process_allgather(labels)
  n = counts.reshape(-1)
  return (np.concatenate([l[:c] for l, c in zip(all_logits, n)]),
          np.concatenate([l[:c] for l, c in zip(all_labels, n)]))


def _resolve_schedule(config, steps_per_epoch: float):
  training = config.training
  total = resolve_steps(training, 'total', steps_per_epoch)
  if total is None:
    raise ValueError('set config.training.total_steps or total_epochs')
  eval_every = resolve_steps(training, 'eval_every', steps_per_epoch,
                             default=max(1, total // 10))
  checkpoint_every = resolve_steps(training, 'checkpoint_every',
                                   steps_per_epoch, default=eval_every)
  warmup = resolve_steps(config.optimizer, 'warmup', steps_per_epoch,
                         default=0)
  return total, eval_every, checkpoint_every, warmup


class _Preemption:
  """Turns SIGTERM (how cloud preemption arrives) into a flag."""

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains one run in `workdir` (resuming if it holds a checkpoint)."""
  start_time = time.time()
  run = Run(config, workdir)
  try:
    return _train_and_evaluate(run, config, workdir, start_time)
  finally:
    # Also on errors: an open CheckpointManager's threads otherwise fail at
    # interpreter exit, burying the one-line error under their own.
    run.checkpoints.close()


def _train_and_evaluate(run: Run, config, workdir: str,
                        start_time: float) -> dict:
  devices = run.devices
  batch_size = config.training.batch_size
  where = run.layout.devices_text
  if batch_size % jax.device_count():
    raise ValueError(f'config.training.batch_size={batch_size} must be '
                     f'divisible by {where}')
  accumulation = int(config.training.get('accumulation_steps', 1) or 1)
  if accumulation < 1 or batch_size % (jax.device_count() * accumulation):
    raise ValueError(f'config.training.batch_size={batch_size} must be '
                     f'divisible by {where} x '
                     f'config.training.accumulation_steps={accumulation}')
  ema_lib.check_config(config.training)
  teacher, train_table = None, run.data.train
  if distillation.enabled(config.get('distill')):
    teacher = distillation.Teacher(config.distill)
    train_table, log = distillation.student_training_table(
        config, run.data, teacher, workdir)
    for line in log:
      console.info(line)
  in_step_teacher = teacher and config.distill.teacher_logits == 'step'
  # Each process reads only its rows of every global batch.
  stream = TrainStream(train_table, batch_size, config.seed, run.buckets,
                       jax.process_index(), jax.process_count())
  total, eval_every, checkpoint_every, warmup = _resolve_schedule(
      config, stream.steps_per_epoch)

  params = run.init_params()
  tx, schedule = build_optimizer(config.optimizer, params, total, warmup,
                                 run.lora)
  console.info('parameters:\n' + '\n'.join(
      describe_parameters(params, config.optimizer, run.lora)))
  if run.lora:
    console.info(lora_lib.describe(params, run.lora))
  new_state = lambda p: initial_state(  # pylint: disable=unnecessary-lambda-assignment
      p, tx, ema=config.training.get('ema_decay') is not None,
      count_skipped=config.training.get('on_nonfinite') == 'skip')

  latest = run.checkpoints.latest_step()
  if latest is not None:
    target = run.layout.restore_target(new_state(params))
    latest, state, data_state = run.checkpoints.restore_verified(target)
  if latest is not None:
    stream.set_state(data_state)
    console.info(f'resumed from {run.checkpoints.directory} at step {latest}')
  else:
    if config.init.checkpoint:
      source = resolve_init_source(config.init.checkpoint,
                                   os.path.join(workdir, 'pretrained'))
      params, adapters = lora_lib.split(params)
      params, report = load_pretrained_params(
          source, params, tuple(config.init.reinit), config.init.step)
      params = lora_lib.join(params, adapters)
      console.info(f'init: loaded {len(report["loaded"])} parameters from '
                   f'{report["source"]}')
      console.info('init: re-initialised: ' +
                   (', '.join(report['reinitialised']) or 'none'))
      console.info('init: left out (in the checkpoint, not in the model): ' +
                   (', '.join(report['left_out']) or 'none'))
    state = new_state(params)

  from tuning.metric_writer import MetricWriter, validation_history  # pylint: disable=g-import-not-at-top
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  state = run.layout.place_state(state)
  train_step = run.layout.compile_train_step(train_step_fn(
      run.model, tx, schedule, config.seed,
      trainable=trainable_mask(params, config.optimizer, run.lora),
      accumulation_steps=accumulation,
      on_nonfinite=config.training.get('on_nonfinite', 'stop'),
      ema_decay=config.training.get('ema_decay'),
      prng_impl=config.training.get('prng_impl', 'threefry2x32'),
      mean_over_devices=run.layout.mean_over_devices,
      batch_shards=run.layout.batch_shards,
      loss_fn=(distillation.make_loss_fn(config.distill) if teacher else
               classification_loss),
      teacher_model=teacher.members.runs[0].model if in_step_teacher
      else None), state)
  teacher_args = ((run.layout.place_params(teacher.members.params[0]),)
                  if in_step_teacher else ())
  console.info(run.layout.describe(state))
  console.info(_methods_line(config, accumulation, batch_size))
  patience = config.training.get('early_stopping_patience')
  stopper = EarlyStopping(patience, config.checkpoint.best_metric,
                          config.checkpoint.best_mode) if patience else None
  first_step = int(run.layout.fetch(state.step))
  console.info(f'training steps {first_step}..{total} on {devices} '
               f'device(s) x {jax.process_count()} process(es), global batch '
               f'{batch_size} '
               f'({stream.steps_per_epoch:.1f} steps/epoch)')
  preemption = _Preemption()
  tick, tick_step = time.time(), first_step
  history = []
  if stopper and first_step:
    stopper.replay(workdir, first_step)
  stopped_at = None
  try:
    for step in range(first_step, total):
      batch = next(stream)
      state, metrics = train_step(state, run.layout.place_batch(batch),
                                  *teacher_args)
      # Fetch every step: keeps CPU collectives in lock-step, and lets a
      # non-finite loss stop the run at the step where it appeared.
      metrics = {k: float(run.layout.fetch(v)) for k, v in metrics.items()}
      done = step + 1
      if metrics['nonfinite'] and config.training.on_nonfinite == 'skip':
        console.info(f'step {done}: non-finite loss or gradients; update '
                     f'skipped ({int(metrics["skipped"])} skipped so far)')
      elif metrics['nonfinite'] or not math.isfinite(metrics['loss']):
        raise TrainingError(
            f'non-finite loss {metrics["loss"]} or gradients at step {done}; '
            'the run stops, the last good'
            f' checkpoint is step {run.checkpoints.latest_step()} (lower the '
            'learning rate or enable clipping: config.optimizer.clip_norm)')
      if done % config.training.log_every_steps == 0 or done == total:
        elapsed = time.time() - tick
        rate = (done - tick_step) / max(elapsed, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        console.info(
            f'step {done}/{total}  loss {metrics["loss"]:.4f}  lr '
            f'{metrics["learning_rate"]:.2e}  {rate:.1f} steps/s  '
            f'{rate * batch_size:.0f} examples/s  ETA {_hms(eta)}')
        writer.write(done, 'train', {**metrics, 'steps_per_second': rate})
        tick, tick_step = time.time(), done
      evaluate_now = done % eval_every == 0 or done == total
      if evaluate_now:
        val = run.evaluate(state.ema_params if config.training.get(
            'evaluate_ema') else state.params, 'validation')
        scalars = {k: val[k] for k in ('loss', 'accuracy', 'macro_f1')}
        writer.write(done, 'validation',
                     {**scalars, 'elapsed_s': time.time() - start_time})
        history.append({'step': done, **scalars})
        console.info(f'validation at step {done}: loss {val["loss"]:.4f}  '
                     f'accuracy {val["accuracy"]:.4f}  macro-F1 '
                     f'{val["macro_f1"]:.4f}')
      if evaluate_now or done % checkpoint_every == 0 or preemption.requested:
        run.checkpoints.save(done, run.layout.checkpoint_state(state),
                             stream.get_state(),
                             metrics=scalars if evaluate_now else None)
      if preemption.requested:
        run.checkpoints.wait()
        console.info(f'SIGTERM: saved a checkpoint at step {done}; exiting '
                     '(rerun the same command to resume)')
        writer.close()
        return {'preempted_at_step': done}
      if evaluate_now and stopper and stopper.update(done, scalars):
        console.info(stopper.message(done))
        stopped_at = done
        break
  finally:
    preemption.restore()
    run.checkpoints.wait()
  writer.close()
  results = _final_evaluation(run, config)
  results.update({'steps': total, 'wall_time_s': time.time() - start_time,
                  'validation_history': validation_history(
                      workdir, stopped_at or total)})
  results['trainable_parameters'] = sum(
      int(np.size(p)) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(
          trainable_mask(params, config.optimizer, run.lora))) if t)
  if stopped_at is not None:
    results['early_stopped_at_step'] = stopped_at
  if state.skipped is not None:
    results['skipped_steps'] = int(run.layout.fetch(state.skipped))
  if teacher:
    results['distillation'] = teacher.report(run, results)
  write_results(workdir, results)
  return results


def _final_evaluation(run: Run, config) -> dict:
  params, step = run.restore_params(config.checkpoint.evaluate)
  params_placed = run.layout.place_params(params)
  validation = run.evaluate(params_placed, 'validation')
  start = time.time()  # the validation pass compiled every shape
  test = run.evaluate(params_placed, 'test')
  eval_speed = test['examples'] / max(time.time() - start, 1e-9)
  console.info(evaluation.format_metrics(
      test, run.data.class_names,
      f'test ({config.checkpoint.evaluate} checkpoint, step {step})'))
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  extra = {}
  if run.lora and run.lora.get('export_merged', True):
    merged = lora_lib.export_merged(params, run.lora,
                                    os.path.join(run.workdir, 'merged'))
    console.info(f'lora: merged the adapters into the base weights; plain '
                 f'checkpoint in {merged} (load it with '
                 f'--config.init.checkpoint={merged} and lora.rank=0)')
    extra['merged_checkpoint'] = merged
  return {'test': test, 'validation': validation, 'evaluated_step': step,
          'evaluated_checkpoint': config.checkpoint.evaluate,
          'num_parameters': num_params, 'class_names': run.data.class_names,
          'eval_examples_per_s': eval_speed,
          **extra}


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`mode=eval`: evaluates the run's checkpoint in `workdir` on test."""
  start_time = time.time()
  run = Run(config, workdir)
  try:
    results = _final_evaluation(run, config)
  finally:
    run.checkpoints.close()
  results['wall_time_s'] = time.time() - start_time
  write_results(workdir, results)
  return results


def write_results(workdir: str, results: dict):
  """Writes WORKDIR/results.json (process 0) and says where."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  console.info(f'wrote {os.path.join(workdir, "results.json")}')


def _methods_line(config, accumulation: int, batch_size: int) -> str:
  """One line saying which fine-tuning methods this run uses."""
  training = config.training
  parts = [f'compute dtype {config.dtype} (params and optimizer state '
           'float32)']
  if accumulation > 1:
    parts.append(f'gradient accumulation {accumulation} x '
                 f'{batch_size // accumulation} examples per optimizer step')
  parts.append(f'non-finite loss/gradients: {training.get("on_nonfinite")}')
  if training.get('ema_decay') is not None:
    parts.append(f'EMA decay {training.ema_decay} (evaluated: '
                 f'{"EMA" if training.get("evaluate_ema") else "raw"} params)')
  if training.get('early_stopping_patience'):
    parts.append(f'early stopping after {training.early_stopping_patience} '
                 f'evaluations without a better {config.checkpoint.best_metric}')
  return 'fine-tuning: ' + '; '.join(parts)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

