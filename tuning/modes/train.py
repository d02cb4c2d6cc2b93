"""Training of one run: `train_and_evaluate(config, workdir)`.

Initialisation order (as in big_vision): a checkpoint already in
`WORKDIR/checkpoints` (resume) -> `config.init.checkpoint` (pretrained
parameters) -> fresh initialisation. Four parts, each on one screen:
`_setup` (the data stream, schedule, optimizer and the initial or resumed
state), `_compile_step` (the task's loss in the train step, compiled for
the layout: pmapped, or jitted on a data x fsdp mesh, tuning/engine/layouts.py),
`_loop` (steps, progress, validation, checkpoints of the latest and best,
SIGTERM, early stopping) and `_finish` (the final evaluation of the chosen
checkpoint on the test split and `results.json`, tuning/modes/evaluate.py).
Nothing here knows the task: its loss, metrics and report come from
`run.task` (tuning/tasks/).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from tuning.terminal import console
from tuning.multirun import distillation
from tuning.multirun import preference_reference
from tuning.methods import ema as ema_lib
from tuning.methods import lora as lora_lib
from tuning.engine.checkpoints import load_pretrained_params, resolve_init_source
from tuning.data import augmentation
from tuning.data.pipeline import TrainStream
from tuning.config.durations import resolve_steps
from tuning.methods.early_stopping import EarlyStopping
from tuning.modes.evaluate import final_evaluation
from tuning.engine.metric_writer import MetricWriter, validation_history
from tuning.methods.optimizers import (
    build_optimizer,
    describe_parameters,
    trainable_mask,
)
from tuning.engine.run import Run
from tuning.engine.run_files import write_results
from tuning.engine.train_step import initial_state, train_step_fn


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss), worded for the user."""


