"""Writing a Hugging Face model folder, as transformers' `save_pretrained`
writes one.

`write_folder(out_dir, tensors, hf_config, ...)` writes

    config.json                 the model's config (its `architectures`, the
                                weights' dtype as `torch_dtype`/`dtype`)
    generation_config.json      for generative models (bos/eos/pad ids)
    model.safetensors           or, past `max_shard_size`,
    model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, ...   the tokenizer files given

The shards are cut by huggingface_hub's
`split_state_dict_into_shards_factory` (what transformers'
`split_torch_state_dict_into_shards` calls), tensors in the order given,
each file's metadata `{"format": "pt"}` (what transformers checks for); the
index has transformers' `total_parameters` and `total_size`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Iterable

import numpy as np

DTYPES = ('float32', 'bfloat16', 'float16')


class ExportError(ValueError):
  """An export that cannot be written (the message says why and the fix)."""


def numpy_dtype(name: str):
  """The numpy dtype of an export --dtype name."""
  if name not in DTYPES:
    raise ExportError(f'--dtype={name!r}: use one of {", ".join(DTYPES)}')
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


_SIZE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*(TB|GB|MB|KB|B)?\s*$', re.IGNORECASE)
# Decimal units, as transformers' max_shard_size reads them.
_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12}


def shard_size_bytes(value: str | int) -> int:
  """An export --max_shard_size (5GB, 500MB, or bytes) in bytes."""
  match = _SIZE.match(str(value))
  size = 0
  if match:
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or '').upper()])
  if size <= 0:
    raise ExportError(
        f'--max_shard_size={value!r}: give a size such as 5GB or 500MB'
    )
  return size


def with_default_permissions(path: str) -> None:
  """Gives a file the permissions of any new file (0666 less the umask):
  safetensors writes its files readable by their owner alone."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def prepare_out(out_dir: str) -> str:
  """`out_dir` as an absolute path, created; an existing non-empty folder is
  an error (an export never mixes with or overwrites other files)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.isfile(out_dir):
    raise ExportError(f'--out={out_dir} is a file: give a new folder')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ExportError(
        f'--out={out_dir} exists and is not empty: give a new or empty folder'
    )
  os.makedirs(out_dir, exist_ok=True)
  return out_dir


def generation_config(hf_config: dict) -> dict:
  """generation_config.json from a config's special token ids (what
  transformers derives with `GenerationConfig.from_model_config`)."""
  out = {'_from_model_config': True}
  for key in (
      'bos_token_id',
      'eos_token_id',
      'pad_token_id',
      'decoder_start_token_id',
  ):
    if hf_config.get(key) is not None:
      out[key] = hf_config[key]
  return out


# More tensors than this get a progress bar (on stderr) while written.
PROGRESS_MIN_TENSORS = 50


def _cast(value, target: np.dtype) -> np.ndarray:
  """A float tensor as `target` (other dtypes as they are), contiguous."""
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating):
    value = value.astype(target, copy=False)
  return np.ascontiguousarray(value)


def write_weights(
    out_dir: str,
    tensors: dict[str, np.ndarray],
    dtype: str = 'float32',
    max_shard_size: str | int = '5GB',
) -> list[str]:
  """Writes `tensors` (float arrays cast to `dtype`) as safetensors file(s);
  returns the files written. A tqdm bar counts the tensors where there are
  more than PROGRESS_MIN_TENSORS."""
  # pylint: disable=g-import-not-at-top
  from huggingface_hub.serialization import split_state_dict_into_shards_factory
  from safetensors.numpy import save_file
  import tqdm
  # pylint: enable=g-import-not-at-top

  target = numpy_dtype(dtype)

  def written_size(value) -> int:
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      return value.size * target.itemsize
    return value.nbytes

  split = split_state_dict_into_shards_factory(
      tensors,
      get_storage_size=written_size,
      filename_pattern='model{suffix}.safetensors',
      max_shard_size=shard_size_bytes(max_shard_size),
  )
  bar = tqdm.tqdm(
      total=len(tensors),
      unit='tensor',
      desc='writing',
      file=sys.stderr,
      disable=len(tensors) <= PROGRESS_MIN_TENSORS,
  )
  with bar:
    for file, names in split.filename_to_tensors.items():
      shard = {}
      for name in names:
        shard[name] = _cast(tensors[name], target)
        bar.update(1)
      save_file(shard, os.path.join(out_dir, file), metadata={'format': 'pt'})
      with_default_permissions(os.path.join(out_dir, file))
  if split.is_sharded:
    # As transformers' save_pretrained writes it.
    index = {
        'metadata': {
            'total_parameters': int(
                sum(np.asarray(v).size for v in tensors.values())
            ),
            'total_size': int(sum(map(written_size, tensors.values()))),
        },
        'weight_map': dict(split.tensor_to_filename),
    }
    with open(
        os.path.join(out_dir, 'model.safetensors.index.json'),
        'w',
        encoding='utf-8',
    ) as f:
      f.write(json.dumps(index, indent=2, sort_keys=True) + '\n')
    return list(split.filename_to_tensors) + ['model.safetensors.index.json']
  return list(split.filename_to_tensors)


def write_folder(
    out_dir: str,
    tensors: dict[str, np.ndarray],
    hf_config: dict,
    *,
    dtype: str = 'float32',
    max_shard_size: str | int = '5GB',
    generative: bool = False,
    tokenizer_files: Iterable[str] = (),
) -> list[str]:
  """Writes a Hugging Face model folder into `out_dir` (new or empty);
  `tokenizer_files`: paths copied in by their names. Returns the names of
  the files written."""
  # A bad dtype or size fails before the folder is made.
  numpy_dtype(dtype)
  shard_size_bytes(max_shard_size)
  out_dir = prepare_out(out_dir)
  written = write_weights(out_dir, tensors, dtype, max_shard_size)
  config = dict(hf_config, torch_dtype=dtype, dtype=dtype)
  files = {'config.json': config}
  if generative:
    files['generation_config.json'] = generation_config(hf_config)
  for name, content in files.items():
    with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
      json.dump(content, f, indent=2, sort_keys=True)
    written.append(name)
  for path in tokenizer_files:
    shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    written.append(os.path.basename(path))
  return written
