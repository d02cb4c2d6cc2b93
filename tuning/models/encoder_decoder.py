"""Encoder-decoder Transformers in Flax Linen: the Marian/BART and T5 shapes.

One module covers both shapes of Hugging Face's translation models:

* 'marian' (`MarianMTModel`): post-LayerNorm blocks with biases, sinusoidal
  (or, from scratch, learned) absolute positions, embeddings scaled by
  sqrt(d_model), attention scores scaled by head_dim**-0.5, an output layer
  tied to the shared embedding plus `final_logits_bias`.
* 't5' (`T5ForConditionalGeneration`): pre-norm blocks with an RMS norm (no
  mean subtraction, no bias), no biases anywhere, relative position buckets
  (bidirectional in the encoder, causal in the decoder) shared by the layers
  of a stack, unscaled attention scores, a final norm per stack, ReLU or
  gated-GELU (t5 v1.1) feed-forward layers, and the tied output layer applied
  to the decoder output times d_model**-0.5.

Parameter tree (float32; `/`-joined paths):

    shared/embedding                               [vocab, d_model]
      (or source_embedding/embedding and target_embedding/embedding when the
      encoder and decoder vocabularies are not shared)
    {encoder,decoder}/position_embedding/embedding      learned positions
    {encoder,decoder}/relative_attention_bias/embedding  t5 [buckets, heads]
    encoder/layer_<i>/attention/{query,key,value,out}/{kernel,bias}
    encoder/layer_<i>/attention_norm/{scale,bias}
    encoder/layer_<i>/mlp/{wi (or wi_0, wi_1),wo}/{kernel,bias}
    encoder/layer_<i>/mlp_norm/{scale,bias}
    decoder/layer_<i>/self_attention/..., self_attention_norm/...
    decoder/layer_<i>/cross_attention/..., cross_attention_norm/...
    decoder/layer_<i>/mlp/..., mlp_norm/...
    {encoder,decoder}/final_norm/scale                   t5 (pre-norm)
    lm_head/kernel                                       untied output layer
    final_logits_bias                                    marian [vocab]

(t5 has no `bias` leaves.) `dtype` is the compute dtype: matmuls run in it;
norms, softmax and the returned logits are float32.

Decoding one token at a time passes `decode` a self-attention cache (the
keys and values of every decoder layer, written in place at
`cache['index']`) and `cross_keys_values` (the encoder output's
cross-attention keys and values, computed once per source):
tuning/decoding/encoder_decoder.py makes the cache and runs beam search with
them. The Hugging Face side (config.json, tensor names) and the family's
`FAMILY` declaration are tuning/models/encoder_decoder_hf.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import activations
from tuning.models import remat as remat_lib
from tuning.platform import bf16_matmul
from tuning.models.dropout import Dropout

SHAPES = ('marian', 't5')
POSITIONS = ('sinusoidal', 'learned', 'relative')
_ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': activations.exact_gelu,  # HF "gelu" is the exact erf form.
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'swish': nn.silu,
    'silu': nn.silu,
}
_NEG = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class Config:
  """The architecture; `config_from_fields` (training from scratch) and
  `encoder_decoder_hf.config_from_hf` (a config.json) fill it."""

  vocab_size: int
  shape: str = 'marian'
  d_model: int = 512
  encoder_layers: int = 6
  decoder_layers: int = 6
  heads: int = 8
  head_dim: Optional[int] = None  # None: d_model // heads
  ffn_dim: int = 2048
  activation: str = 'relu'
  gated: bool = False  # act(wi_0 x) * wi_1 x (t5 v1.1)
  positions: str = 'sinusoidal'
  max_positions: int = 512  # sinusoidal/learned table size
  relative_buckets: int = 32
  relative_max_distance: int = 128
  dropout: float = 0.1
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  norm_eps: float = 1e-5
  share_embeddings: bool = True  # one table for encoder and decoder inputs
  target_vocab_size: Optional[int] = None  # None: vocab_size
  tie_output: bool = True  # output layer = the target embedding, transposed
  scale_embedding: bool = True  # inputs times sqrt(d_model) (marian)
  scale_output: bool = False  # decoder output times d_model**-0.5 (t5)
  final_logits_bias: bool = True  # marian
  init_std: float = 0.02
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0
  # Rematerialisation of the blocks (tuning/models/remat.py): 'none' keeps
  # every activation for the backward pass.
  remat: str = 'none'
  remat_names: tuple[str, ...] = ()

  def __post_init__(self):
    remat_lib.check(self.remat, self.remat_names)
    if self.shape not in SHAPES:
      raise ValueError(
          f'encoder-decoder shape={self.shape!r}: use one of ' f'{SHAPES}'
      )
    if self.positions not in POSITIONS:
      raise ValueError(
          f'encoder-decoder positions={self.positions!r}: use '
          f'one of {POSITIONS}'
      )
    if (self.positions == 'relative') != (self.shape == 't5'):
      raise ValueError(
          f'positions={self.positions!r} does not fit shape='
          f'{self.shape!r}: t5 uses relative positions, marian '
          'sinusoidal or learned ones'
      )
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
          f'activation={self.activation!r}: use one of '
          f'{sorted(_ACTIVATIONS)}'
      )
    if self.head_dim is None and self.d_model % self.heads:
      raise ValueError(
          f'd_model={self.d_model} is not divisible by heads='
          f'{self.heads}: change one of them'
      )
    if self.shape == 't5' and not self.share_embeddings:
      raise ValueError('t5 shares its embeddings: set share_embeddings')
    if self.share_embeddings and self.target_vocab_size not in (
        None,
        self.vocab_size,
    ):
      raise ValueError(
          'shared embeddings need one vocabulary: drop '
          'target_vocab_size or set share_embeddings=False'
      )

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.heads

  @property
  def target_vocab(self) -> int:
    return self.target_vocab_size or self.vocab_size

  @property
  def pre_norm(self) -> bool:
    return self.shape == 't5'

  @property
  def use_bias(self) -> bool:
    return self.shape == 'marian'


def config_from_fields(model_config, vocab_size: int) -> Config:
  """A `Config` for training from scratch, from `config.model` fields.

  Fields (all optional but `vocab_size`, which comes from the tokenizer):
  `shape` ('marian' | 't5'), `layers` (both stacks) or `encoder_layers` /
  `decoder_layers`, `width` (d_model), `heads`, `ffn_width`, `activation`,
  `gated`, `positions` (marian: 'sinusoidal' | 'learned'), `max_positions`
  (the position table), `dropout`, `attention_dropout`, `tie_embeddings`,
  `pad_id`, `eos_id`, `decoder_start_id` (default: `pad_id`).
  """
  get = model_config.get
  shape = get('shape', 'marian') or 'marian'
  t5 = shape == 't5'
  layers = get('layers', 6) or 6
  pad = get('pad_id', 0) or 0
  start = get('decoder_start_id', None)
  dropout = get('dropout', 0.1)
  dropout = 0.1 if dropout is None else float(dropout)
  attention_dropout = get('attention_dropout', None)
  return Config(
      vocab_size=int(vocab_size),
      shape=shape,
      d_model=get('width', 512),
      encoder_layers=get('encoder_layers', None) or layers,
      decoder_layers=get('decoder_layers', None) or layers,
      heads=get('heads', 8),
      ffn_dim=get('ffn_width', 2048),
      activation=get('activation', None) or 'relu',
      gated=bool(get('gated', False)),
      positions='relative' if t5 else (get('positions', None) or 'sinusoidal'),
      max_positions=get('max_positions', 512) or 512,
      dropout=dropout,
      attention_dropout=(
          dropout if attention_dropout is None else float(attention_dropout)
      ),
      activation_dropout=0.0 if not t5 else dropout,
      norm_eps=1e-6 if t5 else 1e-5,
      share_embeddings=True,
      tie_output=bool(get('tie_embeddings', True)),
      scale_embedding=not t5,
      scale_output=t5 and bool(get('tie_embeddings', True)),
      final_logits_bias=not t5,
      init_std=1.0 if t5 else 0.02,
      pad_id=pad,
      eos_id=get('eos_id', 1),
      decoder_start_id=pad if start is None else start,
  )


# ------------------------------------------------------------ building blocks


@functools.lru_cache(maxsize=8)
def sinusoidal_table(positions: int, dim: int) -> np.ndarray:
  """Marian's table: sin features in the first half, cos in the second
  (computed in float64 like transformers, then rounded; do not modify)."""
  j = np.arange(dim)
  angles = (
      np.arange(positions)[:, None]
      / np.power(10000, 2 * (j // 2) / dim)[None, :]
  )
  half = dim // 2 if dim % 2 == 0 else dim // 2 + 1
  table = np.empty((positions, dim), np.float32)
  table[:, :half] = np.sin(angles[:, 0::2])
  table[:, half:] = np.cos(angles[:, 1::2])
  return table


def relative_buckets(
    relative_position, bidirectional: bool, num_buckets: int, max_distance: int
):
  """T5's bucket of each (key - query) offset, as in mesh-tensorflow."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * (
        num_buckets
    )
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  ratio = jnp.float32(math.log(max_distance / max_exact))
  large = jnp.log(relative_position.astype(jnp.float32) / max_exact)
  large = max_exact + (large / ratio * (num_buckets - max_exact)).astype(
      relative_position.dtype
  )
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