def _resolve_schedule(config, steps_per_epoch: float):
  training = config.training
  total = resolve_steps(training, 'total', steps_per_epoch)
  if total is None:
    raise ValueError('set config.training.total_steps or total_epochs')
  eval_every = resolve_steps(
      training, 'eval_every', steps_per_epoch, default=max(1, total // 10)
  )
  checkpoint_every = resolve_steps(
      training, 'checkpoint_every', steps_per_epoch, default=eval_every
  )
  warmup = resolve_steps(config.optimizer, 'warmup', steps_per_epoch, default=0)
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


@dataclasses.dataclass
class _Training:
  """What `_setup` prepares for the loop."""

  stream: TrainStream
  total: int
  eval_every: int
  checkpoint_every: int
  batch_size: int
  accumulation: int
  params: Any  # the host parameters the state started from (their paths)
  tx: Any
  schedule: Any
  state: Any  # laid out for the step
  teacher: distillation.Teacher | None


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains one run in `workdir` (resuming if it holds a checkpoint)."""
  start_time = time.time()
  run = Run(config, workdir)
  try:
    training = _setup(run)
    train_step, step_args = _compile_step(run, training)
    outcome = _loop(run, training, train_step, step_args, start_time)
    if 'preempted_at_step' in outcome:
      return outcome
    return _finish(run, training, outcome, start_time)
  finally:
    # Also on errors: an open CheckpointManager's threads otherwise fail at
    # interpreter exit, burying the one-line error under their own.
    run.checkpoints.close()


def _setup(run: Run) -> _Training:
  """Checks the batch settings; builds the stream, schedule and optimizer;
  restores the run's checkpoint or loads the pretrained parameters."""
  config = run.config
  batch_size = config.training.batch_size
  where = run.layout.devices_text
  if batch_size % jax.device_count():
    raise ValueError(
        f'config.training.batch_size={batch_size} must be '
        f'divisible by {where}'
    )
  accumulation = config.training.accumulation_steps
  if accumulation < 1 or batch_size % (jax.device_count() * accumulation):
    raise ValueError(
        f'config.training.batch_size={batch_size} must be '
        f'divisible by {where} x '
        f'config.training.accumulation_steps={accumulation}'
    )
  ema_lib.check_config(config.training)
  params = run.init_params()
  loaded = None  # the pretrained parameters, where already loaded
  if getattr(run.task, 'needs_reference', False):
    log, loaded = preference_reference.add_reference_logps(
        run, lambda: _pretrained(run, params)
    )
    for line in log:
      console.info(line)
  teacher, train_table, augment = None, run.data.train, None
  corrupt = getattr(run.data, 'corrupt', None)  # triples' negatives
  if (config.data.augment or corrupt) and not distillation.enabled(
      config.distill
  ):
    augment = augmentation.for_training(config, run.task.name, run.data)
    if config.data.augment:
      console.info(augmentation.describe(config.data.augment))
  if distillation.enabled(config.distill):
    distillation.check_student_task(run.task)
    teacher = distillation.Teacher(config.distill)
    train_table, log = distillation.student_training_table(
        config, run.data, teacher, run.workdir
    )
    for line in log:
      console.info(line)
  # Each process reads only its rows of every global batch.
  stream = TrainStream(
      train_table,
      batch_size,
      config.seed,
      run.buckets,
      jax.process_index(),
      jax.process_count(),
      group_by_length=config.data.group_by_length,
      augment=augment,
  )
  total, eval_every, checkpoint_every, warmup = _resolve_schedule(
      config, stream.steps_per_epoch
  )
  tx, schedule = build_optimizer(
      config.optimizer, params, total, warmup, run.lora, naming=run.naming
  )
  console.info(
      'parameters:\n'
      + '\n'.join(
          describe_parameters(
              params, config.optimizer, run.lora, naming=run.naming
          )
      )
  )
  if run.lora:
    console.info(lora_lib.describe(params, run.lora))
  new_state = lambda p: initial_state(  # pylint: disable=unnecessary-lambda-assignment
      p,
      tx,
      ema=config.training.ema_decay is not None,
      count_skipped=config.training.on_nonfinite == 'skip',
  )
  latest = run.checkpoints.latest_step()
  if latest is not None:
    target = run.layout.restore_target(new_state(params))
    latest, state, data_state = run.checkpoints.restore_verified(target)
  if latest is not None:
    stream.set_state(data_state)
    console.info(f'resumed from {run.checkpoints.directory} at step {latest}')
  else:
    state = new_state(_pretrained(run, params) if loaded is None else loaded)
  del loaded
  return _Training(
      stream,
      total,
      eval_every,
      checkpoint_every,
      batch_size,
      accumulation,
      params,
      tx,
      schedule,
      run.layout.place_state(state),
      teacher,
  )


def _pretrained(run: Run, params):
  """`params` with `config.init.checkpoint`'s loaded (if set), reported."""
  init = run.config.init
  if not init.checkpoint:
    return params
  source = resolve_init_source(
      init.checkpoint, os.path.join(run.workdir, 'pretrained')
  )
  params, adapters = lora_lib.split(params)
  # A frozen base stored smaller (lora.base_dtype) loads in float32 and is
  # stored again below.
  params, report = load_pretrained_params(
      source, lora_lib.dequantized_base(params), tuple(init.reinit), init.step
  )
  console.info(
      f'init: loaded {len(report["loaded"])} parameters from '
      f'{report["source"]}'
  )
  console.info(
      'init: re-initialised: ' + (', '.join(report['reinitialised']) or 'none')
  )
  console.info(
      'init: left out (in the checkpoint, not in the model): '
      + (', '.join(report['left_out']) or 'none')
  )
  return lora_lib.quantize_base(
      lora_lib.join(params, adapters), run.lora, run.naming
  )


def _compile_step(run: Run, training: _Training):
  """The compiled train step and the extra arguments it takes (an in-step
  distillation teacher's parameters)."""
  config, teacher = run.config, training.teacher
  in_step_teacher = teacher and config.distill.teacher_logits == 'step'
  train_step = run.layout.compile_train_step(
      train_step_fn(
          run.model,
          training.tx,
          training.schedule,
          config,
          task=run.task,
          layout=run.layout,
          trainable=trainable_mask(
              training.params, config.optimizer, run.lora, naming=run.naming
          ),
          loss_fn=distillation.make_loss_fn(config.distill)
          if teacher
          else None,
          teacher_model=teacher.members.runs[0].model
          if in_step_teacher
          else None,
      ),
      training.state,
  )
  step_args = (
      (run.layout.place_params(teacher.members.params[0]),)
      if in_step_teacher
      else ()
  )
  console.info(run.layout.describe(training.state))
  console.info(
      _methods_line(
          config, training.accumulation, training.batch_size, run.best_metric
      )
  )
  return train_step, step_args


def _loop(
    run: Run, training: _Training, train_step, step_args, start_time: float
) -> dict:
  """Trains to `training.total` steps (or early stopping, or SIGTERM)."""
  config, stream, total = run.config, training.stream, training.total
  patience = config.training.early_stopping_patience
  stopper = (
      EarlyStopping(patience, run.best_metric, run.best_mode)
      if patience
      else None
  )
  state = training.state
  first_step = int(run.layout.fetch(state.step))
  console.info(
      f'training steps {first_step}..{total} on {run.devices} '
      f'device(s) x {jax.process_count()} process(es), global batch '
      f'{training.batch_size} '
      f'({stream.steps_per_epoch:.1f} steps/epoch)'
  )
  writer = MetricWriter(run.workdir, enabled=jax.process_index() == 0)
  preemption = _Preemption()
  tick, tick_step = time.time(), first_step
  history, stopped_at = [], None
  if stopper and first_step:
    stopper.replay(run.workdir, first_step)
  if first_step == 0 and config.training.eval_at_start:
    history.append(_evaluate_at_start(run, state, writer, start_time))
  try:
    for step in range(first_step, total):
      batch = next(stream)
      state, metrics = train_step(
          state, run.layout.place_batch(batch), *step_args
      )
      # Fetch every step: keeps CPU collectives in lock-step, and lets a
      # non-finite loss stop the run at the step where it appeared.
      metrics = {k: float(run.layout.fetch(v)) for k, v in metrics.items()}
      done = step + 1
      _check_finite(run, metrics, done)
      if done % config.training.log_every_steps == 0 or done == total:
        elapsed = time.time() - tick
        rate = (done - tick_step) / max(elapsed, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        console.info(
            f'step {done}/{total}  loss {metrics["loss"]:.4f}  lr '
            f'{metrics["learning_rate"]:.2e}  {rate:.1f} steps/s  '
            f'{rate * training.batch_size:.0f} examples/s  ETA {_hms(eta)}'
        )
        writer.write(done, 'train', {**metrics, 'steps_per_second': rate})
        tick, tick_step = time.time(), done
      evaluate_now = done % training.eval_every == 0 or done == total
      if evaluate_now:
        val = run.evaluate(
            state.ema_params if config.training.evaluate_ema else state.params,
            'validation',
            step=done,
        )
        scalars = run.task.scalars(val)
        writer.write(
            done,
            'validation',
            {**scalars, 'elapsed_s': time.time() - start_time},
        )
        history.append({'step': done, **scalars})
        console.info(f'validation at step {done}: {run.task.summary(val)}')
        _log_samples(run, state.params, done)
      if (
          evaluate_now
          or done % training.checkpoint_every == 0
          or preemption.requested
      ):
        run.checkpoints.save(
            done,
            run.layout.checkpoint_state(state),
            stream.get_state(),
            metrics=scalars if evaluate_now else None,
        )
      if preemption.requested:
        run.checkpoints.wait()
        console.info(
            f'SIGTERM: saved a checkpoint at step {done}; exiting '
            '(rerun the same command to resume)'
        )
        return {'preempted_at_step': done}
      if evaluate_now and stopper and stopper.update(done, scalars):
        console.info(stopper.message(done))
        stopped_at = done
        break
  finally:
    preemption.restore()
    run.checkpoints.wait()
    writer.close()
  return {'state': state, 'history': history, 'stopped_at': stopped_at}


def _evaluate_at_start(run: Run, state, writer, start_time: float) -> dict:
  """`training.eval_at_start`: the validation metrics of the parameters
  before the first update (e.g. a pretrained model's zero-shot figures),
  logged as step 0; not a checkpoint, and early stopping ignores it."""
  config = run.config
  val = run.evaluate(
      state.ema_params if config.training.evaluate_ema else state.params,
      'validation',
  )
  scalars = run.task.scalars(val)
  writer.write(
      0, 'validation', {**scalars, 'elapsed_s': time.time() - start_time}
  )
  console.info(
      f'validation at step 0 (before training): {run.task.summary(val)}'
  )
  _log_samples(run, state.params, 0)
  return {'step': 0, **scalars}


def _check_finite(run: Run, metrics: dict, done: int):
  """Says a skipped step, or stops the run on a non-finite loss."""
  if metrics['nonfinite'] and run.config.training.on_nonfinite == 'skip':
    console.info(
        f'step {done}: non-finite loss or gradients; update '
        f'skipped ({int(metrics["skipped"])} skipped so far)'
    )
  elif metrics['nonfinite'] or not math.isfinite(metrics['loss']):
    raise TrainingError(
        f'non-finite loss {metrics["loss"]} or gradients at step {done}; '
        'the run stops, the last good'
        f' checkpoint is step {run.checkpoints.latest_step()} (lower the '
        'learning rate or enable clipping: config.optimizer.clip_norm)'
    )


def _finish(
    run: Run, training: _Training, outcome: dict, start_time: float
) -> dict:
  """The final evaluation and `results.json`."""
  config, params = run.config, training.params
  results = final_evaluation(run)
  results.update(
      {
          'steps': training.total,
          'wall_time_s': time.time() - start_time,
          'validation_history': validation_history(
              run.workdir, outcome['stopped_at'] or training.total
          ),
      }
  )
  results['trainable_parameters'] = sum(
      int(np.size(p))
      for p, t in zip(
          jax.tree.leaves(params),
          jax.tree.leaves(
              trainable_mask(
                  params, config.optimizer, run.lora, naming=run.naming
              )
          ),
      )
      if t
  )
  at_start = [h for h in results['validation_history'] if h['step'] == 0]
  if at_start:
    results['validation_at_start'] = at_start[0]
  if outcome['stopped_at'] is not None:
    results['early_stopped_at_step'] = outcome['stopped_at']
  state = outcome['state']
  if state.skipped is not None:
    results['skipped_steps'] = int(run.layout.fetch(state.skipped))
  if training.teacher:
    results['distillation'] = training.teacher.report(run, results)
  write_results(run.workdir, results)
  return results


def _methods_line(
    config, accumulation: int, batch_size: int, best_metric: str
) -> str:
  """One line saying which fine-tuning methods this run uses."""
  training = config.training
  parts = [
      f'compute dtype {config.dtype} (params and optimizer state ' 'float32)'
  ]
  if config.lora.rank and lora_lib.base_dtype(config.lora) != 'float32':
    parts.append(
        'frozen kernels of the adapted layers stored in '
        f'{lora_lib.base_dtype(config.lora)}'
    )
  if accumulation > 1:
    parts.append(
        f'gradient accumulation {accumulation} x '
        f'{batch_size // accumulation} examples per optimizer step'
    )
  parts.append(f'non-finite loss/gradients: {training.on_nonfinite}')
  if training.ema_decay is not None:
    parts.append(
        f'EMA decay {training.ema_decay} (evaluated: '
        f'{"EMA" if training.evaluate_ema else "raw"} params)'
    )
  if training.early_stopping_patience:
    parts.append(
        f'early stopping after {training.early_stopping_patience} '
        f'evaluations without a better {best_metric}'
    )
  return 'fine-tuning: ' + '; '.join(parts)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _log_samples(run, params, step: int):
  """The task's samples at an evaluation: printed and appended to
  WORKDIR/samples.jsonl (only where the task makes any)."""
  if not run.config.training.samples:
    return
  plain = run.plain_model_params(params)
  samples = plain and run.task.samples(*plain)
  if not samples:
    return
  for sample in samples:
    console.info(f'sample at step {step}: {sample}')
  if jax.process_index() == 0:
    with open(
        os.path.join(run.workdir, 'samples.jsonl'), 'a', encoding='utf-8'
    ) as f:
      for sample in samples:
        f.write(json.dumps({'step': step, **sample}) + '\n')
