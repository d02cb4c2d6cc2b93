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

Streaming (`convert(..., streaming=True)`, the default): the tensors are
opened lazily (`open_safetensors`: each file's header only; a tensor is read
with plain file reads, not a memory map, when the family's `convert_hf`
takes it), each converted parameter is handed to `keep` as it is made, which
spills it to a scratch file beside `out_dir`, and orbax writes the spilled
parameters one at a time (`SpilledArray`). Host memory then stays near the
largest tensor (and its converted copy) instead of about three float32
copies of the model (the read tensors, the converted tree, orbax's copy);
the scratch folder needs the float32 size of the model on disk until the
save ends. `streaming=False` is the whole-model path (`read_safetensors`,
then one tree saved); both write the same parameters bitwise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable

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


# Safetensors dtype names (the header's) as numpy dtypes.
def _safetensors_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  return {
      'F64': np.dtype(np.float64),
      'F32': np.dtype(np.float32),
      'F16': np.dtype(np.float16),
      'BF16': np.dtype(ml_dtypes.bfloat16),
      'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
      'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
      'I64': np.dtype(np.int64),
      'I32': np.dtype(np.int32),
      'I16': np.dtype(np.int16),
      'I8': np.dtype(np.int8),
      'U64': np.dtype(np.uint64),
      'U32': np.dtype(np.uint32),
      'U16': np.dtype(np.uint16),
      'U8': np.dtype(np.uint8),
      'BOOL': np.dtype(np.bool_),
  }


def _loaded_dtype(stored: np.dtype) -> np.dtype:
  """The dtype `read_safetensors` gives a stored dtype: float32 for every
  float (bfloat16 included), otherwise JAX's (int64 is int32 without x64)."""
  import jax  # pylint: disable=g-import-not-at-top

  if np.issubdtype(stored, np.floating) or stored.name == 'bfloat16':
    return np.dtype(np.float32)
  return np.dtype(jax.dtypes.canonicalize_dtype(stored))


class LazyTensor:
  """A tensor not read yet: `shape` and `dtype` (as it will be loaded) are
  known, `np.asarray(t)` reads and returns it (each time: nothing is kept).

  A family's `convert_hf` takes these as it takes arrays: through
  `np.asarray` / `np.ascontiguousarray`, or `.T` (which reads too).
  """

  def __init__(self, name: str, shape, dtype, load: Callable[[], np.ndarray]):
    self.name = name
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)
    self._load = load

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def T(self) -> np.ndarray:  # pylint: disable=invalid-name
    return np.asarray(self).T

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # a fresh array every time
    value = self._load()
    if value.shape != self.shape or value.dtype != self.dtype:
      raise ConversionError(
          f'tensor {self.name} read as {value.dtype}{list(value.shape)}, '
          f'its header says {self.dtype}{list(self.shape)}: the file is '
          'corrupt; download it again'
      )
    return value if dtype is None else value.astype(dtype, copy=False)

  def __repr__(self) -> str:
    return f'LazyTensor({self.name!r}, {self.shape}, {self.dtype})'


def _read_header(file: str) -> tuple[int, dict]:
  """(offset of the data, header dict) of a safetensors file, checked
  against the file's size."""
  size = os.path.getsize(file)
  with open(file, 'rb') as f:
    length = int.from_bytes(f.read(8), 'little')
    if size < 8 or length > size - 8:
      raise ValueError(f'a header of {length} bytes in a {size}-byte file')
    header = json.loads(f.read(length))
  if not isinstance(header, dict):
    raise ValueError('the header is not a JSON object')
  header.pop('__metadata__', None)
  dtypes = _safetensors_dtypes()
  for name, entry in header.items():
    begin, end = entry['data_offsets']
    if entry['dtype'] not in dtypes:
      raise ValueError(f'tensor {name} has an unknown dtype {entry["dtype"]}')
    count = int(np.prod(entry['shape'], dtype=np.int64))
    if end - begin != count * dtypes[entry['dtype']].itemsize:
      raise ValueError(f'tensor {name} has {end - begin} bytes for its shape')
    if 8 + length + end > size:
      raise ValueError(f'tensor {name} ends past the end of the file')
  return 8 + length, header


def _file_tensor(
    file: str, name: str, offset: int, stored: np.dtype, shape
) -> LazyTensor:
  count = int(np.prod(shape, dtype=np.int64))
  loaded = _loaded_dtype(stored)

  def load() -> np.ndarray:
    value = np.fromfile(file, dtype=stored, count=count, offset=offset)
    return value.reshape(shape).astype(loaded, copy=False)

  return LazyTensor(name, shape, loaded, load)


def open_safetensors(folder: str) -> dict[str, LazyTensor]:
  """The tensors of a HF folder's safetensors file(s) as `LazyTensor`s,
  in `read_safetensors`' order, reading only the files' headers now.

  A tensor is read when it is used, with plain reads (no memory map, so the
  file's pages are not counted in this process's memory), and loads as
  `read_safetensors` gives it: floats as float32, bitwise the same.
  """
  tensors: dict[str, LazyTensor] = {}
  dtypes = _safetensors_dtypes()
  for file in _safetensors_files(folder):
    try:
      start, header = _read_header(file)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConversionError(
          f'{file} is not a readable safetensors file '
          f'({type(e).__name__}: {e}); download it '
          'again'
      ) from None
    for name in sorted(header):
      entry = header[name]
      tensors[name] = _file_tensor(
          file,
          name,
          start + entry['data_offsets'][0],
          dtypes[entry['dtype']],
          entry['shape'],
      )
  return tensors


