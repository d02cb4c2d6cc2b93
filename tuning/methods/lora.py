"""LoRA: low-rank adapters on the Dense layers of any Linen model.

A Dense layer chosen by the LoRA targets (regexes over its `/`-joined
module path, e.g. `bert/encoder/layer_0/attention/query`: `config.lora.targets`
where set, else the model family's, see tuning/methods/naming.py) computes

    y = x W + b + (alpha / rank) * dropout(x) A B

with A [in, rank] (uniform +-1/sqrt(in), as PEFT's Kaiming init) and
B [rank, out] (zeros, so that training starts from the base model). The
adapters live in the parameter tree next to the kernel they adapt
(`<module>/lora_a`, `<module>/lora_b`), so they are saved, restored and
selected by regex like any parameter; the optimizer trains only them (and,
with `train_head`, the head). `LoraModel` wraps the plain model and adds the
low-rank path with `flax.linen.intercept_methods`, so the model code does not
know about LoRA.

`merge(params, ...)` folds the adapters into the kernels (W + scale A B) and
drops them: the result is a plain parameter tree; `export_merged` writes it
as an orbax checkpoint that `config.init.checkpoint` loads into the plain
model (lora.rank=0).

The frozen base in less memory (QLoRA): with `config.lora.base_dtype`
'bfloat16', 'int8' or 'nf4' (default 'float32': nothing changes), the
kernels of the adapted Dense layers that do not train (all of them but a
trained head) are stored in that format (tuning/methods/quantization.py:
per-block absmax scales, blocks of 64, NF4's 16 values as QLoRA's) from
`init` on: `<module>/kernel` holds the stored form, so the train state,
its checkpoints (resume restores the same codes exactly) and the restore
targets all carry it. `apply` runs such a layer as the same Dense with the
kernel dequantized to float32 right before it, under `jax.checkpoint`, so
the backward pass dequantizes it again instead of keeping a float32 copy.
Embeddings, norms, biases, the layers that are not adapted and the
adapters stay float32. `quantize_base` turns a float32 tree (e.g. one
that pretrained weights were loaded into, `dequantized_base` giving their
target) into that form; `merge` dequantizes first. With an int8 or NF4
base the train step's `param_norm` counts the per-block scales, not the
codes (tuning/engine/train_step.py).
"""

from __future__ import annotations

import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tuning.methods import naming as naming_lib
from tuning.methods import quantization
from tuning.models import dropout

ADAPTER_NAMES = ('lora_a', 'lora_b')
# Salt folded into the example's dropout key for the adapters' dropout.
_DROPOUT_SALT = 0x10A


def enabled(lora_config) -> bool:
  return bool(lora_config is not None and lora_config.rank)


def scale(lora_config) -> float:
  alpha = lora_config.alpha
  rank = int(lora_config.rank)
  return float(alpha if alpha is not None else rank) / rank


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')


def _unflat(flat: dict):
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def dense_modules(params) -> dict[str, tuple[int, int]]:
  """{module path: kernel shape} of every layer with a 2-D kernel."""
  return {
      k[: -len('/kernel')]: tuple(np.shape(v))
      for k, v in _flat(params).items()
      if k.endswith('/kernel') and np.ndim(v) == 2
  }


def target_modules(
    params, lora_config, naming: naming_lib.NamingRules | None = None
) -> list[str]:
  """The Dense module paths that get adapters; raises if none.

  `naming`: the run's rules (`naming_rules(config)`); without them, the
  targets are `lora_config.targets`.
  """
  naming = naming or naming_lib.resolve(None, lora_config=lora_config)
  targets = naming.lora_targets
  regexes = [re.compile(t) for t in targets]
  dense = dense_modules(params)
  chosen = sorted(m for m in dense if any(r.fullmatch(m) for r in regexes))
  if not chosen:
    examples = ', '.join(sorted(dense)[:6])
    if not targets:
      raise ValueError(
          'config.lora.targets is not set and this model family '
          'has no default LoRA targets: set it to regexes of '
          f'Dense module paths (here: {examples}...)'
      )
    raise ValueError(
        f'config.lora.targets={targets} matches no Dense layer '
        f'(module paths here: {examples}...)'
    )
  return chosen


