"""Export a fine-tuned model for other tools: a Hugging Face folder, a PEFT
adapter or a GGUF file.

  python -m tuning.export --checkpoint=WORKDIR --format=hf --out=DIR
  python -m tuning.export --checkpoint=WORKDIR --format=peft --out=DIR
  python -m tuning.export --checkpoint=WORKDIR --format=gguf --quant=q8_0 \
      --out=DIR

`--checkpoint` is a run's work directory (its `--step` checkpoint: best by
default; the EMA parameters where the run evaluated with them) or a
converted model folder (`python -m tuning.convert`). Formats:

  hf    config.json, generation_config.json (generative models), the
        tokenizer files the run used, model.safetensors (sharded past
        --max_shard_size, with model.safetensors.index.json), for
        transformers' `from_pretrained`; LoRA adapters merged; a
        classification run's head as `*ForSequenceClassification` with its
        class names as `id2label`.
  peft  a LoRA run's adapters alone: adapter_model.safetensors and
        adapter_config.json, for `peft.PeftModel.from_pretrained(base, DIR)`.
  gguf  llama.cpp's format (Llama family), DIR/model-<quant>.gguf, with the
        tokenizer and chat template; LoRA adapters merged.

`--out` must be a new or empty folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Optional

from absl import flags
import numpy as np

from tuning.cli import flags as cli_flags
from tuning.formats import huggingface_export

PROG = 'python -m tuning.export'
FORMATS = ('hf', 'peft', 'gguf')
QUANTS = ('f32', 'f16', 'bf16', 'q8_0')
_TASK_ARCHITECTURE_SUFFIX = {
    'classification': 'ForSequenceClassification',
    'regression': 'ForSequenceClassification',
}


def define_flags(flag_values: flags.FlagValues):
  cli_flags.define_checkpoint_flags(
      flag_values, 'A converted model folder (python -m tuning.convert)'
  )
  flags.DEFINE_string(
      'format',
      None,
      f'What to write: {" | ".join(FORMATS)}.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'out',
      None,
      'A new or empty folder to write into.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'dtype',
      'float32',
      "hf/peft: the weights' dtype: float32 | bfloat16 | float16.",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'max_shard_size',
      '5GB',
      'hf: the largest safetensors file (e.g. 5GB, 500MB); larger models are '
      'sharded as model-0000i-of-0000n.safetensors.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'quant',
      'f32',
      f'gguf: tensor type {" | ".join(QUANTS)}.',
      flag_values=flag_values,
  )
  for name in ('checkpoint', 'format', 'out'):
    flags.mark_flag_as_required(name, flag_values=flag_values)


@dataclasses.dataclass
class Exportable:
  """What an export reads: the family, its parameters (LoRA adapters kept,
  see `lora`), the Hugging Face config and the tokenizer files."""

  family: Any  # models.family.Family
  params: Any  # host arrays
  hf_config: dict
  tokenizer_files: list[str]
  description: str
  task: Optional[str] = None  # None: a converted folder
  lora: Any = None  # the run's config.lora where it trained adapters
  class_names: Optional[list[str]] = None
  base_model: Optional[str] = None  # what the run started from

  def plain_params(self):
    """The parameters with LoRA adapters merged into the kernels."""
    from tuning.methods import lora as lora_lib  # pylint: disable=g-import-not-at-top

    if self.lora is None:
      return self.params
    return lora_lib.merge(self.params, self.lora)


def _tokenizer_files(folder: Optional[str]) -> list[str]:
  from tuning.formats import huggingface as hf_convert  # pylint: disable=g-import-not-at-top

  if not folder:
    return []
  if os.path.isfile(folder):  # a tokenizer.json named directly
    return [folder]
  return [
      os.path.join(folder, n)
      for n in hf_convert.TOKENIZER_FILES
      if os.path.isfile(os.path.join(folder, n))
  ]


def _from_run(workdir: str, step, fmt: Optional[str] = None) -> Exportable:
  # pylint: disable=g-import-not-at-top
  from tuning.engine.run import Run
  from tuning.methods import lora as lora_lib
  from tuning.models import hf_config as hf_config_lib
  from tuning.models import registry
  from tuning.multirun import finished_run
  # pylint: enable=g-import-not-at-top

  config = finished_run.run_config(workdir)
  family = registry.family(config.model.name)
  if fmt is not None:  # before any checkpoint is read
    require_format(family, fmt)
  pooling = config.model.get('pooling', None)
  if family.hf_model_types == ('bert',) and pooling not in (None, 'pooler'):
    raise finished_run.FinishedRunError(
        f"{workdir} classified with model.pooling={pooling!r}; transformers' "
        'BertForSequenceClassification classifies the pooler output, so only '
        "runs with model.pooling='pooler' (the default) export"
    )
  if not config.model.get('hf_config'):
    raise finished_run.FinishedRunError(
        f'{workdir} trained a {config.model.name} model without a Hugging '
        'Face config (config.model.hf_config is unset): only models started '
        'from a Hugging Face or GGUF checkpoint export'
    )
  if config.task == 'causal_lm':
    # A decoder's shapes come from its config.json: no data to build.
    params, chosen = _restore_without_data(config, workdir, step)
    num_classes = names = None
  else:  # the head's width comes from the data (the classes)
    run = Run(config, workdir)
    try:
      params, chosen = finished_run.restore_run(run, step)
    finally:
      run.checkpoints.close()
    num_classes = getattr(run.task, 'num_classes', None)
    names = run.data.class_names
  folder = config.data.get('tokenizer')
  if not folder or folder == 'whitespace':
    folder = config.init.checkpoint
  lora = config.lora if lora_lib.enabled(config.lora) else None
  return Exportable(
      family=family,
      params=params,
      hf_config=hf_config_lib.read_hf_config(config.model.hf_config),
      tokenizer_files=_tokenizer_files(folder),
      description=f'{workdir}: checkpoint step {chosen}'
      + (', EMA parameters' if config.training.evaluate_ema else '')
      + (', LoRA adapters' if lora else ''),
      task=config.task,
      lora=lora,
      class_names=(
          [str(n) for n in names]
          if names is not None
          else (
              [str(i) for i in range(num_classes)]
              if config.task == 'classification'
              else None
          )
      ),
      base_model=config.init.checkpoint or None,
  )


def _restore_without_data(config, workdir: str, step):
  """(params with LoRA adapters kept, step) of a causal_lm run."""
  # pylint: disable=g-import-not-at-top
  from tuning.models import registry
  from tuning.multirun import finished_run
  from tuning.tasks.registry import task_class
  # pylint: enable=g-import-not-at-top
  example = np.zeros((1, 8), np.int32)
  _, params, chosen = finished_run.load_model(
      workdir,
      config,
      registry.build_model(
          config.model,
          'float32',
          **task_class(config.task)(config, None).model_dims(),
      ),
      lambda model, key: model.init(
          {'params': key},
          input_ids=example,
          attention_mask=np.ones_like(example),
          train=False,
      ),
      step,
      merge_lora=False,
  )
  return params, chosen


def _from_converted(folder: str) -> Exportable:
  # pylint: disable=g-import-not-at-top
  from tuning.formats import huggingface as hf_convert
  from tuning.models import hf_config as hf_config_lib
  from tuning.models import registry
  # pylint: enable=g-import-not-at-top

  hf_config = hf_config_lib.read_hf_config(folder)
  family = registry.family_for_hf_model_type(hf_config.get('model_type'))
  return Exportable(
      family=family,
      params=hf_convert.load_converted_params(folder),
      hf_config=hf_config,
      tokenizer_files=_tokenizer_files(folder),
      description=f'{folder}: converted model',
      base_model=folder,
  )


def load(checkpoint: str, step='best', fmt: Optional[str] = None) -> Exportable:
  """What `checkpoint` (a run's work directory or a converted folder)
  exports; `fmt`: the format it must have an export for."""
  from tuning.multirun import finished_run  # pylint: disable=g-import-not-at-top

  checkpoint = os.path.abspath(os.fspath(checkpoint))
  if finished_run.is_run_workdir(checkpoint):
    return _from_run(checkpoint, step, fmt)
  if os.path.isfile(os.path.join(checkpoint, 'params', '_METADATA')) or (
      os.path.isdir(os.path.join(checkpoint, 'params'))
  ):
    item = _from_converted(checkpoint)
    if fmt is not None:
      require_format(item.family, fmt)
    return item
  raise huggingface_export.ExportError(
      f'--checkpoint={checkpoint} is neither a run work directory (main.py '
      '--workdir) nor a converted model folder (python -m tuning.convert)'
  )


def _formats_of(family) -> list[str]:
  """The formats a family exports to."""
  have = []
  if family.export_hf is not None:
    have.append('hf')
    if family.hf_linear_names is not None:
      have.append('peft')
    if 'llama' in family.hf_model_types:
      have.append('gguf')
  return have


def require_format(family, fmt: str):
  """ValueError unless `family` exports to `fmt` (naming those it has)."""
  have = _formats_of(family)
  if fmt not in have:
    raise huggingface_export.ExportError(
        f'the {"/".join(family.names)} family has no --format={fmt} '
        f'export: it exports to {", ".join(have) or "no format"}'
    )


def _hf_config_for_task(item: Exportable) -> dict:
  """The config.json the family exports with: a classification run's class
  names as id2label/label2id, a regression run's problem type."""
  hf = dict(item.hf_config)
  if item.task == 'classification':
    names = item.class_names
    hf['id2label'] = {str(i): n for i, n in enumerate(names)}
    hf['label2id'] = {n: i for i, n in enumerate(names)}
    hf['num_labels'] = len(names)
    hf['problem_type'] = 'single_label_classification'
  elif item.task == 'regression':
    hf['num_labels'] = 1
    hf['problem_type'] = 'regression'
  return hf


def export_hf(item: Exportable, out: str, dtype: str, max_shard_size: str):
  """Writes `item` as a Hugging Face folder."""

  tensors, hf_config = item.family.export_hf(
      item.plain_params(), _hf_config_for_task(item)
  )
  generative = any(
      a.endswith(
          ('ForCausalLM', 'LMHeadModel', 'ForConditionalGeneration', 'MTModel')
      )
      for a in hf_config.get('architectures', ())
  )
  return huggingface_export.write_folder(
      out,
      tensors,
      hf_config,
      dtype=dtype,
      max_shard_size=max_shard_size,
      generative=generative,
      tokenizer_files=item.tokenizer_files,
  )


def export_peft(item: Exportable, out: str, dtype: str):
  """Writes a LoRA run's adapters as a PEFT adapter folder."""
  # pylint: disable=g-import-not-at-top
  from tuning.formats import peft_export
  from tuning.methods import lora as lora_lib
  # pylint: enable=g-import-not-at-top

  if item.lora is None:
    raise huggingface_export.ExportError(
        f'{item.description} has no LoRA adapters: --format=peft writes a '
        "LoRA run's adapters (lora.rank > 0); use --format=hf for the whole "
        'model'
    )
  _, adapters = lora_lib.split(item.params)
  hf_config = _hf_config_for_task(item)
  # A run that trained its head beside the adapters (lora.train_head) saves
  # the head whole, as PEFT's modules_to_save.
  head = (
      peft_export.head_tensors(
          item.family.export_hf,
          item.plain_params(),
          hf_config,
          item.family.head_regex,
      )
      if item.lora.get('train_head', True)
      else None
  )
  return peft_export.write_adapter(
      out,
      adapters,
      item.family.hf_linear_names(hf_config),
      modules_to_save=head,
      rank=int(item.lora.rank),
      alpha=float(
          item.lora.alpha if item.lora.alpha is not None else item.lora.rank
      ),
      dropout=float(item.lora.dropout),
      task=item.task,
      base_model_name_or_path=item.base_model,
      dtype=dtype,
  )


def export_gguf(item: Exportable, out: str, quant: str):
  """Writes a Llama-family model as one GGUF file in `out`."""
  from tuning.formats import gguf_export  # pylint: disable=g-import-not-at-top

  tensors, hf_config = item.family.export_hf(
      item.plain_params(), item.hf_config
  )
  return gguf_export.write_gguf(
      out, tensors, hf_config, item.tokenizer_files, quant=quant
  )


def export(flag_values: flags.FlagValues, positional: list[str]):

  cli_flags.no_positional(positional)
  fmt = flag_values.format
  if fmt not in FORMATS:
    raise cli_flags.UsageError(
        f'--format={fmt!r}: use one of {", ".join(FORMATS)}'
    )
  if flag_values.quant not in QUANTS:
    raise cli_flags.UsageError(
        f'--quant={flag_values.quant!r}: use one of {", ".join(QUANTS)}'
    )
  try:
    huggingface_export.numpy_dtype(flag_values.dtype)
    huggingface_export.shard_size_bytes(flag_values.max_shard_size)
  except huggingface_export.ExportError as e:
    raise cli_flags.UsageError(str(e)) from None
  out = os.path.abspath(flag_values.out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise huggingface_export.ExportError(
        f'--out={out} exists and is not an empty folder: give a new or empty '
        'folder'
    )
  start = time.perf_counter()
  item = load(
      flag_values.checkpoint, cli_flags.parse_step(flag_values.step), fmt
  )
  print(f'Exporting {item.description} as --format={fmt}.', file=sys.stderr)
  if fmt == 'hf':
    export_hf(item, out, flag_values.dtype, flag_values.max_shard_size)
  elif fmt == 'peft':
    export_peft(item, out, flag_values.dtype)
  else:
    export_gguf(item, out, flag_values.quant)
  files = sorted(os.listdir(out))
  size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
  print(
      f'Wrote {out}: {", ".join(files)} ({size / 2**20:.1f} MiB) in '
      f'{time.perf_counter() - start:.1f} s.'
  )


def main(argv=None) -> int:
  """The command; `argv`: its arguments (None: sys.argv[1:])."""
  return cli_flags.run(PROG, __doc__, define_flags, export, argv)


if __name__ == '__main__':
  sys.exit(main())