def _kernel_init(config: Config, fan_in: int, query: bool = False):
  if config.shape == 'marian':
    return nn.initializers.normal(config.init_std)
  # T5's scheme (scores are not scaled, so queries start smaller).
  scale = config.init_std * fan_in**-0.5
  if query:
    scale /= config.dim_per_head**0.5
  return nn.initializers.normal(scale)


def _dense(
    config: Config, features: int, fan_in: int, dtype, query: bool = False
) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=config.use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=_kernel_init(config, fan_in, query),
      **bf16_matmul.dense_options(dtype),
  )


def _norm(config: Config) -> nn.Module:
  if config.shape == 't5':
    return nn.RMSNorm(
        epsilon=config.norm_eps, dtype=jnp.float32, param_dtype=jnp.float32
    )
  return nn.LayerNorm(
      epsilon=config.norm_eps,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      use_fast_variance=False,
  )


class Attention(nn.Module):
  """Multi-head attention; keys/values come from `keys_values`."""

  config: Config
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    inner = c.heads * c.dim_per_head
    self.query = _dense(c, inner, c.d_model, self.dtype, query=True)
    self.key = _dense(c, inner, c.d_model, self.dtype)
    self.value = _dense(c, inner, c.d_model, self.dtype)
    self.out = _dense(c, c.d_model, inner, self.dtype)
    self.dropout = Dropout(c.attention_dropout)

  def _split(self, dense, x, name):
    """`dense` on the rows of x [B, L, features] -> [B, L, heads, dim],
    tagged `name` (tuning/models/remat.py)."""
    y = remat_lib.tag(dense(x.reshape(-1, x.shape[-1])), name)
    return y.reshape(
        x.shape[:-1] + (self.config.heads, self.config.dim_per_head)
    )

  def keys_values(self, x):
    """[B, L, heads, head_dim] keys and values of `x` [B, L, d_model]."""
    return self._split(self.key, x, 'key'), self._split(self.value, x, 'value')

  def __call__(self, x, keys, values, bias, *, train: bool):
    """`bias`: additive float32, broadcastable to [B, heads, Q, K]."""
    c = self.config
    q = self._split(self.query, x, 'query')
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, keys).astype(jnp.float32)
    if c.shape == 'marian':
      scores = scores * (c.dim_per_head**-0.5)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    probs = self.dropout(probs, deterministic=not train)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), values)
    ctx = remat_lib.tag(
        ctx.reshape(ctx.shape[0] * ctx.shape[1], -1), 'attention_context'
    )
    rows = remat_lib.tag(self.out(ctx), 'attention_out')
    return rows.reshape(ctx.shape[:2] + (-1,))


