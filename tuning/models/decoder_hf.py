"""The decoder family's Hugging Face side, and its declaration.

* `config_from_hf`: a GPT-2 or Llama config.json (a dict) as the
  `decoder.DecoderConfig` it describes; `read_hf_config` reads one from a
  dict, a file or a folder.
* `convert_hf`: safetensors tensors, by their Hugging Face names, as the
  `DecoderLM` parameter tree (the name map `_hf_names`; buffers and tied
  copies are reported as left out).
* `export_hf` (the reverse of `convert_hf`: a params tree as Hugging Face
  tensors and config.json) and `hf_linear_names` (where LoRA adapters go in
  PEFT's module names);
* `from_hf_config`, `build` and `FAMILY`: a `DecoderLM` from a config.json,
  and what tuning/models/registry.py lists.

The model itself is tuning/models/decoder.py; sampling with its key/value
cache is tuning/decoding/sampling.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import decoder as decoder_lib
from tuning.models import family as family_lib
from tuning.models import hf_config as hf_config_lib
from tuning.models import remat as remat_lib

HF_MODEL_TYPES = ('gpt2', 'llama')


# ------------------------------------------------------------ config.json


def read_hf_config(source) -> dict:
  """A Hugging Face config dict from a dict, a config.json or its folder."""
  if isinstance(source, dict):
    return dict(source)
  return hf_config_lib.read_hf_config(source)


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def _rope_theta(hf: dict) -> float:
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type != 'default':
    raise ValueError(
        f'unsupported rope_type={rope_type!r} in the Llama '
        "config: only 'default' rotary embeddings are built"
    )
  return float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))


def config_from_hf(hf: dict) -> decoder_lib.DecoderConfig:
  """A `DecoderConfig` from a GPT-2 or Llama config.json dict."""
  model_type = hf.get('model_type')
  common = dict(
      vocab_size=int(hf['vocab_size']),
      initializer_range=float(hf.get('initializer_range', 0.02)),
      bos_token_id=hf.get('bos_token_id'),
      eos_token_ids=_ids(hf.get('eos_token_id')),
      pad_token_id=hf.get('pad_token_id'),
  )
  if model_type == 'gpt2':
    hidden, heads = int(hf['n_embd']), int(hf['n_head'])
    act = hf.get('activation_function', 'gelu_new')
    config = decoder_lib.DecoderConfig(
        kind='gpt2',
        hidden_size=hidden,
        num_layers=int(hf['n_layer']),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(hf.get('n_inner') or 4 * hidden),
        max_positions=int(hf.get('n_positions', 1024)),
        activation=act,
        norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
        attention_bias=True,
        mlp_bias=True,
        dropout=float(hf.get('resid_pdrop', 0.1)),
        attention_dropout=float(hf.get('attn_pdrop', 0.1)),
        scale_by_inverse_layer=bool(
            hf.get('scale_attn_by_inverse_layer_idx', False)
        ),
        **common,
    )
    if not hf.get('scale_attn_weights', True):
      raise ValueError(
          'unsupported GPT-2 config scale_attn_weights=false: '
          'only scaled attention is built'
      )
  elif model_type == 'llama':
    hidden, heads = int(hf['hidden_size']), int(hf['num_attention_heads'])
    config = decoder_lib.DecoderConfig(
        kind='llama',
        hidden_size=hidden,
        num_layers=int(hf['num_hidden_layers']),
        num_heads=heads,
        num_kv_heads=int(hf.get('num_key_value_heads') or heads),
        head_dim=int(hf.get('head_dim') or hidden // heads),
        intermediate_size=int(hf['intermediate_size']),
        max_positions=int(hf.get('max_position_embeddings', 2048)),
        activation=hf.get('hidden_act', 'silu'),
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        rope_theta=_rope_theta(hf),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        attention_bias=bool(hf.get('attention_bias', False)),
        mlp_bias=bool(hf.get('mlp_bias', False)),
        dropout=0.0,
        attention_dropout=float(hf.get('attention_dropout', 0.0)),
        **common,
    )
    if int(hf.get('pretraining_tp', 1)) != 1:
      raise ValueError(
          'unsupported Llama config pretraining_tp != 1: save '
          'the checkpoint with pretraining_tp=1'
      )
  else:
    raise ValueError(
        f'unknown decoder model_type={model_type!r}: this '
        f'family reads {", ".join(HF_MODEL_TYPES)}'
    )
  return config


# ------------------------------------------------------------ tensor names


def _hf_names(
    cfg: decoder_lib.DecoderConfig,
) -> dict[str, tuple[str, Callable]]:
  """HF tensor name -> (Flax path, numpy transform) for one checkpoint."""
  names: dict[str, tuple[str, Callable]] = {}
  same = lambda w: w  # pylint: disable=unnecessary-lambda-assignment
  transpose = lambda w: w.T  # pylint: disable=unnecessary-lambda-assignment
  if cfg.kind == 'gpt2':
    names['wte.weight'] = ('decoder/embed/embedding', same)
    names['wpe.weight'] = ('decoder/position_embed/embedding', same)
    names['ln_f.weight'] = ('decoder/final_norm/scale', same)
    names['ln_f.bias'] = ('decoder/final_norm/bias', same)
    for i in range(cfg.num_layers):
      hf, fx = f'h.{i}', f'decoder/layer_{i}'
      for norm, name in (('ln_1', 'attention_norm'), ('ln_2', 'mlp_norm')):
        names[f'{hf}.{norm}.weight'] = (f'{fx}/{name}/scale', same)
        names[f'{hf}.{norm}.bias'] = (f'{fx}/{name}/bias', same)
      # Conv1D weights are [in, out]: Flax kernels as they are.
      for part, conv in (
          ('attention/out', 'attn.c_proj'),
          ('mlp/up', 'mlp.c_fc'),
          ('mlp/down', 'mlp.c_proj'),
      ):
        names[f'{hf}.{conv}.weight'] = (f'{fx}/{part}/kernel', same)
        names[f'{hf}.{conv}.bias'] = (f'{fx}/{part}/bias', same)
      for j, part in enumerate(('query', 'key', 'value')):
        names[f'{hf}.attn.c_attn.weight#{j}'] = (
            f'{fx}/attention/{part}/kernel',
            lambda w, j=j: np.split(w, 3, axis=-1)[j],
        )
        names[f'{hf}.attn.c_attn.bias#{j}'] = (
            f'{fx}/attention/{part}/bias',
            lambda w, j=j: np.split(w, 3, axis=-1)[j],
        )
  else:
    names['model.embed_tokens.weight'] = ('decoder/embed/embedding', same)
    names['model.norm.weight'] = ('decoder/final_norm/scale', same)
    for i in range(cfg.num_layers):
      hf, fx = f'model.layers.{i}', f'decoder/layer_{i}'
      names[f'{hf}.input_layernorm.weight'] = (
          f'{fx}/attention_norm/scale',
          same,
      )
      names[f'{hf}.post_attention_layernorm.weight'] = (
          f'{fx}/mlp_norm/scale',
          same,
      )
      linears = [
          (f'self_attn.{p}_proj', f'attention/{n}', cfg.attention_bias)
          for p, n in (
              ('q', 'query'),
              ('k', 'key'),
              ('v', 'value'),
              ('o', 'out'),
          )
      ]
      linears += [
          (f'mlp.{p}_proj', f'mlp/{p}', cfg.mlp_bias)
          for p in ('gate', 'up', 'down')
      ]
      for hf_part, part, bias in linears:
        names[f'{hf}.{hf_part}.weight'] = (f'{fx}/{part}/kernel', transpose)
        if bias:
          names[f'{hf}.{hf_part}.bias'] = (f'{fx}/{part}/bias', same)
  if not cfg.tie_embeddings:
    names['lm_head.weight'] = ('lm_head/kernel', transpose)
  return names


# Tensors a checkpoint may hold that are not parameters of the model.
_IGNORED = (
    (re.compile(r'(^|\.)attn\.(masked_)?bias$'), 'causal mask buffer'),
    (re.compile(r'rotary_emb\.inv_freq$'), 'rotary frequency buffer'),
)


def _canonical(name: str, kind: str) -> str:
  if kind == 'gpt2' and name.startswith('transformer.'):
    return name[len('transformer.') :]
  return name


def convert_hf(
    tensors: dict[str, np.ndarray], hf_config: dict, keep=None
) -> tuple[dict, dict[str, Any]]:
  """Maps HF GPT-2 / Llama safetensors onto the `DecoderLM` params tree.

  Returns `(params, report)`; the report has `converted` (tensor count),
  `left_out` ({name: reason}) and `tied_embeddings`. Raises a ValueError
  naming missing or unexpected tensors and shape mismatches. `keep(path,
  array)` (optional) is given each parameter as it is converted and the
  tree holds what it returns (tuning/formats/huggingface.py `spill`).
  """
  keep = keep or (lambda path, array: array)
  cfg = config_from_hf(hf_config)
  names = _hf_names(cfg)
  params: dict[str, np.ndarray] = {}
  used, left_out, unexpected = set(), {}, []
  for raw, value in tensors.items():
    name = _canonical(raw, cfg.kind)
    fused = [f'{name}#{j}' for j in range(3)]
    targets = [n for n in [name] + fused if n in names]
    if not targets:
      reason = next((r for p, r in _IGNORED if p.search(name)), None)
      if name == 'lm_head.weight' and cfg.tie_embeddings:
        reason = 'tied to the token embedding'
      if reason:
        left_out[raw] = reason
      else:
        unexpected.append(raw)
      continue
    for target in targets:
      path, transform = names[target]
      params[path] = keep(
          path, np.ascontiguousarray(transform(np.asarray(value, np.float32)))
      )
      used.add(target)
  missing = [n.split('#')[0] for n in names if n not in used]
  problems = []
  if missing:
    problems.append('missing tensors: ' + ', '.join(sorted(set(missing))))
  if unexpected:
    problems.append('unexpected tensors: ' + ', '.join(sorted(unexpected)))
  if problems:
    raise ValueError(
        f'cannot convert the {cfg.kind} checkpoint: ' + '; '.join(problems)
    )
  _check_shapes(params, cfg)
  tree: dict = {}
  for path, value in params.items():
    node = tree
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  report = {
      'converted': len({n.split('#')[0] for n in used}),
      'left_out': left_out,
      'tied_embeddings': cfg.tie_embeddings,
      'notes': [
          f'{cfg.kind} decoder: {cfg.num_layers} layers, '
          f'{"tied" if cfg.tie_embeddings else "untied"} '
          'embeddings.'
      ],
  }
  return tree, report


def _check_shapes(
    params: dict[str, np.ndarray], cfg: decoder_lib.DecoderConfig
):
  model = decoder_lib.DecoderLM(cfg)
  ids = jnp.zeros((1, 2), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))[
      'params'
  ]
  flat = {
      '/'.join(k.key for k in path): v.shape
      for path, v in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  bad = [
      f'{n}: checkpoint {v.shape} vs config {flat.get(n)}'
      for n, v in params.items()
      if flat.get(n) != v.shape
  ]
  if bad:
    raise ValueError(
        'checkpoint shapes do not match its config: ' + '; '.join(bad)
    )


# ------------------------------------------------------------ export

_ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM'}

# The order of a layer's tensors in transformers' state_dict (and so in
# the safetensors files and shards that save_pretrained writes).
_LAYER_ORDER = {
    'gpt2': (
        'ln_1',
        'attn.c_attn',
        'attn.c_proj',
        'ln_2',
        'mlp.c_fc',
        'mlp.c_proj',
    ),
    'llama': (
        'self_attn.q_proj',
        'self_attn.k_proj',
        'self_attn.v_proj',
        'self_attn.o_proj',
        'mlp.gate_proj',
        'mlp.up_proj',
        'mlp.down_proj',
        'input_layernorm',
        'post_attention_layernorm',
    ),
}
_LAYER_TENSOR = re.compile(
    r'^(?:transformer\.h|model\.layers)\.(\d+)\.(.+)\.(weight|bias)$'
)


def _state_dict_order(kind: str, name: str) -> tuple:
  """Sorts HF tensor names as transformers' state_dict lists them: the
  embeddings, each layer's tensors (weight before bias), the final norm,
  lm_head."""
  match = _LAYER_TENSOR.match(name)
  if match:
    layer, module, leaf = match.groups()
    order = _LAYER_ORDER[kind].index(module)
    return (1, int(layer), order, leaf == 'bias')
  if name == 'lm_head.weight':
    return (3,)
  if 'norm' in name or 'ln_f' in name:
    return (2, name.endswith('.bias'))
  return (0, 'wpe' in name)


def export_hf(params, hf_config: dict) -> tuple[dict[str, np.ndarray], dict]:
  """A `DecoderLM` params tree as GPT-2 / Llama safetensors tensors (float32
  numpy, transformers' names and layouts: GPT-2's fused `c_attn` and Conv1D
  [in, out] weights under `transformer.`, Llama's [out, in] Linear weights)
  and the config.json for `GPT2LMHeadModel` / `LlamaForCausalLM`.

  The reverse of `convert_hf`: `same` and `transpose` are their own
  inverses, and the three `#j` parts of a fused tensor are joined again."""
  hf = read_hf_config(hf_config)
  cfg = config_from_hf(hf)
  flat = family_lib.flat_float32(params)
  names = _hf_names(cfg)
  family_lib.check_export_paths(
      flat, {path for path, _ in names.values()}, cfg.kind
  )
  prefix = 'transformer.' if cfg.kind == 'gpt2' else ''
  tensors: dict[str, np.ndarray] = {}
  fused: dict[str, list] = {}
  for name, (path, transform) in names.items():
    hf_name = name if name == 'lm_head.weight' else prefix + name
    if '#' in name:
      fused.setdefault(hf_name.split('#')[0], []).append(flat[path])
      tensors.setdefault(hf_name.split('#')[0], None)
    else:
      tensors[hf_name] = np.ascontiguousarray(transform(flat[path]))
  for name, parts in fused.items():
    tensors[name] = np.concatenate(parts, axis=-1)
  order = {name: _state_dict_order(cfg.kind, name) for name in tensors}
  tensors = {name: tensors[name] for name in sorted(tensors, key=order.get)}
  out = dict(hf, architectures=[_ARCHITECTURES[cfg.kind]])
  out['tie_word_embeddings'] = cfg.tie_embeddings
  return tensors, out


def hf_linear_names(hf_config: dict) -> dict[str, str]:
  """{Flax Dense module: transformers nn.Linear module} of a Llama model
  (GPT-2's attention and MLP are Conv1D layers, its Q/K/V one fused layer:
  none of them is an nn.Linear, so a GPT-2 model has none)."""
  cfg = config_from_hf(read_hf_config(hf_config))
  if cfg.kind != 'llama':
    return {}
  modules = {}
  for name, (path, _) in _hf_names(cfg).items():
    module, _, leaf = path.rpartition('/')
    if leaf == 'kernel' and name.endswith('.weight'):
      modules[module] = name.removesuffix('.weight')
  return modules


# ------------------------------------------------------------ the family


def from_hf_config(
    hf_config, dtype=jnp.float32, dropout: Optional[float] = None
) -> decoder_lib.DecoderLM:
  """A `DecoderLM` for a config dict, config.json or folder holding one."""
  config = config_from_hf(read_hf_config(hf_config))
  if dropout is not None:
    config = dataclasses.replace(
        config, dropout=float(dropout), attention_dropout=float(dropout)
    )
  return decoder_lib.DecoderLM(config, jnp.dtype(dtype))


def build(model_config, dtype, *, num_outputs=None, vocab_size=None):
  """Registry builder: `model_config.hf_config` names the config.json.

  `model_config.dropout` (optional) overrides the dropout rates;
  `model_config.remat` and `remat_names` (optional) rematerialise the
  blocks (tuning/models/remat.py). The vocabulary is the checkpoint's:
  `num_outputs` must be None or equal it.
  """
  del vocab_size  # the model embeds its own pretrained vocabulary
  hf_path = model_config.get('hf_config')
  if not hf_path:
    raise ValueError(
        'model.hf_config is not set: give a Hugging Face '
        'config.json or a folder holding one'
    )
  model = from_hf_config(hf_path, dtype, model_config.get('dropout', None))
  model = model.clone(
      config=dataclasses.replace(
          model.config, **remat_lib.from_model_config(model_config)
      )
  )
  if num_outputs not in (None, model.config.vocab_size):
    raise ValueError(
        f'a decoder predicts its vocabulary '
        f'({model.config.vocab_size} tokens), not '
        f'{num_outputs} outputs: use the causal_lm task'
    )
  return model


FAMILY = family_lib.Family(
    names=('decoder', 'gpt2', 'llama'),
    build=build,
    hf_model_types=HF_MODEL_TYPES,
    convert_hf=convert_hf,
    export_hf=export_hf,
    hf_linear_names=hf_linear_names,
    # The untied output projection and the final norm (a tied model's
    # output projection is the token embedding).
    head_regex=(r'lm_head/.*', r'decoder/final_norm/.*'),
    lora_targets=(
        r'.*attention/(query|key|value|out)',
        r'.*mlp/(gate|up|down)',
    ),
    layer_regex=r'.*layer_(\d+)/.*',
)
