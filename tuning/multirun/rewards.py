"""Rewards for GRPO (`config.grpo.reward`, tuning/modes/grpo.py).

A reward is `fn(prompts, completions, **columns) -> list of floats` (one
per completion; `columns` holds the prompt rows' other data columns, one
value per completion). `grpo.reward` names one:

* `gsm8k_exact`: 1 if the number after `####` in the completion equals the
  one in the reference answer (`columns[grpo.answer_column]`), else 0;
* `regex:<pattern>`: 1 if `re.search(pattern, completion)` matches;
* `classifier:<run workdir>[:class]`: a finished tuning classification
  run as the reward model: its probability of `class` (a class name or
  index; default the last class, e.g. SST-2's positive) for the completion
  text, through tuning/multirun/finished_run.py;
* `module.path:function`: any importable callable.

The first two are checks (0/1): the loop also logs them as accuracy.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
from typing import Any, Callable

import numpy as np

_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


@dataclasses.dataclass
class Reward:
  name: str
  fn: Callable[..., Any]
  is_check: bool = False

  def __call__(self, prompts, completions, **columns) -> np.ndarray:
    """The checked rewards [len(completions)] float32 (one-line errors)."""
    values = self.fn(list(prompts), list(completions), **columns)
    try:
      values = list(values)
    except TypeError:
      raise ValueError(
          f'reward {self.name!r} returned {type(values).__name__}, not a '
          'list of numbers: return one float per completion'
      ) from None
    if len(values) != len(completions):
      raise ValueError(
          f'reward {self.name!r} returned {len(values)} values for '
          f'{len(completions)} completions: return one float per completion'
      )
    out = []
    for v in values:
      if isinstance(v, (bool, np.bool_)) or not isinstance(
          v, (int, float, np.integer, np.floating)
      ):
        raise ValueError(
            f'reward {self.name!r} returned {v!r} ({type(v).__name__}): '
            'each value must be a number'
        )
      if not math.isfinite(float(v)):
        raise ValueError(
            f'reward {self.name!r} returned {v!r}: values must be finite'
        )
      out.append(float(v))
    return np.asarray(out, np.float32)


def final_number(text: str) -> str | None:
  """The number after the last `####` (commas dropped), else None."""
  if '####' not in text:
    return None
  found = _NUMBER.search(text.rsplit('####', 1)[1])
  if not found:
    return None
  number = found.group(0).replace(',', '')
  try:
    return repr(float(number))
  except ValueError:
    return None


def gsm8k_exact(answer_column: str):
  def fn(prompts, completions, **columns):
    del prompts
    if answer_column not in columns:
      raise ValueError(
          f'reward gsm8k_exact needs the reference column {answer_column!r} '
          f'in the prompt data (have: {", ".join(sorted(columns)) or "none"})'
          ': set config.grpo.answer_column'
      )
    refs = columns[answer_column]
    out = []
    for c, ref in zip(completions, refs):
      ref = str(ref)
      want = final_number(ref if '####' in ref else '#### ' + ref)
      got = final_number(c)
      out.append(float(want is not None and got == want))
    return out

  return fn


def regex(pattern: str):
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise ValueError(
        f'config.grpo.reward=regex:{pattern}: not a regular expression ({e})'
    ) from None
  return lambda prompts, completions, **_: [
      float(compiled.search(c) is not None) for c in completions
  ]


def classifier(spec: str):
  """`<workdir>[:class]`: the class probability of a finished run."""
  # pylint: disable=g-import-not-at-top
  from tuning.multirun import finished_run

  workdir, _, cls = spec.partition(':')
  if cls and os.path.isdir(spec):
    workdir, cls = spec, ''
  if not finished_run.is_run_workdir(workdir):
    raise ValueError(
        f'config.grpo.reward=classifier:{spec}: {workdir!r} is not a '
        'finished tuning run (no config.json and checkpoints there)'
    )
  members = finished_run.Members([workdir], 'best', named_by='grpo.reward')
  run, params = members.runs[0], members.params[0]
  names = [str(n) for n in (run.data.class_names or ())]
  if run.task.name != 'classification':
    raise ValueError(
        f'config.grpo.reward=classifier:{spec}: the run trained task '
        f'{run.task.name!r}, not classification'
    )
  num = int(run.task.num_classes)
  if not cls:
    index = num - 1
  elif cls in names:
    index = names.index(cls)
  elif cls.isdigit() and int(cls) < num:
    index = int(cls)
  else:
    raise ValueError(
        f'config.grpo.reward=classifier:{spec}: no class {cls!r}; the run '
        f'has {", ".join(names) or num}'
    )

  def fn(prompts, completions, **_):
    del prompts
    texts = [c if c.strip() else '.' for c in completions]
    features = run.data.encode({'text': np.asarray(texts, object)})
    n = len(texts)
    table = {**features, 'label': np.zeros(n, np.int32)}
    logits, _ = run.predict(params, table)
    logits = np.asarray(logits, np.float64)
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return [float(p) for p in probs[:, index]]

  return fn


def dotted(spec: str):
  module, _, name = spec.partition(':')
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(
        f'config.grpo.reward={spec!r}: cannot import {name!r} from '
        f'{module!r} ({e}): use gsm8k_exact, regex:<pattern>, '
        'classifier:<workdir>[:class] or module.path:function'
    ) from None
  if not callable(fn):
    raise ValueError(f'config.grpo.reward={spec!r}: {name!r} is not callable')
  return fn


def build(spec: str | None, answer_column: str = 'answer') -> Reward:
  """The reward `config.grpo.reward` names (one-line error otherwise)."""
  if not spec:
    raise ValueError(
        'config.grpo.reward is not set: use gsm8k_exact, regex:<pattern>, '
        'classifier:<workdir>[:class] or module.path:function'
    )
  if spec == 'gsm8k_exact':
    return Reward(spec, gsm8k_exact(answer_column), is_check=True)
  if spec.startswith('regex:'):
    return Reward(spec, regex(spec[len('regex:') :]), is_check=True)
  if spec.startswith('classifier:'):
    return Reward(spec, classifier(spec[len('classifier:') :]))
  if ':' in spec:
    return Reward(spec, dotted(spec))
  raise ValueError(
      f'unknown config.grpo.reward {spec!r}: use gsm8k_exact, '
      'regex:<pattern>, classifier:<workdir>[:class] or module.path:function'
  )