def add_adapters(
    params, lora_config, key, naming: naming_lib.NamingRules | None = None
):
  """`params` plus fresh `lora_a` (uniform) / `lora_b` (zeros) per target."""
  rank = int(lora_config.rank)
  if rank < 0:
    raise ValueError(
        f'config.lora.rank={rank}: use 0 (off) or a positive ' 'rank'
    )
  flat = dict(_flat(params))
  for i, module in enumerate(target_modules(params, lora_config, naming)):
    kernel = flat[f'{module}/kernel']
    fan_in, fan_out = kernel.shape
    bound = 1.0 / np.sqrt(fan_in)
    flat[f'{module}/lora_a'] = jax.random.uniform(
        jax.random.fold_in(key, i), (fan_in, rank), jnp.float32, -bound, bound
    )
    flat[f'{module}/lora_b'] = jnp.zeros((rank, fan_out), jnp.float32)
  return _unflat(flat)


def split(params):
  """(base params, {module path: (lora_a, lora_b)})."""
  base, parts = {}, {}
  for k, v in _flat(params).items():
    module, _, name = k.rpartition('/')
    if name in ADAPTER_NAMES:
      parts.setdefault(module, {})[name] = v
    else:
      base[k] = v
  adapters = {m: (p['lora_a'], p['lora_b']) for m, p in parts.items()}
  return _unflat(base), adapters


def join(base, adapters):
  """The inverse of `split`."""
  flat = dict(_flat(base))
  for module, (a, b) in adapters.items():
    flat[f'{module}/lora_a'], flat[f'{module}/lora_b'] = a, b
  return _unflat(flat)


def base_dtype(lora_config) -> str:
  """The format of the frozen adapted kernels ('float32' where unset)."""
  fmt = lora_config.get('base_dtype', None) or 'float32'
  quantization.check_format(fmt)
  return fmt


def frozen_targets(
    params, lora_config, naming: naming_lib.NamingRules | None = None
) -> list[str]:
  """The adapted modules whose kernel does not train (with
  `train_head`, a head that is also a target trains)."""
  naming = naming or naming_lib.resolve(None, lora_config=lora_config)
  head = [re.compile(r) for r in naming.head]
  return [
      m
      for m in target_modules(params, lora_config, naming)
      if not (
          lora_config.train_head
          and any(r.fullmatch(f'{m}/kernel') for r in head)
      )
  ]


def quantize_base(
    params, lora_config, naming: naming_lib.NamingRules | None = None
):
  """`params` with each frozen adapted kernel stored in
  `lora_config.base_dtype` (the same tree for 'float32' or no LoRA)."""
  if not enabled(lora_config) or base_dtype(lora_config) == 'float32':
    return params
  fmt = base_dtype(lora_config)
  flat = dict(_flat(params))
  for module in frozen_targets(params, lora_config, naming):
    kernel = flat.pop(f'{module}/kernel')
    stored = quantization.quantize(kernel, fmt, module)
    if isinstance(stored, dict):
      for name, value in stored.items():
        flat[f'{module}/kernel/{name}'] = value
    else:
      flat[f'{module}/kernel'] = stored
  return _unflat(flat)


def _stored_kernels(flat: dict) -> dict:
  """{module: the stored kernel} of the kernels not in float32."""
  stored = {}
  for k, v in flat.items():
    if k.endswith('/kernel') and quantization.is_stored(v):
      stored[k[: -len('/kernel')]] = v
    module, _, name = k.rpartition('/kernel/')
    if module and name in ('int8', 'nf4'):
      stored[module] = {name: v, 'scales': flat[f'{module}/kernel/scales']}
  return stored


def dequantized_base(params):
  """`params` with every stored kernel back in float32 (the tree a
  float32 checkpoint loads into; itself where none is stored)."""
  flat = dict(_flat(params))
  stored = _stored_kernels(flat)
  if not stored:
    return params
  for module, value in stored.items():
    for name in ('int8', 'nf4', 'scales'):
      flat.pop(f'{module}/kernel/{name}', None)
    flat[f'{module}/kernel'] = np.asarray(quantization.dequantize(value))
  return _unflat(flat)


def merge(params, lora_config):
  """Plain parameters: each adapted kernel becomes W + scale * A B."""
  base, adapters = split(params)
  flat = dict(_flat(base))
  s = scale(lora_config)
  if _stored_kernels(flat):
    flat = _flat(dequantized_base(base))
  for module, (a, b) in adapters.items():
    kernel = np.asarray(flat[f'{module}/kernel'], np.float32)
    flat[f'{module}/kernel'] = kernel + s * (
        np.asarray(a, np.float32) @ np.asarray(b, np.float32)
    )
  return _unflat(flat)


