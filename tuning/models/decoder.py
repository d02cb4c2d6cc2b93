"""GPT-style decoders (GPT-2 and Llama) in Flax Linen, matching transformers.

One pre-norm causal Transformer covers both Hugging Face families:

  * GPT-2: learned absolute positions, LayerNorm, GELU (tanh form), biased
    projections (fused QKV in the checkpoint, split here), tied embeddings.
  * Llama: rotary position embeddings (the config's rope theta), RMSNorm,
    grouped-query attention, SwiGLU MLP, tied or untied embeddings.

Parameter tree of `DecoderLM` (all float32):

    decoder/embed/embedding                          [vocab, hidden]
    decoder/position_embed/embedding                 (GPT-2 only)
    decoder/layer_<i>/attention_norm/{scale,bias}    (bias: GPT-2 only)
    decoder/layer_<i>/attention/{query,key,value,out}/{kernel,bias}
    decoder/layer_<i>/mlp_norm/{scale,bias}
    decoder/layer_<i>/mlp/{gate,up,down}/{kernel,bias}   (gate: Llama only)
    decoder/final_norm/{scale,bias}
    lm_head/kernel                                   (untied embeddings only)

Biases exist where the checkpoint has them (GPT-2 always; Llama per
`attention_bias` / `mlp_bias`). `dtype` is the compute dtype (e.g.
bfloat16): matmuls run in it, the norms, the attention softmax and the
returned logits are float32.

Positions come from the attention mask (`cumsum(mask) - 1`, as transformers'
`generate` does), so left-padded batches see the same positions as unpadded
prompts. Packed rows (several documents in one row) pass `segment_ids`
(1..n per document, 0 on padding): a token then attends only to earlier
tokens of its own document, and positions (unless given) restart at 0 at
each document, so each document's logits are those it has alone. With `decode=True` the attention layers keep a key/value cache in
the `cache` collection (`cached_key`, `cached_value`, `cache_index`, as in
flax `examples/wmt`): `init_cache` makes an empty one for a batch and a
maximum length, and each call appends its tokens to it; `attention_mask`
then covers every cache slot and `positions` is required.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import activations
from tuning.platform import bf16_matmul
from tuning.models import hf_config as hf_config_lib
from tuning.models.dropout import Dropout
from tuning.models.family import Family

HF_MODEL_TYPES = ('gpt2', 'llama')

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    'gelu': activations.exact_gelu,  # HF "gelu" is the exact erf form.
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'relu': nn.relu,
    'silu': nn.silu,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """What the decoder needs from a Hugging Face GPT-2 or Llama config."""

  kind: str  # 'gpt2' or 'llama'
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_positions: int
  activation: str
  norm_eps: float
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  attention_bias: bool = False
  mlp_bias: bool = False
  dropout: float = 0.0  # embeddings and residual branches (GPT-2)
  attention_dropout: float = 0.0
  scale_by_inverse_layer: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx
  initializer_range: float = 0.02
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: Optional[int] = None


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


def config_from_hf(hf: dict) -> DecoderConfig:
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
    config = DecoderConfig(
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
    config = DecoderConfig(
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
  if config.activation not in _ACTIVATIONS:
    raise ValueError(
        f'unsupported activation {config.activation!r}: use '
        f'one of {", ".join(sorted(_ACTIVATIONS))}'
    )
  if config.num_heads % config.num_kv_heads:
    raise ValueError(
        f'num_attention_heads={config.num_heads} is not a '
        f'multiple of num_key_value_heads={config.num_kv_heads}'
    )
  return config


def mask_positions(attention_mask: jnp.ndarray) -> jnp.ndarray:
  """Position ids from a padding mask: cumsum - 1, 0 on padding."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


def segment_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
  """Position ids of packed rows: 0 at each document's first token, 0 on
  padding (`segment_ids` [B, L], one contiguous run per document)."""
  seg = segment_ids.astype(jnp.int32)
  index = jnp.broadcast_to(jnp.arange(seg.shape[-1]), seg.shape)
  previous = jnp.pad(seg[..., :-1], [(0, 0)] * (seg.ndim - 1) + [(1, 0)])
  starts = jnp.where(seg != previous, index, 0)
  first = jax.lax.cummax(starts, axis=seg.ndim - 1)
  return (index - first) * (seg > 0)


