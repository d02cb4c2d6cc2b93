"""Translate sentences with an encoder-decoder checkpoint (Marian or T5).

  python -m tuning.translate --checkpoint=DIR --input=src.de --output=out.en
  echo 'ein Hund läuft' | python -m tuning.translate --checkpoint=DIR

`--checkpoint` is either a converted Hugging Face Marian/T5 folder
(`python -m tuning.convert`: params/, config.json, tokenizer.json) or the
work directory of a trained seq2seq run (config.json, checkpoints/, and the
tokenizer its `config.data.tokenizer` names, by default WORKDIR/tokenizer.json;
a soup work directory too). `--step` picks a run's checkpoint: best (the
default), latest or a step number. The input holds one sentence a line
(stdin without `--input`); the output has one translation a line, in the
same order (stdout without `--output`); an empty line stays empty. Sentences
are batched by length and decoded on the device by beam search (greedy at
`--beam_size=1`) with up to floor(max_length_offset + max_length_ratio *
source tokens) new tokens each; progress and the decoding speed go to
stderr.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

from absl import flags
import jax
import numpy as np

from tuning.cli import flags as cli_flags
from tuning.methods import lora as lora_lib
from tuning.multirun import finished_run
from tuning.decoding import translation
from tuning.models import encoder_decoder as ed
from tuning.models import encoder_decoder_hf
from tuning.models import hf_config as hf_config_lib
from tuning.models import registry


@dataclasses.dataclass
class Translator:
  """A loaded model: what `translation.translate` needs, and its origin."""

  model: ed.EncoderDecoder
  params: Any
  tokenizer: Any  # tokenizers.Tokenizer
  description: str

  def translate(self, sources, **options) -> translation.Translations:
    return translation.translate(
        self.model, self.params, self.tokenizer, sources, **options
    )


def _tokenizer(path: str):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'{path} is not a readable tokenizer.json ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}): give the tokenizer '
        'the model was trained with'
    ) from None


def _restore(path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.PyTreeCheckpointer().restore(os.path.abspath(path))


def load_converted(folder: str, dtype: str = 'float32') -> Translator:
  """A converted Hugging Face Marian/T5 folder."""
  hf_config = hf_config_lib.read_hf_config(folder)
  model_type = hf_config.get('model_type')
  if model_type not in encoder_decoder_hf.FAMILY.hf_model_types:
    raise ValueError(
        f'{folder} holds a converted {model_type!r} model: translation needs '
        "an encoder-decoder ('marian' or 't5')"
    )
  tokenizer_file = os.path.join(folder, 'tokenizer.json')
  if not os.path.isfile(tokenizer_file):
    raise ValueError(
        f'{tokenizer_file} not found: this converted folder has no '
        'tokenizer.json (Marian folders ship SentencePiece files only); '
        'put the tokenizer.json of the model beside params/'
    )
  import ml_collections  # pylint: disable=g-import-not-at-top

  model = encoder_decoder_hf.build(
      ml_collections.ConfigDict({'hf_config': folder}), jax.numpy.dtype(dtype)
  )
  params = _restore(os.path.join(folder, 'params'))
  return Translator(
      model, params, _tokenizer(tokenizer_file), f'converted model {folder}'
  )


def run_tokenizer_path(config, workdir: str) -> str:
  """The tokenizer.json of a seq2seq run: `config.data.tokenizer` (a file or
  a folder holding one; relative paths from the current directory, else
  from the work directory), else WORKDIR/tokenizer.json."""
  candidates = []
  named = config.data.tokenizer
  if named and named != 'whitespace':
    for base in ('', workdir):
      path = os.path.join(base, named)
      candidates.append(
          os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
      )
  candidates.append(os.path.join(workdir, 'tokenizer.json'))
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise ValueError(
      f'no tokenizer for the run {workdir}: looked for '
      f'{", ".join(dict.fromkeys(candidates))}; the seq2seq task writes '
      'WORKDIR/tokenizer.json (copy the tokenizer the run used there)'
  )


def load_run(workdir: str, step='best', dtype: str = 'float32') -> Translator:
  """The chosen checkpoint of a seq2seq run (or soup) work directory: the
  one loader of finished runs (EMA parameters where the run evaluated with
  them, LoRA adapters merged)."""
  which = cli_flags.parse_step(step)
  config = finished_run.run_config(workdir)
  if registry.family(config.model.name) is not encoder_decoder_hf.FAMILY:
    raise ValueError(
        f'the run {workdir} trained config.model.name='
        f'{config.model.name!r}: translation needs an encoder-decoder '
        f'({", ".join(encoder_decoder_hf.FAMILY.names)})'
    )
  tokenizer = _tokenizer(run_tokenizer_path(config, workdir))
  ids = np.zeros((1, 2), np.int32)
  model, params, chosen = finished_run.load_model(
      workdir,
      config,
      registry.build_model(
          config.model, dtype, vocab_size=tokenizer.get_vocab_size()
      ),
      lambda model, key: model.init(key, ids, ids, ids),
      which,
  )
  what = f'{os.path.join(workdir, "checkpoints")} step {chosen}'
  if config.training.evaluate_ema:
    what += ' (EMA)'
  if lora_lib.enabled(config.lora):
    what += ' (LoRA merged)'
  return Translator(model, params, tokenizer, what)


def load(checkpoint: str, step=None, dtype: str = 'float32') -> Translator:
  """A converted folder or a run work directory (see the module doc)."""
  checkpoint = os.fspath(checkpoint)
  if not os.path.isdir(checkpoint):
    raise ValueError(
        f'--checkpoint={checkpoint!r} is not a folder: give a converted '
        'Marian/T5 folder or a seq2seq run work directory'
    )
  if os.path.isdir(os.path.join(checkpoint, 'params')) and not (
      finished_run.is_run_workdir(checkpoint)
  ):
    if step not in (None, 'best'):
      raise ValueError(
          '--step applies to run work directories; a converted folder has '
          'one set of parameters'
      )
    return load_converted(checkpoint, dtype)
  if finished_run.is_run_workdir(checkpoint):
    return load_run(checkpoint, step or 'best', dtype)
  raise ValueError(
      f'{checkpoint} is neither a converted model folder (params/, '
      'config.json, tokenizer.json; python -m tuning.convert) nor a run '
      'work directory (config.json, checkpoints/)'
  )


def _read_lines(path: Optional[str]) -> list[str]:
  if path is None:
    return sys.stdin.read().splitlines()
  if not os.path.isfile(path):
    raise ValueError(f'--input file not found: {path!r}')
  with open(path, encoding='utf-8') as f:
    return f.read().splitlines()


def run(
    checkpoint: str,
    input_file: Optional[str] = None,
    output_file: Optional[str] = None,
    *,
    step=None,
    dtype: str = 'float32',
    progress: bool = True,
    **options,
) -> translation.Translations:
  """The command without flags: loads, translates, writes; returns the
  translations of the non-empty lines."""
  options = translation.DecodeOptions(**options)  # bad values fail first
  lines = _read_lines(input_file)
  translator = load(checkpoint, step, dtype)
  print(f'translating with {translator.description}', file=sys.stderr)
  keep = [i for i, line in enumerate(lines) if line.strip()]
  result = translator.translate(
      [lines[i] for i in keep], progress=progress, **dataclasses.asdict(options)
  )
  outputs = [''] * len(lines)
  for i, text in zip(keep, result.texts):
    outputs[i] = ' '.join(text.splitlines())  # one line per source
  text = ''.join(line + '\n' for line in outputs)
  if output_file:
    with open(output_file, 'w', encoding='utf-8') as f:
      f.write(text)
  else:
    sys.stdout.write(text)
    sys.stdout.flush()
  s = result.stats
  cut = f'; {s["cut_sources"]} sources cut to the model length' * bool(
      s['cut_sources']
  )
  print(
      f'translated {s["sentences"]} sentences ({s["target_tokens"]} tokens) '
      f'in {s["seconds"]:.1f} s of decoding: {s["sentences_per_s"]:.1f} '
      f'sentences/s, {s["tokens_per_s"]:.0f} tokens/s (compilation '
      f'included; {len(s["source_lengths"])} source lengths){cut}'
      + (f'; written to {output_file}' if output_file else ''),
      file=sys.stderr,
  )
  return result


PROG = 'python -m tuning.translate'


def define_flags(fv: flags.FlagValues):
  cli_flags.define_checkpoint_flags(
      fv, 'A converted Marian/T5 folder (python -m tuning.convert)'
  )
  flags.DEFINE_string(
      'input',
      None,
      'Source file, one sentence a line (default: stdin).',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'output', None, 'Output file (default: stdout).', flag_values=fv
  )
  flags.DEFINE_integer('beam_size', 4, 'Beams (1: greedy).', flag_values=fv)
  flags.DEFINE_float(
      'length_penalty',
      1.0,
      'Exponent of the length normalizer.',
      flag_values=fv,
  )
  flags.DEFINE_enum(
      'penalty_rule',
      'transformers',
      ['transformers', 'gnmt'],
      'length ** p (transformers) or ((5 + length) / 6) ** p (GNMT).',
      flag_values=fv,
  )
  flags.DEFINE_enum(
      'early_stopping',
      'false',
      ['false', 'true', 'never'],
      "Beam stopping rule, as transformers' early_stopping.",
      flag_values=fv,
  )
  flags.DEFINE_float(
      'max_length_ratio',
      1.5,
      'a in: new tokens <= a * source tokens + b.',
      flag_values=fv,
  )
  flags.DEFINE_integer(
      'max_length_offset',
      10,
      'b in: new tokens <= a * source tokens + b.',
      flag_values=fv,
  )
  flags.DEFINE_integer('batch_size', 32, 'Sentences per batch.', flag_values=fv)
  flags.DEFINE_enum(
      'dtype',
      'float32',
      ['float32', 'bfloat16'],
      'Compute dtype.',
      flag_values=fv,
  )
  flags.DEFINE_bool(
      'progress',
      True,
      'Show a progress bar (--noprogress: none).',
      flag_values=fv,
  )


def translate(fv: flags.FlagValues, positional: list[str]):
  """The command, its flags parsed."""
  cli_flags.no_positional(positional)
  if not fv.checkpoint:
    raise ValueError(
        '--checkpoint is required: a converted Marian/T5 folder or a '
        'seq2seq run work directory'
    )
  run(
      fv.checkpoint,
      fv.input,
      fv.output,
      step=fv.step,
      dtype=fv.dtype,
      progress=fv.progress,
      beam_size=fv.beam_size,
      length_penalty=fv.length_penalty,
      penalty_rule=fv.penalty_rule,
      early_stopping={'false': False, 'true': True}.get(
          fv.early_stopping, fv.early_stopping
      ),
      max_length_ratio=fv.max_length_ratio,
      max_length_offset=fv.max_length_offset,
      batch_size=fv.batch_size,
  )


def main(argv=None) -> int:
  """The command; `argv`: its arguments (None: sys.argv[1:])."""
  return cli_flags.run(PROG, __doc__, define_flags, translate, argv)


if __name__ == '__main__':
  sys.exit(main())