def export_merged(params, lora_config, directory: str) -> str:
  """Writes the merged, plain parameters to `directory/params` (orbax)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  merged = jax.tree.map(np.asarray, merge(params, lora_config))
  path = os.path.join(os.path.abspath(directory), 'params')
  ocp.PyTreeCheckpointer().save(path, merged, force=True)
  return os.path.dirname(path)


class LoraModel:
  """A Linen model with LoRA adapters, behind the same init/apply calls.

  `naming`: the run's rules (`naming_rules(config)`), which name the adapted
  layers; without them, `lora_config.targets`.
  """

  def __init__(
      self,
      model: nn.Module,
      lora_config,
      naming: naming_lib.NamingRules | None = None,
  ):
    self.model = model
    self.config = lora_config
    self.naming = naming
    self.scale = scale(lora_config)
    self.dropout = float(lora_config.dropout)
    self.base_dtype = base_dtype(lora_config)

  def __getattr__(self, name):
    return getattr(self.model, name)

  def init(self, rngs, *args, **kwargs):
    variables = dict(self.model.init(rngs, *args, **kwargs))
    key = rngs['params'] if isinstance(rngs, dict) else rngs
    variables['params'] = quantize_base(
        add_adapters(
            variables['params'],
            self.config,
            jax.random.fold_in(key, 0x10A),
            self.naming,
        ),
        self.config,
        self.naming,
    )
    return variables

  def apply(self, variables, *args, rngs=None, train: bool = False, **kwargs):
    base, adapters = split(variables['params'])
    order = {m: i for i, m in enumerate(sorted(adapters))}
    key = (rngs or {}).get('dropout') if train else None
    rate = self.dropout if key is not None else 0.0
    stored = {}
    if self.base_dtype != 'float32':
      flat_base = _flat(base)
      for m, kernel in _stored_kernels(flat_base).items():
        stored[m] = {'kernel': kernel}
        if f'{m}/bias' in flat_base:
          stored[m]['bias'] = flat_base[f'{m}/bias']

    def interceptor(next_fun, call_args, call_kwargs, context):
      if context.method_name != '__call__' or not isinstance(
          context.module, nn.Dense
      ):
        return next_fun(*call_args, **call_kwargs)
      module = '/'.join(context.module.path)
      if module not in adapters:
        return next_fun(*call_args, **call_kwargs)
      x = call_args[0] if call_args else call_kwargs['inputs']
      if module in stored:
        out = _frozen_dense(context.module, stored[module], x)
      else:
        out = next_fun(*call_args, **call_kwargs)
      a, b = adapters[module]
      if rate > 0:
        keep = dropout.keep_mask(
            jax.random.fold_in(
                jax.random.fold_in(key, _DROPOUT_SALT), order[module]
            ),
            1.0 - rate,
            x.shape,
        )
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
      dtype = context.module.dtype or out.dtype
      delta = (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
      return out + (self.scale * delta).astype(out.dtype)

    with nn.intercept_methods(interceptor):
      return self.model.apply(
          {**variables, 'params': base}, *args, rngs=rngs, train=train, **kwargs
      )


def _frozen_dense(dense: nn.Dense, stored: dict, x):
  """`dense`(x) with its kernel `stored['kernel']` (a stored form) and its
  bias: the same Dense (dtype, promotion, dot_general) applied to the
  kernel dequantized to float32, under `jax.checkpoint` so that the
  backward pass dequantizes it again rather than keeping it."""
  layer = dense.clone(parent=None)

  def run(x, stored):
    params = {**stored, 'kernel': quantization.dequantize(stored['kernel'])}
    return layer.apply({'params': params}, x)

  return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(
      x, stored
  )


def describe(params, lora_config) -> str:
  """One line: rank, alpha, adapted modules, adapter parameter count."""
  _, adapters = split(params)
  count = sum(int(np.size(a)) + int(np.size(b)) for a, b in adapters.values())
  return (
      f'lora: rank {int(lora_config.rank)}, alpha '
      f'{lora_config.alpha or lora_config.rank} (scale '
      f'{scale(lora_config):g}), dropout {lora_config.dropout}'
      f', {len(adapters)} adapted Dense layers, {count:,} adapter '
      'parameters'
      + (
          f', frozen base of the adapted layers in {base_dtype(lora_config)}'
          if base_dtype(lora_config) != 'float32'
          else ''
      )
  )


def without_adapters(params):
  """The same tree with every `lora_b` zeroed, under stop_gradient: the
  base model's outputs (the reference of GRPO and DPO) without a second
  copy of the parameters in the caller's state."""
  flat = dict(_flat(params))
  for k, v in flat.items():
    if k.rpartition('/')[2] == 'lora_b':
      flat[k] = jnp.zeros_like(v)
    else:
      flat[k] = jax.lax.stop_gradient(v)
  return _unflat(flat)
