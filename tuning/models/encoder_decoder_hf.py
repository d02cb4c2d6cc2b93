"""The encoder-decoder family's Hugging Face side, and its declaration.

* `config_from_hf`: a `MarianMTModel` or `T5ForConditionalGeneration`
  config.json (a dict) as the `encoder_decoder.Config` it describes.
* `convert_hf`: safetensors tensors, by their Hugging Face names, as the
  `EncoderDecoder` parameter tree (the name maps `_marian_names` and
  `_t5_names`; tensors the tree does not need are reported as left out).
* `export_hf` (the reverse of `convert_hf`: a params tree as Hugging Face
  tensors and config.json) and `hf_linear_names` (where LoRA adapters go in
  PEFT's module names);
* `build` and `FAMILY`: what tuning/models/registry.py lists, for a model
  from a config.json or, without one, from config fields.

The model itself (its config, modules and parameter tree) is
tuning/models/encoder_decoder.py; its cached decoding is
tuning/decoding/encoder_decoder.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import encoder_decoder as ed
from tuning.models import family as family_lib
from tuning.models import hf_config as hf_config_lib
from tuning.models import remat as remat_lib

# ------------------------------------------------------------ config.json


def config_from_hf(
    hf_config: dict, dropout: Optional[float] = None
) -> ed.Config:
  """A `Config` from a Hugging Face config.json dict (marian or t5).

  `dropout`, when not None, replaces the dropout rates of the file.
  """
  model_type = hf_config.get('model_type')
  if model_type == 'marian':
    config = _marian_config(hf_config)
  elif model_type == 't5':
    config = _t5_config(hf_config)
  else:
    raise ValueError(
        f'model_type={model_type!r} is not an encoder-decoder '
        "this module reads: use a 'marian' or 't5' config.json"
    )
  if dropout is not None:
    config = dataclasses.replace(
        config,
        dropout=float(dropout),
        attention_dropout=float(dropout),
        activation_dropout=float(dropout),
    )
  return config


def _marian_config(c: dict) -> ed.Config:
  if c.get('encoder_attention_heads', 16) != c.get(
      'decoder_attention_heads', 16
  ):
    raise ValueError(
        'encoder_attention_heads != decoder_attention_heads is '
        'not supported: use a config with equal head counts'
    )
  if c.get('encoder_ffn_dim', 4096) != c.get('decoder_ffn_dim', 4096):
    raise ValueError(
        'encoder_ffn_dim != decoder_ffn_dim is not supported: '
        'use a config with equal feed-forward widths'
    )
  vocab = c.get('vocab_size', 58101)
  tie = c.get('tie_word_embeddings', True)
  shared_vocab = c.get('share_encoder_decoder_embeddings', True)
  target_vocab = (
      vocab if shared_vocab else (c.get('decoder_vocab_size') or vocab)
  )
  # transformers 5 ties the encoder, decoder and output embeddings only
  # when tie_word_embeddings is true (the output layer to the decoder's
  # embedding when share_encoder_decoder_embeddings is false).
  share = shared_vocab and tie
  pad = c.get('pad_token_id', 58100)
  eos = c.get('eos_token_id', 0)
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  start = c.get('decoder_start_token_id', 58100)
  return ed.Config(
      vocab_size=vocab,
      shape='marian',
      d_model=c.get('d_model', 1024),
      encoder_layers=c.get('encoder_layers', 12),
      decoder_layers=c.get('decoder_layers', 12),
      heads=c.get('encoder_attention_heads', 16),
      ffn_dim=c.get('encoder_ffn_dim', 4096),
      activation=c.get('activation_function', 'gelu'),
      positions='sinusoidal',
      max_positions=c.get('max_position_embeddings', 1024),
      dropout=c.get('dropout', 0.1),
      attention_dropout=c.get('attention_dropout', 0.0),
      activation_dropout=c.get('activation_dropout', 0.0),
      norm_eps=1e-5,
      share_embeddings=share,
      target_vocab_size=None if share else target_vocab,
      tie_output=tie,
      scale_embedding=c.get('scale_embedding', False),
      scale_output=False,
      final_logits_bias=True,
      init_std=c.get('init_std', 0.02),
      pad_id=pad,
      eos_id=eos,
      decoder_start_id=start,
  )


def _t5_config(c: dict) -> ed.Config:
  projection = c.get('feed_forward_proj', 'relu')
  parts = projection.split('-')
  gated = parts[0] == 'gated'
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(
        f'feed_forward_proj={projection!r}: use ACT or '
        'gated-ACT, e.g. relu or gated-gelu'
    )
  activation = 'gelu_new' if projection == 'gated-gelu' else parts[-1]
  tie = c.get('tie_word_embeddings', True)
  # transformers 5 always ties the output layer and saves
  # `scale_decoder_outputs` instead; older files untie it (t5 v1.1) with
  # tie_word_embeddings=false and then do not rescale.
  scale = c.get('scale_decoder_outputs', tie)
  layers = c.get('num_layers', 6)
  eos = c.get('eos_token_id', 1)
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  pad = c.get('pad_token_id', 0)
  start = c.get('decoder_start_token_id')
  return ed.Config(
      vocab_size=c.get('vocab_size', 32128),
      shape='t5',
      d_model=c.get('d_model', 512),
      encoder_layers=layers,
      decoder_layers=c.get('num_decoder_layers') or layers,
      heads=c.get('num_heads', 8),
      head_dim=c.get('d_kv', 64),
      ffn_dim=c.get('d_ff', 2048),
      activation=activation,
      gated=gated,
      positions='relative',
      relative_buckets=c.get('relative_attention_num_buckets', 32),
      relative_max_distance=c.get('relative_attention_max_distance', 128),
      dropout=c.get('dropout_rate', 0.1),
      attention_dropout=c.get('dropout_rate', 0.1),
      activation_dropout=c.get('dropout_rate', 0.1),
      norm_eps=c.get('layer_norm_epsilon', 1e-6),
      share_embeddings=True,
      tie_output=tie,
      scale_embedding=False,
      scale_output=bool(scale),
      final_logits_bias=False,
      init_std=c.get('initializer_factor', 1.0),
      pad_id=pad,
      eos_id=eos,
      decoder_start_id=pad if start is None else start,
  )


# ------------------------------------------------------------ tensor names


def _marian_names(config: ed.Config) -> dict[str, tuple[str, bool]]:
  """HF tensor name -> (Flax path, transpose?) for MarianMTModel."""
  names: dict[str, tuple[str, bool]] = {}
  attention = {
      'q_proj': 'query',
      'k_proj': 'key',
      'v_proj': 'value',
      'out_proj': 'out',
  }

  def linear(hf, path):
    names[f'{hf}.weight'] = (f'{path}/kernel', True)
    names[f'{hf}.bias'] = (f'{path}/bias', False)

  def norm(hf, path):
    names[f'{hf}.weight'] = (f'{path}/scale', False)
    names[f'{hf}.bias'] = (f'{path}/bias', False)

  if config.share_embeddings:
    names['model.shared.weight'] = ('shared/embedding', False)
  else:
    names['model.encoder.embed_tokens.weight'] = (
        'source_embedding/embedding',
        False,
    )
    names['model.decoder.embed_tokens.weight'] = (
        'target_embedding/embedding',
        False,
    )
  for stack, count in (
      ('encoder', config.encoder_layers),
      ('decoder', config.decoder_layers),
  ):
    for i in range(count):
      hf, fx = f'model.{stack}.layers.{i}', f'{stack}/layer_{i}'
      blocks = (
          (('self_attn', 'attention'),)
          if stack == 'encoder'
          else (
              ('self_attn', 'self_attention'),
              ('encoder_attn', 'cross_attention'),
          )
      )
      for hf_block, fx_block in blocks:
        for hf_proj, fx_proj in attention.items():
          linear(f'{hf}.{hf_block}.{hf_proj}', f'{fx}/{fx_block}/{fx_proj}')
        norm(f'{hf}.{hf_block}_layer_norm', f'{fx}/{fx_block}_norm')
      linear(f'{hf}.fc1', f'{fx}/mlp/wi')
      linear(f'{hf}.fc2', f'{fx}/mlp/wo')
      norm(f'{hf}.final_layer_norm', f'{fx}/mlp_norm')
  names['final_logits_bias'] = ('final_logits_bias', False)
  if not config.tie_output:
    names['lm_head.weight'] = ('lm_head/kernel', True)
  return names


def _t5_names(config: ed.Config) -> dict[str, tuple[str, bool]]:
  """HF tensor name -> (Flax path, transpose?) for T5 (conditional LM)."""
  names: dict[str, tuple[str, bool]] = {
      'shared.weight': ('shared/embedding', False)
  }
  attention = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
  mlp = ('wi_0', 'wi_1', 'wo') if config.gated else ('wi', 'wo')
  for stack, count in (
      ('encoder', config.encoder_layers),
      ('decoder', config.decoder_layers),
  ):
    blocks = (
        (('SelfAttention', 'attention'),)
        if stack == 'encoder'
        else (
            ('SelfAttention', 'self_attention'),
            ('EncDecAttention', 'cross_attention'),
        )
    )
    for i in range(count):
      hf, fx = f'{stack}.block.{i}.layer', f'{stack}/layer_{i}'
      for j, (hf_block, fx_block) in enumerate(blocks):
        for hf_proj, fx_proj in attention.items():
          names[f'{hf}.{j}.{hf_block}.{hf_proj}.weight'] = (
              f'{fx}/{fx_block}/{fx_proj}/kernel',
              True,
          )
        names[f'{hf}.{j}.layer_norm.weight'] = (
            f'{fx}/{fx_block}_norm/scale',
            False,
        )
      j = len(blocks)
      for proj in mlp:
        names[f'{hf}.{j}.DenseReluDense.{proj}.weight'] = (
            f'{fx}/mlp/{proj}/kernel',
            True,
        )
      names[f'{hf}.{j}.layer_norm.weight'] = (f'{fx}/mlp_norm/scale', False)
    names[
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.'
        'weight'
    ] = (f'{stack}/relative_attention_bias/embedding', False)
    names[f'{stack}.final_layer_norm.weight'] = (
        f'{stack}/final_norm/scale',
        False,
    )
  if not config.tie_output:
    names['lm_head.weight'] = ('lm_head/kernel', True)
  return names


# Tensors a checkpoint may hold that the Flax tree does not need.
_LEFT_OUT = (
    (
        r'model\.(en|de)coder\.embed_positions\.weight',
        'sinusoidal positions, computed',
    ),
    (
        r'(model\.)?(en|de)coder\.embed_tokens\.weight',
        'copy of the shared embedding',
    ),
    (r'lm_head\.weight', 'tied to the target embedding'),
    (r'model\.shared\.weight', 'unused when tie_word_embeddings is false'),
    (
        r'decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias'
        r'\.weight',
        'unused by transformers too',
    ),
)


def convert_hf(
    tensors: dict[str, np.ndarray], hf_config: dict, keep=None
) -> tuple[dict, dict]:
  """Maps Hugging Face safetensors (by name) onto the `EncoderDecoder` tree.

  Returns (params, report); report has `converted` (a count) and
  `left_out` ({name: reason}). Raises a ValueError naming any missing or
  unexpected tensor and any shape that does not fit the config.
  `keep(path, array)` (optional) is given each parameter as it is converted
  and the tree holds what it returns (tuning/formats/huggingface.py `spill`).
  """
  keep = keep or (lambda path, array: array)
  config = config_from_hf(hf_config)
  names = (_marian_names if config.shape == 'marian' else _t5_names)(config)
  tensors = dict(tensors)
  if config.shape == 'marian' and not config.share_embeddings:
    # Files that transformers 4 saved keep only the shared table.
    for stack in ('encoder', 'decoder'):
      name = f'model.{stack}.embed_tokens.weight'
      if name not in tensors and 'model.shared.weight' in tensors:
        tensors[name] = tensors['model.shared.weight']
  flat, left_out, unexpected = {}, {}, []
  for name, value in tensors.items():
    if name in names:
      path, transpose = names[name]
      value = np.asarray(value, np.float32)
      if name == 'final_logits_bias':
        value = value.reshape(-1)
      flat[path] = keep(
          path, np.ascontiguousarray(value.T if transpose else value)
      )
      continue
    reason = next(
        (r for pattern, r in _LEFT_OUT if re.fullmatch(pattern, name)), None
    )
    if reason is None:
      unexpected.append(name)
    else:
      left_out[name] = reason
  missing = sorted(n for n, (path, _) in names.items() if path not in flat)
  if missing == ['final_logits_bias']:  # optional in transformers: zeros
    flat['final_logits_bias'] = np.zeros((config.target_vocab,), np.float32)
    missing = []
  problems = []
  if missing:
    problems.append(f'missing tensors: {", ".join(missing)}')
  if unexpected:
    problems.append(f'unexpected tensors: {", ".join(sorted(unexpected))}')
  if problems:
    raise ValueError(
        'cannot convert the checkpoint ('
        + '; '.join(problems)
        + '): check that config.json belongs to these weights'
    )
  _check_shapes(flat, config)
  params = {}
  for path, value in flat.items():
    node = params
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return params, {'converted': len(flat), 'left_out': left_out}


def _check_shapes(flat: dict, config: ed.Config) -> None:
  model = ed.EncoderDecoder(config)
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids)
  )['params']
  expected = {
      '/'.join(k.key for k in path): leaf.shape
      for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
  }
  bad = [
      f'{p}: checkpoint {v.shape} vs config {expected.get(p)}'
      for p, v in sorted(flat.items())
      if expected.get(p) != v.shape
  ]
  missing = sorted(set(expected) - set(flat))
  if bad or missing:
    raise ValueError(
        'the checkpoint does not fit its config.json ('
        + '; '.join(bad + [f'{p}: missing' for p in missing])
        + '): convert it with its own config.json'
    )


# ------------------------------------------------------------ export

_ARCHITECTURES = {
    'marian': 'MarianMTModel',
    't5': 'T5ForConditionalGeneration',
}


def _names(config: ed.Config) -> dict[str, tuple[str, bool]]:
  return (_marian_names if config.shape == 'marian' else _t5_names)(config)


def _read(hf_config) -> dict:
  if isinstance(hf_config, dict):
    return dict(hf_config)
  return hf_config_lib.read_hf_config(hf_config)


def export_hf(params, hf_config) -> tuple[dict[str, np.ndarray], dict]:
  """An `EncoderDecoder` params tree as `MarianMTModel` /
  `T5ForConditionalGeneration` tensors (float32 numpy, [out, in] Linear
  weights) and the config.json to write: the reverse of `convert_hf`, from
  the same name maps.

  Tied tables are written once, as transformers 5 saves them: Marian's
  `model.shared.weight` (and, for a shared vocabulary with untied tables, a
  copy of the source table there, which transformers keeps but does not
  use), `final_logits_bias` as [1, vocab], `lm_head.weight` only when the
  output layer is untied; T5's `shared.weight`, and `lm_head.weight` with
  `tie_word_embeddings` false and `scale_decoder_outputs` false (t5 v1.1).
  Raises a ValueError naming missing or unexpected parameters."""
  hf = _read(hf_config)
  config = config_from_hf(hf)
  names = _names(config)
  flat = family_lib.flat_float32(params)
  family_lib.check_export_paths(
      flat, {path for path, _ in names.values()}, config.shape
  )
  tensors = {}
  for name, (path, transpose) in names.items():
    value = flat[path]
    if name == 'final_logits_bias':
      value = value.reshape(1, -1)
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  out = dict(hf, architectures=[_ARCHITECTURES[config.shape]])
  out['tie_word_embeddings'] = config.tie_output
  if config.shape == 'marian':
    if (
        hf.get('share_encoder_decoder_embeddings', True)
        and not config.share_embeddings
    ):
      tensors['model.shared.weight'] = tensors[
          'model.encoder.embed_tokens.weight'
      ].copy()
  else:
    out['scale_decoder_outputs'] = config.scale_output
  return tensors, out


def hf_linear_names(hf_config) -> dict[str, str]:
  """{Flax Dense module path: transformers nn.Linear module name}, e.g.
  'encoder/layer_0/attention/query' -> 'model.encoder.layers.0.self_attn.
  q_proj' (Marian) or 'encoder.block.0.layer.0.SelfAttention.q' (T5), and
  an untied 'lm_head'."""
  config = config_from_hf(_read(hf_config))
  modules = {}
  for name, (path, transpose) in _names(config).items():
    module, _, leaf = path.rpartition('/')
    if leaf == 'kernel' and transpose and name.endswith('.weight'):
      modules[module] = name.removesuffix('.weight')
  return modules


# ------------------------------------------------------------ the family


def build(
    model_config, dtype, *, num_outputs=None, vocab_size=None
) -> ed.EncoderDecoder:
  """An `EncoderDecoder` from `model_config.hf_config` (a config.json path,
  a folder holding one, or a dict) or, without it, from config fields for
  training from scratch (see `encoder_decoder.config_from_fields`; `vocab_size` is the
  tokenizer's). `model_config.dropout` (if set) overrides the file's;
  `model_config.remat` and `remat_names` (optional) rematerialise the
  blocks (tuning/models/remat.py)."""
  hf_config = model_config.get('hf_config', None)
  if hf_config:
    if not isinstance(hf_config, dict):
      hf_config = hf_config_lib.read_hf_config(hf_config)
    config = config_from_hf(dict(hf_config), model_config.get('dropout', None))
    if vocab_size is not None and vocab_size > config.vocab_size:
      raise ValueError(
          f'the tokenizer has {vocab_size} tokens but the model '
          f'embeds {config.vocab_size}: use its own tokenizer'
      )
  else:
    if not vocab_size:
      raise ValueError(
          'an encoder-decoder from scratch needs the '
          "tokenizer's vocab_size: set config.data tokenizer "
          'fields or model.hf_config'
      )
    config = ed.config_from_fields(model_config, vocab_size)
  if num_outputs is not None and num_outputs != config.target_vocab:
    raise ValueError(
        f'num_outputs={num_outputs} differs from the target '
        f'vocabulary ({config.target_vocab}): leave it None'
    )
  config = dataclasses.replace(
      config, **remat_lib.from_model_config(model_config)
  )
  return ed.EncoderDecoder(config, jnp.dtype(dtype))


FAMILY = family_lib.Family(
    names=('encoder_decoder', 'marian', 't5'),
    build=build,
    hf_model_types=('marian', 't5'),
    convert_hf=convert_hf,
    export_hf=export_hf,
    hf_linear_names=hf_linear_names,
    head_regex=(r'lm_head/.*', r'final_logits_bias'),
    lora_targets=(
        r'.*(attention|self_attention|cross_attention)/'
        r'(query|key|value|out)',
        r'.*mlp/(wi|wi_0|wi_1|wo)',
    ),
    layer_regex=r'(?:encoder|decoder)/layer_(\d+)/.*',
)
