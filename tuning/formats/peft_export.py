"""Writing a LoRA run's adapters as a PEFT adapter folder, as `peft`'s
`PeftModel.save_pretrained` writes one, for
`peft.PeftModel.from_pretrained(base_model, DIR)`.

`write_adapter(out_dir, adapters, linear_names, ...)` writes

    adapter_model.safetensors   per adapted layer, under its transformers
                                module name M (`linear_names`):
                                base_model.model.M.lora_A.weight [rank, in]
                                base_model.model.M.lora_B.weight [out, rank]
                                and, for `modules_to_save`, whole tensors
                                base_model.model.<tensor name>
    adapter_config.json         peft_type LORA, task_type, r, lora_alpha,
                                lora_dropout, target_modules (transformers
                                module names), modules_to_save, ...

tuning's LoRA computes y = x W + b + (alpha / rank) x A B with A [in, rank]
and B [rank, out] (tuning/methods/lora.py); PEFT's computes
y = base(x) + (lora_alpha / r) lora_B(lora_A(x)) with nn.Linear weights
[out, in]: lora_A.weight = A^T, lora_B.weight = B^T, the same scale.

`target_modules` is what makes PEFT adapt exactly the adapted layers: their
short names (e.g. ["q_proj", "v_proj"]) when those are every layer of those
names; the short names with `layers_to_transform` when they are every such
layer of some layers; else one regex that fully matches their full names.

A run that trains its head beside the adapters (`lora.train_head`, on by
default) changes more than the adapters: `head_tensors` finds the Hugging
Face tensors the head parameters export to, and `write_adapter` saves them
as PEFT's `modules_to_save` (whole modules that replace the base model's).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Optional

import flax
import numpy as np

from tuning.formats import huggingface_export

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
# PeftModel's prefix of the base model's module names in saved adapters.
PREFIX = 'base_model.model.'
# tuning task -> PEFT TaskType (the PeftModel class that wraps the base).
TASK_TYPES = {
    'causal_lm': 'CAUSAL_LM',
    'classification': 'SEQ_CLS',
    'regression': 'SEQ_CLS',
    'seq2seq': 'SEQ_2_SEQ_LM',
}
# The heads that PEFT's PeftModelForSequenceClassification always replaces
# whole (adds to modules_to_save), so that no adapter on them is loaded.
_PEFT_CLASSIFIER_NAMES = ('classifier', 'score')
# PEFT's layer index of a module name when `layers_pattern` is unset (peft's
# tuners_utils.check_target_module_exists): the first numbered segment.
_PEFT_LAYER_INDEX = re.compile(r'.*?\.[^.]*\.(?P<idx>\d+)\.')


def _layer_index(name: str) -> Optional[int]:
  match = _PEFT_LAYER_INDEX.match(name)
  return int(match.group('idx')) if match else None


def _matches_short_name(name: str, short: str) -> bool:
  """PEFT's match of a module name against a `target_modules` list entry."""
  return name == short or name.endswith('.' + short)


def target_modules(
    adapted: set[str], linear_names: set[str]
) -> tuple[list[str] | str, Optional[list[int]]]:
  """(target_modules, layers_to_transform) that make PEFT adapt exactly the
  `adapted` module names out of a model whose nn.Linear modules are
  `linear_names`."""
  short = sorted({name.rpartition('.')[2] for name in adapted})
  same_names = {
      n
      for n in linear_names | adapted
      if any(_matches_short_name(n, s) for s in short)
  }
  if same_names == adapted:
    return short, None
  layers = {_layer_index(n) for n in adapted}
  if None not in layers:
    in_layers = {n for n in same_names if _layer_index(n) in layers}
    if in_layers == adapted:
      return short, sorted(layers)
  return '|'.join(re.escape(n) for n in sorted(adapted)), None


