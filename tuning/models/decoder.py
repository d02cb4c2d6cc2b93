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
each document, so each document's logits are those it has alone. With
`decode=True` the attention layers keep a key/value cache in the `cache`
collection (`cached_key`, `cached_value`, `cache_index`, as in flax
`examples/wmt`): tuning/decoding/sampling.py's `init_cache` makes an empty
one for a batch and a maximum length, and each call appends its tokens to
it; `attention_mask` then covers every cache slot and `positions` is
required.

The Hugging Face side (config.json, tensor names) and the family's `FAMILY`
declaration are tuning/models/decoder_hf.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import activations
from tuning.models import remat as remat_lib
from tuning.platform import bf16_matmul
from tuning.models.dropout import Dropout

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
  # Rematerialisation of the blocks (tuning/models/remat.py): 'none' keeps
  # every activation for the backward pass.
  remat: str = 'none'
  remat_names: tuple[str, ...] = ()

  def __post_init__(self):
    remat_lib.check(self.remat, self.remat_names)
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
          f'unsupported activation {self.activation!r}: use '
          f'one of {", ".join(sorted(_ACTIVATIONS))}'
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_attention_heads={self.num_heads} is not a '
          f'multiple of num_key_value_heads={self.num_kv_heads}'
      )


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
    return nn.Dense(
        features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.initializers.normal(self.initializer_range),
        **bf16_matmul.dense_options(self.dtype),
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
    project = lambda n, name: remat_lib.tag(  # pylint: disable=g-long-lambda
        self._dense(n * dim, name)(rows), name
    ).reshape(batch, length, n, dim)
    q = project(heads, 'query')
    k = project(kv_heads, 'key')
    v = project(kv_heads, 'value')
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
    context = remat_lib.tag(
        context.reshape(batch * length, heads * dim), 'attention_context'
    )
    out = remat_lib.tag(
        self._dense(x.shape[-1], 'out')(context), 'attention_out'
    )
    return out.reshape(x.shape)


class MLP(nn.Module):
  """GPT-2's act(up) -> down, or Llama's SwiGLU down(act(gate) * up)."""

  config: DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config

    def dense(features, name):
      return nn.Dense(
          features,
          use_bias=cfg.mlp_bias,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=name,
          kernel_init=nn.initializers.normal(cfg.initializer_range),
          **bf16_matmul.dense_options(self.dtype),
      )

    act = _ACTIVATIONS[cfg.activation]
    if cfg.kind == 'llama':
      h = act(dense(cfg.intermediate_size, 'gate')(x)) * dense(
          cfg.intermediate_size, 'up'
      )(x)
    else:
      h = act(dense(cfg.intermediate_size, 'up')(x))
    h = remat_lib.tag(h, 'mlp_hidden')
    return remat_lib.tag(dense(cfg.hidden_size, 'down')(h), 'mlp_out')


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
  """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)).

  `decode` and `train` may be passed by position: `remat_block` makes them
  static arguments of `nn.remat`.
  """

  config: DecoderConfig
  layer: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x, attention_mask, positions, segment_ids, decode=False, train=False
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


def remat_block(cfg: DecoderConfig):
  """`Block`, or `Block` under `nn.remat` with `cfg.remat`'s policy
  (`decode` and `train`, arguments 5 and 6, static)."""
  return remat_lib.wrap(
      Block, cfg.remat, cfg.remat_names, static_argnums=(5, 6)
  )


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
    block = remat_block(cfg)
    self.layers = [
        block(cfg, i, self.dtype, name=f'layer_{i}')
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
    for layer in self.layers:  # decode, train by position (remat_block)
      x = layer(x, attention_mask, positions, segment_ids, decode, train)
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
      logits = nn.Dense(
          cfg.vocab_size,
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name='lm_head',
          kernel_init=nn.initializers.normal(cfg.initializer_range),
          **bf16_matmul.dense_options(self.dtype),
      )(hidden)
    return logits.astype(jnp.float32)