def rotary(x: jnp.ndarray, positions: jnp.ndarray, theta: float):
  """Rotary embedding of x [B, L, H, D] at positions [B, L] (HF layout).

  Rotates the pairs (i, i + D/2) as transformers' `rotate_half` does,
  computed in float32.
  """
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  xf = x.astype(jnp.float32)
  half = dim // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
  return (xf * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
  """Causal multi-head self-attention with grouped key/value heads.

  `__call__(x, attention_mask, positions, segment_ids=None, decode=...)`:
  `attention_mask` [B, S] marks the keys that may be attended (S = L, or
  the cache length when decoding); `positions` [B, L] feed the rotary
  embedding when `rope_theta` is set; `segment_ids` [B, L] (packed rows,
  not when decoding) keep each query to the keys of its own segment. With
  `decode=True` keys and values are appended to the `cache` collection
  and the queries attend to every cached slot up to their own.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = True
  rope_theta: Optional[float] = None
  dropout: float = 0.0
  scale: float = 1.0  # extra factor on 1/sqrt(head_dim)
  initializer_range: float = 0.02
  dtype: Any = jnp.float32

  def _dense(self, features, name):
    return bf16_matmul.Dense(
        features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.initializers.normal(self.initializer_range),
    )

  @nn.compact
  def __call__(
      self,
      x,
      attention_mask,
      positions,
      segment_ids=None,
      *,
      decode: bool = False,
      train: bool = False,
  ):
    batch, length, _ = x.shape
    heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
    rows = x.reshape(batch * length, -1)  # matmuls on rows (see Block)
    q = self._dense(heads * dim, 'query')(rows).reshape(
        batch, length, heads, dim
    )
    k = self._dense(kv_heads * dim, 'key')(rows).reshape(
        batch, length, kv_heads, dim
    )
    v = self._dense(kv_heads * dim, 'value')(rows).reshape(
        batch, length, kv_heads, dim
    )
    if self.rope_theta is not None:
      q = rotary(q, positions, self.rope_theta)
      k = rotary(k, positions, self.rope_theta)
    offset = 0
    if decode:
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable(
          'cache', 'cached_key', jnp.zeros, k.shape, k.dtype
      )
      cached_value = self.variable(
          'cache', 'cached_value', jnp.zeros, v.shape, v.dtype
      )
      index = self.variable(
          'cache', 'cache_index', lambda: jnp.array(0, jnp.int32)
      )
      if initialized:
        offset = index.value
        start = (0, offset, 0, 0)
        k = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), start
        )
        v = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), start
        )
        cached_key.value, cached_value.value = k, v
        index.value = offset + length
    if attention_mask.shape[-1] != k.shape[1]:
      raise ValueError(
          f'attention_mask covers {attention_mask.shape[-1]} '
          f'keys but there are {k.shape[1]}: when decoding, '
          'give a mask over every cache slot'
      )
    query_slots = offset + jnp.arange(length)
    allowed = (jnp.arange(k.shape[1])[None, :] <= query_slots[:, None])[
        None, :, :
    ] & (
        attention_mask[:, None, :] > 0
    )  # [B, L, S]
    if segment_ids is not None:  # block-diagonal: within each document
      allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, dim)
    scores = jnp.einsum('blhgd,bshd->bhgls', q, k.astype(q.dtype))
    scores = scores.astype(jnp.float32) * (self.scale / np.sqrt(dim))
    scores = scores + bias[:, None, None, :, :]
    probs = jax.nn.softmax(scores, axis=-1)
    probs = Dropout(self.dropout, deterministic=not train)(probs)
    context = jnp.einsum(
        'bhgls,bshd->blhgd', probs.astype(self.dtype), v.astype(self.dtype)
    )
    context = context.reshape(batch * length, heads * dim)
    return self._dense(x.shape[-1], 'out')(context).reshape(x.shape)


class MLP(nn.Module):
  """GPT-2's act(up) -> down, or Llama's SwiGLU down(act(gate) * up)."""

  config: DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config

    def dense(features, name):
      return bf16_matmul.Dense(
          features,
          use_bias=cfg.mlp_bias,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=name,
          kernel_init=nn.initializers.normal(cfg.initializer_range),
      )

    act = _ACTIVATIONS[cfg.activation]
    if cfg.kind == 'llama':
      h = act(dense(cfg.intermediate_size, 'gate')(x)) * dense(
          cfg.intermediate_size, 'up'
      )(x)
    else:
      h = act(dense(cfg.intermediate_size, 'up')(x))
    return dense(cfg.hidden_size, 'down')(h)


def _norm(cfg: DecoderConfig, name: str) -> nn.Module:
  if cfg.kind == 'llama':
    return nn.RMSNorm(
        epsilon=cfg.norm_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name=name,
    )
  return nn.LayerNorm(
      epsilon=cfg.norm_eps,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name=name,
  )


class Block(nn.Module):
  """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

  config: DecoderConfig
  layer: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x, attention_mask, positions, segment_ids, *, decode, train
  ):
    cfg = self.config
    drop = Dropout(cfg.dropout, deterministic=not train)
    # All but attention on [B * L, hidden] rows: XLA:CPU reduces each bias
    # and norm-scale gradient over one axis and feeds the weight gradients'
    # matmuls without transposes (as in bert.BertLayer; issue #14).
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    h = _norm(cfg, 'attention_norm')(x).astype(self.dtype)
    h = Attention(
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.attention_bias,
        cfg.rope_theta if cfg.kind == 'llama' else None,
        cfg.attention_dropout,
        1.0 / (self.layer + 1) if cfg.scale_by_inverse_layer else 1.0,
        cfg.initializer_range,
        self.dtype,
        name='attention',
    )(
        h.reshape(shape),
        attention_mask,
        positions,
        segment_ids,
        decode=decode,
        train=train,
    )
    x = x + drop(h.reshape(x.shape))
    h = _norm(cfg, 'mlp_norm')(x).astype(self.dtype)
    return (x + drop(MLP(cfg, self.dtype, name='mlp')(h))).reshape(shape)


