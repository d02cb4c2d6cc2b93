"""The final evaluation of a run, and `mode=eval`.

The chosen checkpoint (`config.checkpoint.evaluate`: best or latest, read
by the one loader of finished runs, tuning/multirun/finished_run.py) is
evaluated on the validation and test splits; the task prints its test
report, and the figures go to `results.json` with what the run is
(parameters, evaluation speed, the task's own entries).
"""

from __future__ import annotations

import os
import time

from tuning.terminal import console
from tuning.methods import lora as lora_lib
from tuning.engine.run import Run
from tuning.engine.run_files import write_results
from tuning.multirun import finished_run
from tuning.multirun import preference_reference
from tuning.modes import triple_thresholds


def final_evaluation(run: Run) -> dict:
  """Validation and test metrics of the run's chosen checkpoint."""
  config = run.config
  params, step = finished_run.restore_run(
      run,
      config.checkpoint.evaluate,
      setting='config.checkpoint.evaluate',
      where='--workdir',
  )
  params_placed = run.layout.place_params(params)
  validation = run.evaluate(params_placed, 'validation', step=step)
  start = time.time()  # the validation pass compiled every shape
  test = run.evaluate(params_placed, 'test', step=step)
  eval_speed = test['examples'] / max(time.time() - start, 1e-9)
  console.info(
      run.task.report(
          test, f'test ({config.checkpoint.evaluate} checkpoint, step {step})'
      )
  )
  extra = {}
  if getattr(run.data, 'triples', None) is not None:
    extra['triple_thresholds'] = triple_thresholds.evaluate(run, params_placed)
  if run.lora and run.lora.export_merged:
    merged = lora_lib.export_merged(
        params, run.lora, os.path.join(run.workdir, 'merged')
    )
    console.info(
        f'lora: merged the adapters into the base weights; plain '
        f'checkpoint in {merged} (load it with '
        f'--config.init.checkpoint={merged} and lora.rank=0)'
    )
    extra['merged_checkpoint'] = merged
  return {
      'test': test,
      'validation': validation,
      'evaluated_step': step,
      'evaluated_checkpoint': config.checkpoint.evaluate,
      'num_parameters': run.num_parameters(params),
      **run.task.results(),
      'eval_examples_per_s': eval_speed,
      **extra,
  }


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`mode=eval`: evaluates the run's checkpoint in `workdir` on test."""
  start_time = time.time()
  run = Run(config, workdir)
  try:
    if getattr(run.task, 'needs_reference', False):
      log, _ = preference_reference.add_reference_logps(
          run, _no_reference(workdir)
      )
      for line in log:
        console.info(line)
    results = final_evaluation(run)
  finally:
    run.checkpoints.close()
  results['wall_time_s'] = time.time() - start_time
  write_results(workdir, results)
  return results


def _no_reference(workdir: str):
  def fail():
    raise ValueError(
        f'{workdir} holds no {preference_reference.FILE}: mode=eval of a '
        'DPO/IPO run reads the reference log-probs its training cached; '
        'evaluate the work directory that trained'
    )

  return fail