class SpilledArray:
  """A converted parameter written to a scratch file (raw bytes, C order):
  what `spill` keeps in the tree instead of the array. `write_folder` saves
  a tree of these one leaf at a time, deleting each file once written."""

  def __init__(self, path: str, shape, dtype):
    self.path = path
    self.shape = tuple(shape)
    self.dtype = np.dtype(dtype)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def load(self) -> np.ndarray:
    value = np.fromfile(self.path, dtype=self.dtype, count=self.size)
    return value.reshape(self.shape)


def spill(folder: str) -> Callable[[str, np.ndarray], SpilledArray]:
  """A `keep(path, array)` for a family's `convert_hf`: writes each
  converted parameter to `folder` and keeps only a `SpilledArray`."""
  os.makedirs(folder, exist_ok=True)
  numbers = itertools.count()

  def keep(path: str, array: np.ndarray) -> SpilledArray:
    del path  # files are numbered; the tree says where each belongs
    array = np.ascontiguousarray(array)
    file = os.path.join(folder, f'{next(numbers)}.bin')
    array.tofile(file)
    return SpilledArray(file, array.shape, array.dtype)

  return keep


def _spilled_array_handler():
  """An orbax NumpyHandler for `SpilledArray` leaves: each is read, written
  and its scratch file deleted before the next, so one parameter at a time
  is in memory. Its `typestr` is the NumpyHandler's: the checkpoint reads
  back exactly as one saved from numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  class SpilledArrayHandler(ocp.type_handlers.NumpyHandler):

    async def _background_serialize(self, values, infos, args=None):
      for value, info, arg in zip(values, infos, args):
        array = value.load()
        await super()._background_serialize([array], [info], [arg])
        del array
        os.remove(value.path)

  return SpilledArrayHandler(deepcopy_host_arrays=False)


def _save_params(path: str, params) -> None:
  """Saves the params tree with orbax's `PyTreeCheckpointer`; its
  `SpilledArray` leaves are saved one at a time."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  ocp.type_handlers.register_type_handler(
      SpilledArray, _spilled_array_handler(), override=True
  )
  ocp.PyTreeCheckpointer().save(path, params)


def streams(convert_hf) -> bool:
  """Whether a family's `convert_hf` takes `keep` (and so lazy tensors)."""
  import inspect  # pylint: disable=g-import-not-at-top

  return 'keep' in inspect.signature(convert_hf).parameters


def scratch_folder(out_dir: str) -> str:
  """A new empty folder beside `out_dir` for `spill`'s files."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix='.spilled-params-', dir=parent)


def _family(hf_config: dict) -> Family:
  """The family whose `convert_hf` reads checkpoints of this config's
  `model_type`."""
  try:
    return registry.family_for_hf_model_type(hf_config.get('model_type'))
  except ValueError as e:
    raise ConversionError(str(e)) from None


def convert_tensors(
    tensors: dict[str, np.ndarray], hf_config: dict, keep=None
) -> tuple[dict, dict[str, Any]]:
  """Maps HF-named tensors onto a params tree with the converter of the
  family that `hf_config['model_type']` names.

  Returns `(params, summary)` as the family's `convert_hf` does (`converted`,
  `left_out`, optional `notes` lines and family-specific entries); raises
  ConversionError naming an unsupported model type or whatever the family's
  converter rejects. `keep` (a family that `streams` only) is handed each
  converted parameter, and the tree holds what it returns (`spill`).
  """
  family = _family(hf_config)
  try:
    if keep is not None:
      return family.convert_hf(tensors, hf_config, keep=keep)
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


def convert(
    source: str, out_dir: str, verbose: bool = True, streaming: bool = True
) -> dict[str, Any]:
  """Converts a HF folder or hub id into `out_dir` (must not exist yet).

  Returns the summary. `streaming` (module doc): one tensor at a time
  when the family's converter `streams`; False: the whole-model path.
  """
  folder = resolve_source(source)
  try:
    hf_config = read_hf_config(folder)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  family = _family(hf_config)  # an unsupported type fails before the weights
  scratch = None
  if streaming and streams(family.convert_hf):
    scratch = scratch_folder(out_dir)
  try:
    if scratch:
      params, summary = convert_tensors(
          open_safetensors(folder), hf_config, keep=spill(scratch)
      )
    else:
      params, summary = convert_tensors(read_safetensors(folder), hf_config)
    summary = _write_converted(
        folder, source, out_dir, params, hf_config, summary
    )
  finally:
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)
  if verbose:
    print(format_summary(summary, out_dir))
  return summary


def _write_converted(folder, source, out_dir, params, hf_config, summary):
  """Writes the converted folder (params, config, tokenizer files); the
  summary with `source` and `tokenizer_files` added."""
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
  `conversion.json` (`summary`), last, which marks it complete. `params`
  may hold `SpilledArray` leaves (saved one at a time, files deleted)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, 'params')):
    raise ConversionError(
        f'{out_dir}/params already exists; choose a new --out folder.'
    )
  os.makedirs(out_dir, exist_ok=True)
  _save_params(os.path.join(out_dir, 'params'), params)
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