class Decoder(nn.Module):
  """Embeddings, the blocks and the final norm: hidden states [B, L, D]."""

  config: DecoderConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    self.embed = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        embedding_init=init,
    )
    if cfg.kind == 'gpt2':
      self.position_embed = nn.Embed(
          cfg.max_positions,
          cfg.hidden_size,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          embedding_init=init,
      )
    self.layers = [
        Block(cfg, i, self.dtype, name=f'layer_{i}')
        for i in range(cfg.num_layers)
    ]
    self.final_norm = _norm(cfg, 'final_norm')
    self.embed_dropout = Dropout(cfg.dropout)

  def __call__(
      self, input_ids, attention_mask, positions, segment_ids, *, decode, train
  ):
    # Rows gathered from the float32 tables, then cast: nn.Embed would
    # cast the whole table to `dtype` first (a 49k-row table each step).
    x = jnp.take(self.embed.embedding, input_ids, axis=0).astype(self.dtype)
    if self.config.kind == 'gpt2':
      x = x + jnp.take(self.position_embed.embedding, positions, axis=0).astype(
          self.dtype
      )
    x = self.embed_dropout(x, deterministic=not train)
    for layer in self.layers:
      x = layer(
          x, attention_mask, positions, segment_ids, decode=decode, train=train
      )
    return self.final_norm(x).astype(self.dtype)

  def attend(self, hidden):
    """Logits through the tied (transposed) token embedding."""
    return bf16_matmul.tied_logits(hidden, self.embed.embedding, self.dtype)


