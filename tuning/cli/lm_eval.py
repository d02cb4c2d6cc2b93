"""Evaluate a decoder checkpoint with lm-evaluation-harness.

  python -m tuning.lm_eval --checkpoint=CKPT --tasks=gsm8k_local --limit=100
  python -m tuning.lm_eval --checkpoint=W/sft --tasks=sst2_local \\
      --output=results.json

`--checkpoint` is what `python -m tuning.generate` loads: a converted model
folder, a .gguf file, or a causal_lm run's work directory (`--step`). The
model runs through tuning's lm-eval backend (tuning/cli/lm_eval_backend.py,
`model='tuning'`). `--tasks` (comma separated) are lm-eval task names: the
offline tasks of experiments/lm_eval_tasks/ (`gsm8k_local`, `sst2_local`)
and any other folder given with `--include_path`; lm-eval's own tasks
download their data, which these machines cannot. The metrics print one
line a task and metric; `--output` writes lm-eval's results as JSON.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys

from absl import flags

from tuning.cli import flags as cli_flags
from tuning.terminal import console

PROG = 'python -m tuning.lm_eval'
TASKS_DIR = os.path.join(
    os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ),
    'experiments',
    'lm_eval_tasks',
)


def define_flags(fv: flags.FlagValues):
  cli_flags.define_checkpoint_flags(
      fv, 'A converted model folder (python -m tuning.convert), a .gguf file'
  )
  flags.DEFINE_string(
      'tasks', None, 'lm-eval task names, comma separated.', flag_values=fv
  )
  flags.DEFINE_integer(
      'limit', None, 'At most this many documents a task.', flag_values=fv
  )
  flags.DEFINE_integer('batch_size', 8, 'Requests per batch.', flag_values=fv)
  flags.DEFINE_integer(
      'num_fewshot', None, 'Few-shot examples (task default).', flag_values=fv
  )
  flags.DEFINE_integer(
      'max_gen_toks', 256, 'Most generated tokens a request.', flag_values=fv
  )
  flags.DEFINE_bool(
      'apply_chat_template',
      False,
      "Prompts through the model's chat template.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      'include_path',
      None,
      'Another folder of task YAMLs (experiments/lm_eval_tasks is always'
      ' included).',
      flag_values=fv,
  )
  flags.DEFINE_string('output', None, 'Results JSON file.', flag_values=fv)
  flags.DEFINE_enum(
      'dtype',
      'float32',
      ['float32', 'bfloat16'],
      'Compute dtype.',
      flag_values=fv,
  )


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
  """lm-eval's TaskManager with the offline tasks of this repository."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  paths = [TASKS_DIR]
  if include_path:
    if not os.path.isdir(include_path):
      raise ValueError(f'--include_path {include_path!r} is not a folder')
    paths.append(include_path)
  # lm-eval's own tasks download their data (offline here) and indexing
  # them takes minutes: only the local folders.
  return TaskManager(include_path=paths, include_defaults=False)


def check_tasks(names: list[str], manager) -> None:
  known = set(manager.all_tasks)
  for name in names:
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise ValueError(
          f'unknown lm-eval task {name!r}{hint}: the offline tasks are in '
          f'{TASKS_DIR}; give another folder with --include_path'
      )


def evaluate(
    checkpoint: str,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    max_gen_toks: int = 256,
    apply_chat_template: bool = False,
    include_path: str | None = None,
    dtype: str = 'float32',
    step: str = 'best',
    loaded=None,
) -> dict:
  """lm-eval's results dict for `tasks` on the checkpoint."""
  # pylint: disable=g-import-not-at-top
  import lm_eval
  from tuning.cli import lm_eval_backend
  # pylint: enable=g-import-not-at-top
  manager = task_manager(include_path)
  check_tasks(tasks, manager)
  model = lm_eval_backend.TuningLM(
      checkpoint,
      batch_size=batch_size,
      max_gen_toks=max_gen_toks,
      dtype=dtype,
      step=step,
      loaded=loaded,
  )
  return lm_eval.simple_evaluate(
      model=model,
      tasks=tasks,
      limit=limit,
      num_fewshot=num_fewshot,
      apply_chat_template=apply_chat_template,
      task_manager=manager,
      log_samples=False,
      bootstrap_iters=0,
  )


def metric_lines(results: dict) -> list[str]:
  lines = []
  for task, metrics in sorted(results['results'].items()):
    for key, value in sorted(metrics.items()):
      if key == 'alias' or '_stderr' in key or not isinstance(value, float):
        continue
      lines.append(f'{task}: {key} = {value:.4f}')
  return lines


def lm_eval_command(fv: flags.FlagValues, positional: list[str]):
  """The command, its flags parsed."""
  cli_flags.no_positional(positional)
  if not fv.checkpoint:
    raise ValueError(
        '--checkpoint is required: a converted model folder, '
        "a .gguf file or a causal_lm run's work directory"
    )
  if not os.path.exists(fv.checkpoint):
    raise ValueError(f'--checkpoint {fv.checkpoint!r} not found')
  if not fv.tasks:
    raise ValueError('--tasks is required: e.g. --tasks=gsm8k_local,sst2_local')
  tasks = [t.strip() for t in fv.tasks.split(',') if t.strip()]
  check_tasks(tasks, task_manager(fv.include_path))
  results = evaluate(
      fv.checkpoint,
      tasks,
      limit=fv.limit,
      batch_size=fv.batch_size,
      num_fewshot=fv.num_fewshot,
      max_gen_toks=fv.max_gen_toks,
      apply_chat_template=fv.apply_chat_template,
      include_path=fv.include_path,
      dtype=fv.dtype,
      step=fv.step,
  )
  for line in metric_lines(results):
    console.info(line)
  if fv.output:
    with open(fv.output, 'w', encoding='utf-8') as f:
      json.dump(
          {
              k: results[k]
              for k in ('results', 'configs', 'n-samples')
              if k in results
          },
          f,
          indent=1,
          default=str,
      )
    console.info(f'results written to {fv.output}')


def main(argv=None) -> int:
  """The command; `argv`: its arguments (None: sys.argv[1:])."""
  return cli_flags.run(PROG, __doc__, define_flags, lm_eval_command, argv)


if __name__ == '__main__':
  sys.exit(main())
