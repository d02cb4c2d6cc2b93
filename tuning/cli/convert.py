"""Convert a Hugging Face or GGUF checkpoint into this project's Flax/orbax
format.

The supported Hugging Face model types are those of the model families that
convert (tuning/models/registry.py: bert, gpt2, llama, marian, t5); a .gguf
file (llama.cpp) is dequantised by tuning/formats/gguf.py.

    python -m tuning.convert --source=<HF folder, hub id or .gguf file> --out=<dir>
"""

import sys

from absl import flags

from tuning.cli import flags as cli_flags
from tuning.formats import gguf as gguf_checkpoint
from tuning.formats import huggingface as hf_convert

PROG = 'python -m tuning.convert'


def define_flags(flag_values: flags.FlagValues):
  flags.DEFINE_string(
      'source',
      None,
      'HF model folder (config.json + model.safetensors), hub id, or a .gguf '
      'file.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'out',
      None,
      'Output folder (params/, config.json, tokenizer files).',
      flag_values=flag_values,
  )
  for name in ('source', 'out'):
    flags.mark_flag_as_required(name, flag_values=flag_values)


def convert(flag_values: flags.FlagValues, positional: list[str]):
  cli_flags.no_positional(positional)
  if gguf_checkpoint.is_gguf_file(flag_values.source):
    gguf_checkpoint.convert(flag_values.source, flag_values.out)
  else:
    hf_convert.convert(flag_values.source, flag_values.out)


def main(argv=None) -> int:
  """The command; `argv`: its arguments (None: sys.argv[1:])."""
  return cli_flags.run(PROG, __doc__, define_flags, convert, argv)


if __name__ == '__main__':
  sys.exit(main())
