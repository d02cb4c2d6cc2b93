"""Convert a Hugging Face or GGUF checkpoint into this project's Flax/orbax
format.

The supported Hugging Face model types are those of the model families that
convert (tuning/models/registry.py: bert, gpt2, llama, marian, t5); a .gguf
file (llama.cpp) is dequantised by tuning/formats/gguf.py.

    python -m tuning.convert --source=<HF folder, hub id or .gguf file> --out=<dir>
"""

import argparse
import sys

from tuning.formats import gguf as gguf_checkpoint
from tuning.formats import huggingface as hf_convert


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      '--source',
      required=True,
      help=(
          'HF model folder (config.json + model.safetensors), hub id, or '
          'a .gguf file.'
      ),
  )
  parser.add_argument(
      '--out',
      required=True,
      help='Output folder (params/, config.json, tokenizer files).',
  )
  args = parser.parse_args(argv)
  try:
    if gguf_checkpoint.is_gguf_file(args.source):
      gguf_checkpoint.convert(args.source, args.out)
    else:
      hf_convert.convert(args.source, args.out)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