def head_tensors(
    export_hf: Callable, params, hf_config: dict, head_regex
) -> dict[str, np.ndarray]:
  """{Hugging Face tensor name: array} of the tensors that the head
  parameters (those whose `/`-joined path fully matches one of
  `head_regex`) export to through `export_hf(params, hf_config)` (the
  family's exporter; `params` plain, LoRA merged): found by exporting once
  more with the head parameters set to NaN. Empty where nothing matches."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  regexes = [re.compile(r) for r in head_regex]
  head = {k for k in flat if any(r.fullmatch(k) for r in regexes)}
  if not head:
    return {}
  marked = {
      k: np.full(np.shape(v), np.nan, np.float32) if k in head else v
      for k, v in flat.items()
  }
  marked_tensors, _ = export_hf(
      flax.traverse_util.unflatten_dict(marked, sep='/'), hf_config
  )
  names = [
      n
      for n, t in marked_tensors.items()
      if np.issubdtype(np.asarray(t).dtype, np.floating) and np.isnan(t).any()
  ]
  tensors, _ = export_hf(params, hf_config)
  return {n: np.asarray(tensors[n], np.float32) for n in names}


def write_adapter(
    out_dir: str,
    adapters: dict,
    linear_names: dict[str, str],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    task: str,
    base_model_name_or_path: Optional[str] = None,
    dtype: str = 'float32',
    modules_to_save: Optional[dict[str, np.ndarray]] = None,
) -> list[str]:
  """Writes a PEFT LoRA adapter folder into `out_dir` (new or empty);
  returns the names of the files written.

  `adapters`: {Flax Dense module path: (lora_a [in, rank], lora_b [rank,
  out])} (`tuning.methods.lora.split(params)[1]`); `linear_names`: {Flax
  Dense module path: transformers nn.Linear module name} of the base model
  (the family's `hf_linear_names`); `task`: the run's task (its PEFT
  task_type); `modules_to_save`: {Hugging Face tensor name: array} of whole
  modules that replace the base model's (a trained head, `head_tensors`,
  with any adapters of its own merged in: an adapted layer among them is
  saved whole, not as an adapter)."""
  if task not in TASK_TYPES:
    raise ValueError(
        f'task {task!r} has no PEFT task type: --format=peft exports '
        f'{", ".join(TASK_TYPES)} runs'
    )
  if not adapters:
    raise ValueError(
        'no LoRA adapters in these parameters: --format=peft writes a LoRA '
        "run's adapters; use --format=hf for the whole model"
    )
  unnamed = sorted(m for m in adapters if m not in linear_names)
  if unnamed:
    raise ValueError(
        f'adapted layer {unnamed[0]} has no Hugging Face nn.Linear module to '
        "put a PEFT adapter on (e.g. GPT-2's fused Conv1D layers): use "
        '--format=hf, which exports the model with the adapters merged'
    )
  target = huggingface_export.numpy_dtype(dtype)
  modules_to_save = dict(modules_to_save or {})
  saved_modules = sorted({n.rpartition('.')[0] for n in modules_to_save})
  tensors = {}
  adapted = set()
  for module, (lora_a, lora_b) in sorted(adapters.items()):
    name = linear_names[module]
    if name in saved_modules:
      continue  # saved whole, its adapter merged in
    lora_a, lora_b = np.asarray(lora_a), np.asarray(lora_b)
    if lora_a.shape[1] != rank or lora_b.shape[0] != rank:
      raise ValueError(
          f'adapter {module} has rank {lora_a.shape[1]}, not lora.rank={rank}'
      )
    if TASK_TYPES[task] == 'SEQ_CLS' and name.rpartition('.')[2] in (
        _PEFT_CLASSIFIER_NAMES
    ):
      raise ValueError(
          f'adapted layer {module} is the classification head ({name}), '
          'which PEFT replaces whole (modules_to_save): pass its tensors as '
          'modules_to_save (train_head runs do), or use --format=hf'
      )
    adapted.add(name)
    tensors[f'{PREFIX}{name}.lora_A.weight'] = lora_a.T
    tensors[f'{PREFIX}{name}.lora_B.weight'] = lora_b.T
  if not adapted:
    raise ValueError(
        'every adapted layer is among modules_to_save: no adapter is left for '
        '--format=peft; use --format=hf'
    )
  for name, value in modules_to_save.items():
    tensors[PREFIX + name] = np.asarray(value)
  tensors = {
      k: np.ascontiguousarray(np.asarray(v, np.float32).astype(target))
      for k, v in tensors.items()
  }
  modules, layers = target_modules(adapted, set(linear_names.values()))
  config = {
      'peft_type': 'LORA',
      'task_type': TASK_TYPES[task],
      'r': int(rank),
      'lora_alpha': float(alpha),
      'lora_dropout': float(dropout),
      'target_modules': modules,
      'layers_to_transform': layers,
      'modules_to_save': saved_modules or None,
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_rslora': False,
      'use_dora': False,
      'init_lora_weights': True,
      'inference_mode': True,
      'base_model_name_or_path': base_model_name_or_path,
  }
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  out_dir = huggingface_export.prepare_out(out_dir)
  save_file(
      tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={'format': 'pt'}
  )
  huggingface_export.with_default_permissions(
      os.path.join(out_dir, ADAPTER_WEIGHTS)
  )
  with open(os.path.join(out_dir, ADAPTER_CONFIG), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
