"""Reading a Hugging Face `config.json` (shared by the families and by
tuning/formats/huggingface.py)."""

import json
import os


def read_hf_config(path: str) -> dict:
  """Reads `config.json` from a file path or from a folder that holds one."""
  path = os.fspath(path)
  file = os.path.join(path, 'config.json') if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(
        f'Hugging Face config not found: {file!r} (expected a config.json '
        'file, or a folder holding one, e.g. a Hugging Face model folder or '
        'a converted checkpoint).'
    )
  with open(file, encoding='utf-8') as f:
    return json.load(f)
