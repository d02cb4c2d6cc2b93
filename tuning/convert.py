"""Convert a Hugging Face checkpoint into this project's Flax/orbax format.

The supported model types are those of the model families that convert
(tuning/models/registry.py; today BERT).

    python -m tuning.convert --source=<HF folder or hub id> --out=<dir>
"""

import argparse
import sys

from tuning import hf_convert


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      '--source',
      required=True,
      help='HF model folder (config.json + model.safetensors) or hub id.',
  )
  parser.add_argument(
      '--out',
      required=True,
      help='Output folder (params/, config.json, tokenizer files).',
  )
  args = parser.parse_args(argv)
  try:
    hf_convert.convert(args.source, args.out)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
