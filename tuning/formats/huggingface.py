"""Convert Hugging Face checkpoints (safetensors) into Flax params saved with
orbax.

The checkpoint's config.json `model_type` chooses the model family
(tuning/models/registry.py) whose `convert_hf` maps the tensor names; this
module only reads and writes files. A converted folder holds:

    <out>/params        orbax checkpoint of the family's params tree (BERT:
                        `bert/...`, plus `classifier/...` when the source
                        has a head)
    <out>/config.json   the Hugging Face config
    <out>/tokenizer.json, vocab.txt, tokenizer_config.json, ...
                        (the TOKENIZER_FILES the source has)
    <out>/conversion.json   what was converted from where (written last:
                            marks completion)

Only safetensors weights are read: pickled `pytorch_model.bin` files are
refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from tuning.models import registry
from tuning.models.family import Family
from tuning.models.hf_config import read_hf_config

# Tokenizer files copied beside the params (whichever the source has):
# WordPiece (BERT), byte-level BPE (GPT-2), SentencePiece (T5, Marian).
TOKENIZER_FILES = (
    'tokenizer.json',
    'vocab.txt',
    'tokenizer_config.json',
    'special_tokens_map.json',
    'added_tokens.json',
    'vocab.json',
    'merges.txt',
    'spiece.model',
    'source.spm',
    'target.spm',
)
_MARKER = 'conversion.json'


class ConversionError(ValueError):
  """Raised when a checkpoint cannot be converted (message says why)."""


def _safetensors_files(folder: str) -> list[str]:
  single = os.path.join(folder, 'model.safetensors')
  index = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(folder, s) for s in shards]
  pickles = [
      f
      for f in ('pytorch_model.bin', 'tf_model.h5', 'flax_model.msgpack')
      if os.path.isfile(os.path.join(folder, f))
  ]
  if pickles:
    raise ConversionError(
        f'{folder} has {", ".join(pickles)} but no model.safetensors; we do '
        'not load pickled/non-safetensors weights. Convert it first, e.g. in '
        'PyTorch: AutoModel.from_pretrained(folder).save_pretrained(out, '
        'safe_serialization=True).'
    )
  raise ConversionError(f'No model.safetensors found in {folder}.')


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a HF folder's safetensors file(s) as float32/int numpy
  arrays."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  tensors: dict[str, np.ndarray] = {}
  for file in _safetensors_files(folder):
    # The 'flax' framework reads bfloat16/float16 too; everything float
    # becomes float32.
    try:
      with safe_open(file, framework='flax') as f:
        for key in f.keys():
          arr = np.asarray(f.get_tensor(key))
          if (
              np.issubdtype(arr.dtype, np.floating)
              or arr.dtype.name == 'bfloat16'
          ):
            arr = arr.astype(np.float32)
          tensors[key] = arr
    except Exception as e:  # pylint: disable=broad-except
      # SafetensorError and friends: a truncated or corrupt file.
      raise ConversionError(
          f'{file} is not a readable safetensors file '
          f'({type(e).__name__}: {e}); download it '
          'again'
      ) from None
  return tensors


def _family(hf_config: dict) -> Family:
  """The family whose `convert_hf` reads checkpoints of this config's
  `model_type`."""
  try:
    return registry.family_for_hf_model_type(hf_config.get('model_type'))
  except ValueError as e:
    raise ConversionError(str(e)) from None


def convert_tensors(
    tensors: dict[str, np.ndarray], hf_config: dict
) -> tuple[dict, dict[str, Any]]:
  """Maps HF-named tensors onto a params tree with the converter of the
  family that `hf_config['model_type']` names.

  Returns `(params, summary)` as the family's `convert_hf` does (`converted`,
  `left_out`, optional `notes` lines and family-specific entries); raises
  ConversionError naming an unsupported model type or whatever the family's
  converter rejects.
  """
  family = _family(hf_config)
  try:
    return family.convert_hf(tensors, hf_config)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def resolve_source(source: str) -> str:
  """A local folder as is; otherwise a hub id fetched with
  `snapshot_download`."""
  if os.path.isdir(source):
    return source
  if os.path.exists(source):
    raise ConversionError(
        f'Source {source!r} is a file; give the model folder (config.json + '
        'model.safetensors).'
    )
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top

    return snapshot_download(
        source,
        allow_patterns=[
            'config.json',
            '*.safetensors',
            'model.safetensors.index.json',
            *TOKENIZER_FILES,
        ],
    )
  except Exception as e:  # noqa: BLE001 - re-raised with context
    first_line = str(e).splitlines()[0] if str(e) else ''
    raise ConversionError(
        f'{source!r} is not a local folder and downloading it from the '
        f'Hugging Face hub failed ({type(e).__name__}: {first_line}). '
        'Offline? Pass a local folder holding config.json and '
        'model.safetensors instead.'
    ) from e


def convert(source: str, out_dir: str, verbose: bool = True) -> dict[str, Any]:
  """Converts a HF folder or hub id into `out_dir` (must not exist yet).

  Returns the summary.
  """
  folder = resolve_source(source)
  try:
    hf_config = read_hf_config(folder)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  _family(hf_config)  # an unsupported model type fails before reading weights
  params, summary = convert_tensors(read_safetensors(folder), hf_config)

  copied = [
      n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))
  ]
  summary = dict(summary, source=str(source), tokenizer_files=copied)
  write_folder(
      out_dir,
      params,
      hf_config,
      summary,
      copies={n: os.path.join(folder, n) for n in copied},
  )
  if verbose:
    print(format_summary(summary, out_dir))
  return summary


def write_folder(
    out_dir: str,
    params,
    hf_config: dict,
    summary: dict,
    files: dict[str, str] | None = None,
    copies: dict[str, str] | None = None,
) -> None:
  """Writes a converted folder: params (orbax), config.json, `files`
  ({name: text}) and `copies` ({name: source path}), then the marker
  `conversion.json` (`summary`), last, which marks it complete."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, 'params')):
    raise ConversionError(
        f'{out_dir}/params already exists; choose a new --out folder.'
    )
  os.makedirs(out_dir, exist_ok=True)
  ocp.PyTreeCheckpointer().save(os.path.join(out_dir, 'params'), params)
  with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config, f, indent=2)
  for name, text in (files or {}).items():
    with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
      f.write(text)
  for name, path in (copies or {}).items():
    shutil.copyfile(path, os.path.join(out_dir, name))
  with open(os.path.join(out_dir, _MARKER), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)


