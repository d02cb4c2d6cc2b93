"""Generate text with a decoder checkpoint (GPT-2 or Llama).

  python -m tuning.generate --checkpoint=DIR --prompt='The capital of France is'
  python -m tuning.generate --checkpoint=DIR --prompts=FILE --output=OUT.jsonl

`--checkpoint` is a converted model folder (params/, config.json,
tokenizer.json, optionally tokenizer_config.json with a chat template), a
.gguf file, read directly, or the work directory of a causal_lm run
(`main.py --workdir`; a stage's, for a multi-stage experiment): its best
checkpoint (`--step=latest` or a step number for another), LoRA adapters
merged, with the model config and tokenizer its config names
(`model.hf_config`; `data.tokenizer`, else `init.checkpoint`).
`--prompts` holds one prompt a line; the results are written as JSONL
({"prompt", "completion", "new_tokens"}), to stdout without `--output`.
When the model has a chat template each prompt becomes one user message
(`--nochat` sends the raw text). Generation stops at the model's
end-of-sequence tokens or after `--max_new_tokens`; temperature 0 is greedy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

from absl import flags
import numpy as np

from tuning.cli import flags as cli_flags
from tuning.data import chat_template
from tuning.terminal import console
from tuning.decoding import sampling as generation
from tuning.multirun import finished_run

PROG = 'python -m tuning.generate'


def define_flags(fv: flags.FlagValues):
  cli_flags.define_checkpoint_flags(
      fv, 'A converted model folder (python -m tuning.convert), a .gguf file'
  )
  flags.DEFINE_string('prompt', None, 'One prompt.', flag_values=fv)
  flags.DEFINE_string(
      'prompts', None, 'File with one prompt a line.', flag_values=fv
  )
  flags.DEFINE_string('output', None, 'JSONL output file.', flag_values=fv)
  flags.DEFINE_integer(
      'max_new_tokens', 64, 'Most new tokens per prompt.', flag_values=fv
  )
  flags.DEFINE_float('temperature', 0.0, '0: greedy.', flag_values=fv)
  flags.DEFINE_integer(
      'top_k',
      0,
      'Sample from the k most likely tokens (0: all).',
      flag_values=fv,
  )
  flags.DEFINE_float(
      'top_p', 1.0, 'Nucleus sampling mass (1: all).', flag_values=fv
  )
  flags.DEFINE_integer('seed', 0, 'Sampling seed.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 8, 'Prompts per batch.', flag_values=fv)
  flags.DEFINE_bool(
      'chat',
      True,
      'Apply the chat template if the model has one.',
      flag_values=fv,
  )
  flags.DEFINE_enum(
      'dtype',
      'float32',
      ['float32', 'bfloat16'],
      'Compute dtype.',
      flag_values=fv,
  )


# Prompt lengths are padded to a multiple of this: fewer compilations.
_LENGTH_BUCKET = 16


@dataclasses.dataclass
class LoadedModel:
  model: Any  # decoder.DecoderLM
  params: Any
  tokenizer: Any  # tokenizers.Tokenizer
  tokenizer_config: dict
  hf_config: dict

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    stops = set(self.model.config.eos_token_ids)
    eos = self.tokenizer_config.get('eos_token')
    if isinstance(eos, dict):
      eos = eos.get('content')
    if eos and self.tokenizer.token_to_id(eos) is not None:
      stops.add(self.tokenizer.token_to_id(eos))
    return tuple(sorted(stops))

  @property
  def pad_id(self) -> int:
    cfg = self.model.config
    for candidate in (cfg.pad_token_id, *cfg.eos_token_ids):
      if candidate is not None:
        return int(candidate)
    return 0


DECODER_TASKS = ('causal_lm', 'preference')  # runs whose model is a decoder


def _load_run(workdir: str, step: str, dtype: str) -> LoadedModel:
  """A causal_lm (or preference) run's checkpoint, tokenizer and model
  config."""
  # pylint: disable=g-import-not-at-top
  from tuning.data import tokenization
  from tuning.models import hf_config as hf_config_lib
  from tuning.models import registry
  from tuning.tasks.registry import task_class
  # pylint: enable=g-import-not-at-top
  which = cli_flags.parse_step(step)
  config = finished_run.run_config(workdir)
  if config.task not in DECODER_TASKS:
    raise finished_run.FinishedRunError(
        f'{workdir} is a {config.task} run: generation needs a '
        'decoder run (config.task=causal_lm or preference)'
    )
  task = task_class(config.task)(config, None)
  example = np.zeros((1, 8), np.int32)
  model, params, chosen = finished_run.load_model(
      workdir,
      config,
      registry.build_model(config.model, dtype, **task.model_dims()),
      lambda model, key: model.init(
          {'params': key},
          input_ids=example,
          attention_mask=np.ones_like(example),
          train=False,
      ),
      which,
  )
  folder = config.data.tokenizer
  if not folder or folder == 'whitespace':
    folder = config.init.checkpoint
  if not folder or not os.path.exists(folder):
    raise ValueError(
        f'the tokenizer of {workdir} is not found: its config names '
        f'data.tokenizer={config.data.tokenizer!r} (init.checkpoint='
        f'{config.init.checkpoint!r}); run from the directory the run was '
        'trained in, or restore that folder'
    )
  tokenizer_folder = (
      folder if os.path.isdir(folder) else os.path.dirname(folder)
  )
  tokenizer_config = {}
  config_file = os.path.join(tokenizer_folder, 'tokenizer_config.json')
  if os.path.isfile(config_file):
    with open(config_file, encoding='utf-8') as f:
      tokenizer_config = json.load(f)
  print(  # stderr: stdout holds only the completions
      f'{workdir}: checkpoint step {chosen}'
      + (' (LoRA adapters merged)' if config.lora.rank else ''),
      file=sys.stderr,
  )
  return LoadedModel(
      model,
      params,
      tokenization.load_tokenizer(folder),
      tokenizer_config,
      hf_config_lib.read_hf_config(config.model.hf_config),
  )


def load(
    checkpoint: str, dtype: str = 'float32', step: str = 'best'
) -> LoadedModel:
  """The model, params and tokenizer of a converted folder, a .gguf file
  or a causal_lm run's work directory (its `step` checkpoint)."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer

  from tuning.models import decoder_hf
  # pylint: enable=g-import-not-at-top
  checkpoint = os.fspath(checkpoint)
  if finished_run.is_run_workdir(checkpoint):
    return _load_run(checkpoint, step, dtype)
  if checkpoint.endswith('.gguf'):
    from tuning.formats import gguf as gguf_checkpoint  # pylint: disable=g-import-not-at-top

    read = gguf_checkpoint.read(checkpoint)
    params, _ = decoder_hf.convert_hf(read.tensors, read.hf_config)
    model = decoder_hf.from_hf_config(read.hf_config, dtype)
    return LoadedModel(
        model, params, read.tokenizer, read.tokenizer_config, read.hf_config
    )
  params_dir = os.path.join(checkpoint, 'params')
  tokenizer_file = os.path.join(checkpoint, 'tokenizer.json')
  for needed in (params_dir, tokenizer_file):
    if not os.path.exists(needed):
      raise ValueError(
          f'{needed} not found: --checkpoint must be a '
          'converted model folder (python -m tuning.convert), '
          "a .gguf file or a causal_lm run's work directory"
      )
  hf_config = decoder_hf.read_hf_config(checkpoint)
  model = decoder_hf.from_hf_config(hf_config, dtype)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  params = ocp.PyTreeCheckpointer().restore(os.path.abspath(params_dir))
  tokenizer_config = {}
  config_file = os.path.join(checkpoint, 'tokenizer_config.json')
  if os.path.isfile(config_file):
    with open(config_file) as f:
      tokenizer_config = json.load(f)
  return LoadedModel(
      model,
      params,
      Tokenizer.from_file(tokenizer_file),
      tokenizer_config,
      hf_config,
  )