class Mlp(nn.Module):
  """The feed-forward block: wi (or gated wi_0, wi_1), activation, wo."""

  config: Config
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    if c.gated:
      self.wi_0 = _dense(c, c.ffn_dim, c.d_model, self.dtype)
      self.wi_1 = _dense(c, c.ffn_dim, c.d_model, self.dtype)
    else:
      self.wi = _dense(c, c.ffn_dim, c.d_model, self.dtype)
    self.wo = _dense(c, c.d_model, c.ffn_dim, self.dtype)
    self.dropout = Dropout(c.activation_dropout)

  def __call__(self, x, *, train: bool):
    act = _ACTIVATIONS[self.config.activation]
    if self.config.gated:
      h = act(self.wi_0(x)) * self.wi_1(x)
    else:
      h = act(self.wi(x))
    h = remat_lib.tag(h, 'mlp_hidden')
    return remat_lib.tag(
        self.wo(self.dropout(h, deterministic=not train)), 'mlp_out'
    )


def _residual(config: Config, x, norm, fn, dropout, train):
  """Pre-norm x + f(norm(x)) or post-norm norm(x + f(x)), with dropout."""
  if config.pre_norm:
    y = fn(norm(x).astype(x.dtype))
    return x + dropout(y, deterministic=not train)
  y = fn(x)
  return norm(x + dropout(y, deterministic=not train)).astype(x.dtype)