def convert_once(key: str, name: str, cache_dir: str, convert_into) -> str:
  """`cache_dir/<name>-<hash of key>`, made by `convert_into(out_dir)`
  unless a complete one is there: converted into a temporary folder and
  moved into place, so an interrupted conversion is never taken for one."""
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  out_dir = os.path.join(os.path.abspath(cache_dir), f'{name}-{digest}')
  if os.path.isfile(os.path.join(out_dir, _MARKER)):
    return out_dir
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.converting-', dir=cache_dir)
  try:
    convert_into(os.path.join(tmp, 'out'))
    if os.path.exists(out_dir):  # an incomplete earlier attempt
      shutil.rmtree(out_dir)
    os.replace(os.path.join(tmp, 'out'), out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def format_summary(summary: dict[str, Any], out_dir: str) -> str:
  """The printed account of a conversion: counts, what was left out, the
  family's notes and the tokenizer files."""
  lines = [
      f'Converted {summary["converted"]} tensors from '
      f'{summary["source"]} into {out_dir}.'
  ]
  if summary['left_out']:
    lines.append(
        f'Left out {len(summary["left_out"])} tensors: '
        + ', '.join(
            f'{n} ({r})' for n, r in sorted(summary['left_out'].items())
        )
    )
  lines.extend(summary.get('notes', ()))
  lines.append(
      'Tokenizer files: ' + (', '.join(summary['tokenizer_files']) or 'none')
  )
  return '\n'.join(lines)


def load_converted_params(out_dir: str) -> dict:
  """The params tree (numpy arrays) saved by `convert` in `out_dir`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.abspath(out_dir), 'params')
  if not os.path.isdir(path):
    raise ValueError(
        f'No converted params at {path}; run `python -m '
        'tuning.cli.convert` first.'
    )
  return ocp.PyTreeCheckpointer().restore(path)


def ensure_converted(source: str, cache_dir: str, verbose: bool = True) -> str:
  """Returns a converted folder for `source`, converting into `cache_dir`
  only once.

  A source that already is a converted folder is returned as is. The cache
  key is the source's absolute path (or hub id); delete the cached folder
  after changing a source in place.
  """
  if os.path.isfile(os.path.join(source, _MARKER)):
    return source
  key = os.path.abspath(source) if os.path.isdir(source) else source
  slug = re.sub(r'[^A-Za-z0-9._-]+', '_', key.strip('/'))[-60:]
  cached = os.path.join(
      os.path.abspath(cache_dir),
      f'{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}',
  )
  if verbose and os.path.isfile(os.path.join(cached, _MARKER)):
    print(f'Using converted checkpoint {cached} for {source}.')
  return convert_once(
      key, slug, cache_dir, lambda out: convert(source, out, verbose=verbose)
  )
