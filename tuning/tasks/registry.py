"""Tasks by name: `config.task` selects one here (tuning/tasks/base.py)."""

from tuning.tasks import causal_lm
from tuning.tasks import classification
from tuning.tasks import grpo
from tuning.tasks import preference
from tuning.tasks import regression
from tuning.tasks import seq2seq
from tuning.tasks.base import Task

TASKS: dict[str, type[Task]] = {
    causal_lm.TASK.name: causal_lm.TASK,
    classification.TASK.name: classification.TASK,
    grpo.TASK.name: grpo.TASK,
    preference.TASK.name: preference.TASK,
    regression.TASK.name: regression.TASK,
    seq2seq.TASK.name: seq2seq.TASK,
}


def task_class(name: str) -> type[Task]:
  """The task class `config.task` names (one-line error if unknown)."""
  if name not in TASKS:
    raise ValueError(
        f'unknown config.task {name!r}: choose one of '
        f'{", ".join(sorted(TASKS))}'
    )
  return TASKS[name]