class EncoderLayer(nn.Module):
  """Self-attention and feed-forward sub-layers (`train` may be passed
  by position: a static argument under `nn.remat`, see `_remat`)."""

  config: Config
  dtype: Any = jnp.float32

  def setup(self):
    self.attention = Attention(self.config, self.dtype)
    self.attention_norm = _norm(self.config)
    self.mlp = Mlp(self.config, self.dtype)
    self.mlp_norm = _norm(self.config)
    self.dropout = Dropout(self.config.dropout)

  def __call__(self, x, bias, train: bool = False):
    shape = x.shape

    def attend(h):
      h = h.reshape(shape)
      y = self.attention(h, *self.attention.keys_values(h), bias, train=train)
      return y.reshape(-1, shape[-1])

    # All but attention on [B * L, d_model] rows (see decoder.Block).
    x = x.reshape(-1, shape[-1])
    x = _residual(
        self.config, x, self.attention_norm, attend, self.dropout, train
    )
    return _residual(
        self.config,
        x,
        self.mlp_norm,
        functools.partial(self.mlp, train=train),
        self.dropout,
        train,
    ).reshape(shape)


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention and feed-forward sub-layers
  (`train` may be passed by position, as `EncoderLayer`'s)."""

  config: Config
  dtype: Any = jnp.float32

  def setup(self):
    self.self_attention = Attention(self.config, self.dtype)
    self.self_attention_norm = _norm(self.config)
    self.cross_attention = Attention(self.config, self.dtype)
    self.cross_attention_norm = _norm(self.config)
    self.mlp = Mlp(self.config, self.dtype)
    self.mlp_norm = _norm(self.config)
    self.dropout = Dropout(self.config.dropout)

  def __call__(
      self, x, self_bias, cross_kv, cross_bias, cache, index, train=False
  ):
    """`cache`: None, or this layer's {'key', 'value'} [B, L, heads, dim]
    written at `index`; returns (x, the updated cache or None)."""
    new_cache = None
    shape = x.shape

    def attend_self(h):
      nonlocal new_cache
      h = h.reshape(shape)
      keys, values = self.self_attention.keys_values(h)
      if cache is not None:
        keys = jax.lax.dynamic_update_slice(
            cache['key'], keys.astype(cache['key'].dtype), (0, index, 0, 0)
        )
        values = jax.lax.dynamic_update_slice(
            cache['value'],
            values.astype(cache['value'].dtype),
            (0, index, 0, 0),
        )
        new_cache = {'key': keys, 'value': values}
      y = self.self_attention(h, keys, values, self_bias, train=train)
      return y.reshape(-1, shape[-1])

    def attend_cross(h):
      y = self.cross_attention(
          h.reshape(shape), *cross_kv, cross_bias, train=train
      )
      return y.reshape(-1, shape[-1])

    # All but attention on [B * L, d_model] rows (see decoder.Block).
    x = x.reshape(-1, shape[-1])
    c = self.config
    x = _residual(
        c, x, self.self_attention_norm, attend_self, self.dropout, train
    )
    x = _residual(
        c, x, self.cross_attention_norm, attend_cross, self.dropout, train
    )
    x = _residual(
        c,
        x,
        self.mlp_norm,
        functools.partial(self.mlp, train=train),
        self.dropout,
        train,
    )
    return x.reshape(shape), new_cache


# Where `train` is among each layer's `__call__` arguments (self is 0).
_TRAIN_ARGNUM = {EncoderLayer: 3, DecoderLayer: 7}


def _remat(config: Config, layer_cls):
  """`layer_cls`, or `layer_cls` under `nn.remat` with `config.remat`'s
  policy (`train` static)."""
  return remat_lib.wrap(
      layer_cls,
      config.remat,
      config.remat_names,
      static_argnums=(_TRAIN_ARGNUM[layer_cls],),
  )


class _Stack(nn.Module):
  """What the encoder and decoder stacks share: positions and final norm."""

  config: Config
  dtype: Any = jnp.float32

  def _setup_common(self, layer_cls):
    c = self.config
    self.num_layers = (
        c.encoder_layers if layer_cls is EncoderLayer else c.decoder_layers
    )
    block = _remat(c, layer_cls)
    for i in range(self.num_layers):
      setattr(self, f'layer_{i}', block(c, self.dtype))
    if c.positions == 'learned':
      self.position_embedding = nn.Embed(
          c.max_positions,
          c.d_model,
          param_dtype=jnp.float32,
          embedding_init=nn.initializers.normal(c.init_std),
      )
    if c.positions == 'relative':
      self.relative_attention_bias = nn.Embed(
          c.relative_buckets,
          c.heads,
          param_dtype=jnp.float32,
          embedding_init=nn.initializers.normal(c.init_std * c.d_model**-0.5),
      )
    if c.pre_norm:
      self.final_norm = _norm(c)
    self.dropout = Dropout(c.dropout)

  def layers(self):
    return [getattr(self, f'layer_{i}') for i in range(self.num_layers)]

  def _embed(self, x, start, *, train: bool):
    """Adds absolute positions start.. (if any) and applies dropout."""
    c = self.config
    length = x.shape[1]
    if c.positions != 'relative':
      if isinstance(start, int) and start + length > c.max_positions:
        raise ValueError(
            f'sequence length {start + length} exceeds the '
            f'{c.max_positions} positions: shorten it or raise '
            'max_positions'
        )
      positions = start + jnp.arange(length)
      if c.positions == 'sinusoidal':
        table = jnp.asarray(sinusoidal_table(c.max_positions, c.d_model))
        x = x + jnp.take(table, positions, axis=0)[None]
      else:
        x = x + self.position_embedding(positions)[None]
    return self.dropout(x, deterministic=not train).astype(self.dtype)

  def _relative_bias(
      self, query_start, query_length, key_length, bidirectional
  ):
    """[1, heads, Q, K] float32 T5 bias, or 0.0 for absolute positions."""
    c = self.config
    if c.positions != 'relative':
      return 0.0
    query = query_start + jnp.arange(query_length)[:, None]
    key = jnp.arange(key_length)[None, :]
    buckets = relative_buckets(
        key - query, bidirectional, c.relative_buckets, c.relative_max_distance
    )
    values = self.relative_attention_bias(buckets).astype(jnp.float32)
    return values.transpose(2, 0, 1)[None]

  def _finish(self, x, *, train: bool):
    if self.config.pre_norm:
      x = self.final_norm(x)
      x = self.dropout(x, deterministic=not train)
    return x.astype(self.dtype)


def _padding_bias(mask):
  """[B, 1, 1, K] additive bias from a [B, K] 0/1 mask."""
  return jnp.where(mask[:, None, None, :] > 0, 0.0, _NEG).astype(jnp.float32)


class Encoder(_Stack):
  """The encoder stack: token embeddings in, hidden states out."""

  def setup(self):
    self._setup_common(EncoderLayer)

  def __call__(self, embedded, mask, *, train: bool):
    length = embedded.shape[1]
    x = self._embed(embedded, 0, train=train)
    bias = _padding_bias(mask) + self._relative_bias(0, length, length, True)
    for layer in self.layers():
      x = layer(x, bias, train)  # train by position (static under remat)
    return self._finish(x, train=train)


class Decoder(_Stack):
  """The decoder stack, over full sequences or cached one step at a time."""

  def setup(self):
    self._setup_common(DecoderLayer)

  def cross_keys_values(self, encoded):
    return tuple(
        layer.cross_attention.keys_values(encoded) for layer in self.layers()
    )

  def __call__(
      self, embedded, mask, cross_kv, source_mask, cache=None, *, train: bool
  ):
    length = embedded.shape[1]
    cross_bias = _padding_bias(source_mask)
    if cache is None:
      index = 0
      keys = length
      allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
      if mask is not None:
        allowed = allowed & (mask[:, None, None, :] > 0)
    else:
      index = cache['index']
      keys = cache['layer_0']['key'].shape[1]
      allowed = (
          jnp.arange(keys)[None, :] <= index + jnp.arange(length)[:, None]
      )[None, None]
    self_bias = jnp.where(allowed, 0.0, _NEG).astype(
        jnp.float32
    ) + self._relative_bias(index, length, keys, False)
    x = self._embed(embedded, index, train=train)
    new_cache = {'index': index + length} if cache is not None else None
    for i, layer in enumerate(self.layers()):
      x, layer_cache = layer(
          x,
          self_bias,
          cross_kv[i],
          cross_bias,
          None if cache is None else cache[f'layer_{i}'],
          index,
          train,  # by position (static under remat)
      )
      if cache is not None:
        new_cache[f'layer_{i}'] = layer_cache
    return self._finish(x, train=train), new_cache


class EncoderDecoder(nn.Module):
  """A sequence-to-sequence Transformer; `__call__` returns float32 logits
  [batch, target_length, target vocab] (teacher forcing)."""

  config: Config
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    init = nn.initializers.normal(c.init_std)

    def embed(vocab):
      return nn.Embed(
          vocab, c.d_model, param_dtype=jnp.float32, embedding_init=init
      )

    if c.share_embeddings:
      self.shared = embed(c.vocab_size)
    else:
      self.source_embedding = embed(c.vocab_size)
      self.target_embedding = embed(c.target_vocab)
    self.encoder = Encoder(c, self.dtype)
    self.decoder = Decoder(c, self.dtype)
    if not c.tie_output:
      self.lm_head = nn.Dense(
          c.target_vocab,
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=_kernel_init(c, c.d_model),
          **bf16_matmul.dense_options(self.dtype),
      )
    if c.final_logits_bias:
      self.final_logits_bias = self.param(
          'final_logits_bias',
          nn.initializers.zeros,
          (c.target_vocab,),
          jnp.float32,
      )

  def _tokens(self, ids, target: bool):
    c = self.config
    table = (
        self.shared
        if c.share_embeddings
        else (self.target_embedding if target else self.source_embedding)
    )
    x = jnp.take(table.embedding, ids, axis=0)
    if c.scale_embedding:
      x = x * math.sqrt(c.d_model)
    return x

  def _logits(self, x):
    c = self.config
    if c.scale_output:
      x = x * (c.d_model**-0.5)
    if c.tie_output:
      table = self.shared if c.share_embeddings else self.target_embedding
      logits = bf16_matmul.tied_logits(x, table.embedding, self.dtype)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)
    if c.final_logits_bias:
      logits = logits + self.final_logits_bias
    return logits

  def encode(self, input_ids, attention_mask=None, *, train: bool = False):
    """Encoder hidden states [B, S, d_model] in `dtype`."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    return self.encoder(
        self._tokens(input_ids, False), attention_mask, train=train
    )

  def cross_keys_values(self, encoded):
    """Each decoder layer's cross-attention (keys, values) of `encoded`."""
    return self.decoder.cross_keys_values(encoded)

  def decode(
      self,
      decoder_input_ids,
      encoded,
      attention_mask,
      decoder_attention_mask=None,
      *,
      cache=None,
      train: bool = False,
  ):
    """Decoder logits [B, T, vocab] float32.

    `encoded`: the encoder output [B, S, d_model], or its
    `cross_keys_values` (computed once per source when decoding step by
    step). `attention_mask`: the source mask [B, S]. Without `cache` the
    T tokens are a whole (teacher-forced) target; with `cache` (from
    tuning/decoding/encoder_decoder.py's `init_cache`) they sit at
    positions cache['index'].. and the return value is (logits, updated
    cache); `decoder_attention_mask` (target padding) applies to whole
    targets only.
    """
    if not isinstance(encoded, (tuple, list)):
      encoded = self.cross_keys_values(encoded)
    if attention_mask is None:
      attention_mask = jnp.ones(encoded[0][0].shape[:2], jnp.int32)
    x, new_cache = self.decoder(
        self._tokens(decoder_input_ids, True),
        decoder_attention_mask,
        encoded,
        attention_mask,
        cache,
        train=train,
    )
    logits = self._logits(x)
    return logits if cache is None else (logits, new_cache)

  def __call__(
      self,
      input_ids,
      attention_mask,
      decoder_input_ids,
      decoder_attention_mask=None,
      *,
      train: bool = False,
  ):
    encoded = self.encode(input_ids, attention_mask, train=train)
    return self.decode(
        decoder_input_ids,
        encoded,
        attention_mask,
        decoder_attention_mask,
        train=train,
    )