class DecoderLM(nn.Module):
  """A causal language model: float32 logits [B, L, vocab].

  `__call__(input_ids, attention_mask=None, positions=None,
  segment_ids=None, *, train=False, decode=False, last_only=False)`.
  Without `decode`, `attention_mask` [B, L] marks real tokens (left or
  right padding) and positions default to the mask's cumulative count;
  `segment_ids` [B, L] (packed rows: 1..n per document, 0 on padding)
  confine attention to each document and restart the default positions
  at each. With `decode`, see the module docstring.
  `last_only` returns the logits of the last position only ([B, 1, vocab]).
  """

  config: DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      positions=None,
      segment_ids=None,
      *,
      train: bool = False,
      decode: bool = False,
      last_only: bool = False,
  ):
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if segment_ids is not None:
      if decode:
        raise ValueError('segment_ids (packed rows) cannot be decoded')
      if positions is None:
        positions = segment_positions(segment_ids)
    if positions is None:
      if decode and attention_mask.shape[-1] != input_ids.shape[-1]:
        raise ValueError('decoding with a cache needs explicit positions')
      positions = mask_positions(attention_mask)
    if (
        cfg.kind == 'gpt2'
        and not decode
        and (input_ids.shape[-1] > cfg.max_positions)
    ):
      raise ValueError(
          f'sequence length {input_ids.shape[-1]} exceeds '
          f'n_positions={cfg.max_positions}'
      )
    decoder = Decoder(cfg, self.dtype, name='decoder')
    hidden = decoder(
        input_ids,
        attention_mask,
        positions,
        segment_ids,
        decode=decode,
        train=train,
    )
    if last_only:  # a prefill needs the next-token logits only
      hidden = hidden[:, -1:]
    if cfg.tie_embeddings:
      logits = decoder.attend(hidden)
    else:
      logits = bf16_matmul.Dense(
          cfg.vocab_size,
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name='lm_head',
          kernel_init=nn.initializers.normal(cfg.initializer_range),
      )(hidden)
    return logits.astype(jnp.float32)


def init_cache(model: DecoderLM, batch_size: int, max_length: int):
  """An empty key/value cache for `batch_size` sequences of `max_length`."""
  ids = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), ids, decode=True)
  )['cache']
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def from_hf_config(
    hf_config, dtype=jnp.float32, dropout: Optional[float] = None
) -> DecoderLM:
  """A `DecoderLM` for a config dict, config.json or folder holding one."""
  config = config_from_hf(read_hf_config(hf_config))
  if dropout is not None:
    config = dataclasses.replace(
        config, dropout=float(dropout), attention_dropout=float(dropout)
    )
  return DecoderLM(config, jnp.dtype(dtype))


def build(model_config, dtype, *, num_outputs=None, vocab_size=None):
  """Registry builder: `model_config.hf_config` names the config.json.

  `model_config.dropout` (optional) overrides the dropout rates. The
  vocabulary is the checkpoint's: `num_outputs` must be None or equal it.
  """
  del vocab_size  # the model embeds its own pretrained vocabulary
  hf_path = model_config.get('hf_config')
  if not hf_path:
    raise ValueError(
        'model.hf_config is not set: give a Hugging Face '
        'config.json or a folder holding one'
    )
  model = from_hf_config(hf_path, dtype, model_config.get('dropout', None))
  if num_outputs not in (None, model.config.vocab_size):
    raise ValueError(
        f'a decoder predicts its vocabulary '
        f'({model.config.vocab_size} tokens), not '
        f'{num_outputs} outputs: use the causal_lm task'
    )
  return model


# ------------------------------------------------------------ conversion


def _hf_names(cfg: DecoderConfig) -> dict[str, tuple[str, Callable]]:
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
    tensors: dict[str, np.ndarray], hf_config: dict
) -> tuple[dict, dict[str, Any]]:
  """Maps HF GPT-2 / Llama safetensors onto the `DecoderLM` params tree.

  Returns `(params, report)`; the report has `converted` (tensor count),
  `left_out` ({name: reason}) and `tied_embeddings`. Raises a ValueError
  naming missing or unexpected tensors and shape mismatches.
  """
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
      params[path] = np.ascontiguousarray(
          transform(np.asarray(value, np.float32))
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


def _check_shapes(params: dict[str, np.ndarray], cfg: DecoderConfig):
  model = DecoderLM(cfg)
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


FAMILY = Family(
    names=('decoder', 'gpt2', 'llama'),
    build=build,
    hf_model_types=HF_MODEL_TYPES,
    convert_hf=convert_hf,
    # The untied output projection and the final norm (a tied model's
    # output projection is the token embedding).
    head_regex=(r'lm_head/.*', r'decoder/final_norm/.*'),
    lora_targets=(
        r'.*attention/(query|key|value|out)',
        r'.*mlp/(gate|up|down)',
    ),
    layer_regex=r'.*layer_(\d+)/.*',
)