def prompt_ids(loaded: LoadedModel, prompt: str, chat: bool) -> list[int]:
  """Token ids of a prompt, through the chat template when `chat`."""
  template = loaded.tokenizer_config.get('chat_template')
  if chat and template:
    special = {
        k: v
        for k, v in loaded.tokenizer_config.items()
        if k.endswith('_token') and isinstance(v, str)
    }
    text = chat_template.render(
        template,
        [{'role': 'user', 'content': prompt}],
        add_generation_prompt=True,
        **special,
    )
    # The template writes the special tokens itself, as transformers'
    # apply_chat_template assumes.
    return loaded.tokenizer.encode(text, add_special_tokens=False).ids
  return loaded.tokenizer.encode(prompt).ids


def complete(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool = True,
) -> list[dict]:
  """Continues each prompt; one dict per prompt (see the module doc)."""
  results = []
  stops = loaded.stop_tokens
  for start in range(0, len(prompts), batch_size):
    batch = prompts[start : start + batch_size]
    encoded = [prompt_ids(loaded, p, chat) for p in batch]
    if not all(encoded):
      raise ValueError('a prompt is empty after tokenization: give text')
    longest = max(map(len, encoded))
    length = -(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET
    ids = np.full((len(batch), length), loaded.pad_id, np.int32)
    mask = np.zeros((len(batch), length), np.int32)
    for row, tokens in enumerate(encoded):
      ids[row, length - len(tokens) :] = tokens
      mask[row, length - len(tokens) :] = 1
    out = generation.generate(
        loaded.model,
        loaded.params,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stops,
        pad_id=loaded.pad_id,
        seed=seed + start,
    )
    for row, prompt in enumerate(batch):
      new = out.tokens[row, : out.lengths[row]].tolist()
      text = [t for t in new if t not in stops]
      results.append(
          {
              'prompt': prompt,
              'completion': loaded.tokenizer.decode(text),
              'new_tokens': len(new),
          }
      )
  return results


def _read_prompts(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise ValueError(f'--prompts file not found: {path!r}')
  with open(path, encoding='utf-8') as f:
    prompts = [line.rstrip('\n') for line in f if line.strip()]
  if not prompts:
    raise ValueError(f'--prompts file {path!r} has no prompts')
  return prompts


def run(
    checkpoint: str,
    prompt: Optional[str],
    prompts_file: Optional[str],
    output: Optional[str],
    **options,
) -> list[dict]:
  """The command without flags: loads, generates, prints or writes."""
  if bool(prompt) == bool(prompts_file):
    raise ValueError('give exactly one of --prompt and --prompts')
  dtype = options.pop('dtype', 'float32')
  step = options.pop('step', 'best')
  prompts = [prompt] if prompt else _read_prompts(prompts_file)
  loaded = load(checkpoint, dtype, step)
  results = complete(loaded, prompts, **options)
  if prompt and not output:
    print(results[0]['completion'])
  else:
    lines = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in results)
    if output:
      with open(output, 'w', encoding='utf-8') as f:
        f.write(lines)
      console.info(f'{len(results)} completions written to {output}')
    else:
      sys.stdout.write(lines)
  return results


def generate(fv: flags.FlagValues, positional: list[str]):
  """The command, its flags parsed."""
  cli_flags.no_positional(positional)
  if not fv.checkpoint:
    raise ValueError(
        '--checkpoint is required: a converted model folder, '
        "a .gguf file or a causal_lm run's work directory"
    )
  run(
      fv.checkpoint,
      fv.prompt,
      fv.prompts,
      fv.output,
      max_new_tokens=fv.max_new_tokens,
      temperature=fv.temperature,
      top_k=fv.top_k,
      top_p=fv.top_p,
      seed=fv.seed,
      batch_size=fv.batch_size,
      chat=fv.chat,
      dtype=fv.dtype,
      step=fv.step,
  )


def main(argv=None) -> int:
  """The command; `argv`: its arguments (None: sys.argv[1:])."""
  return cli_flags.run(PROG, __doc__, define_flags, generate, argv)


if __name__ == '__main__':
  sys.exit(main())
