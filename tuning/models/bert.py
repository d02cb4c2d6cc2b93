"""BERT encoder and sequence classifier in Flax Linen, matching Hugging Face `BertModel`.

The computation reproduces `transformers.BertModel` (absolute position
embeddings, post-LayerNorm blocks, exact erf GELU, additive attention mask,
tanh pooler) so that converted weights give the same hidden states as
PyTorch to float32 rounding. The Hugging Face side (config.json, the tensor
names mapped onto the tree below) and the family's `FAMILY` declaration are
tuning/models/bert_hf.py.

Parameter tree of `BertClassifier` (all float32):

    bert/embeddings/{word,position,token_type}_embeddings/embedding
    bert/embeddings/LayerNorm/{scale,bias}
    bert/encoder/layer_<i>/attention/{query,key,value}/{kernel,bias}
    bert/encoder/layer_<i>/attention_output/dense/{kernel,bias}
    bert/encoder/layer_<i>/attention_output/LayerNorm/{scale,bias}
    bert/encoder/layer_<i>/intermediate/dense/{kernel,bias}
    bert/encoder/layer_<i>/output/dense/{kernel,bias}
    bert/encoder/layer_<i>/output/LayerNorm/{scale,bias}
    bert/pooler/dense/{kernel,bias}
    classifier/{kernel,bias}

`dtype` is the computation dtype (e.g. bfloat16): matmuls run in it, while
LayerNorm, the attention softmax and the returned logits stay in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tuning.models import activations
from tuning.models import remat as remat_lib
from tuning.platform import bf16_matmul
from tuning.models.dropout import Dropout

POOLING_MODES = ('pooler', 'cls', 'mean')

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    'gelu': activations.exact_gelu,  # HF "gelu" is the exact erf form.
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'relu': nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The subset of a Hugging Face BERT `config.json` the model needs."""

  vocab_size: int
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: Optional[float] = None
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  # Rematerialisation of the blocks (tuning/models/remat.py): 'none' keeps
  # every activation for the backward pass.
  remat: str = 'none'
  remat_names: tuple[str, ...] = ()

  def __post_init__(self):
    remat_lib.check(self.remat, self.remat_names)
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(
          f'Unsupported hidden_act={self.hidden_act!r}; supported: '
          f'{sorted(_ACTIVATIONS)}.'
      )


def _dense(features: int, name: str, config: BertConfig, dtype) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name,
      **bf16_matmul.dense_options(dtype),
  )


def _layer_norm(config: BertConfig) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name='LayerNorm',
  )


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm and dropout."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, *, train: bool):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)

    def embed(num, name):
      return nn.Embed(
          num,
          cfg.hidden_size,
          embedding_init=init,
          param_dtype=jnp.float32,
          dtype=jnp.float32,
          name=name,
      )

    seq_len = input_ids.shape[-1]
    if seq_len > cfg.max_position_embeddings:
      raise ValueError(
          f'Sequence length {seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}.'
      )
    position_ids = jnp.arange(seq_len)[None, :]
    x = (
        embed(cfg.vocab_size, 'word_embeddings')(input_ids)
        + embed(cfg.max_position_embeddings, 'position_embeddings')(
            position_ids
        )
        + embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)
    )
    x = _layer_norm(cfg)(x)
    x = Dropout(cfg.hidden_dropout_prob, deterministic=not train)(x)
    return x.astype(self.dtype)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention (query/key/value projections only)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, *, train: bool):
    cfg = self.config
    heads = cfg.num_attention_heads
    if cfg.hidden_size % heads:
      raise ValueError(
          f'hidden_size={cfg.hidden_size} is not divisible by num_attention_heads={heads}.'
      )
    head_dim = cfg.hidden_size // heads

    def project(name):  # the matmul on [B * L, hidden] rows (see BertLayer)
      y = _dense(cfg.hidden_size, name, cfg, self.dtype)(
          x.reshape(-1, x.shape[-1])
      )
      y = remat_lib.tag(y, name)
      return y.reshape(x.shape[:-1] + (heads, head_dim))  # [B, L, H, D]

    q, k, v = project('query'), project('key'), project('value')
    if not train and self.dtype == jnp.float32:
      # No dropout on the probabilities: XLA's fused attention gives the
      # same numbers as the einsums below, about 20% faster on CPU.
      ctx = jax.nn.dot_product_attention(
          q, k, v, bias=mask_bias, implementation='xla'
      )
      ctx = ctx.reshape(ctx.shape[:2] + (cfg.hidden_size,))
      return remat_lib.tag(ctx, 'attention_context')
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim)) + mask_bias
    probs = nn.softmax(scores, axis=-1)
    probs = Dropout(cfg.attention_probs_dropout_prob, deterministic=not train)(
        probs
    )
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v)
    ctx = ctx.reshape(ctx.shape[:2] + (cfg.hidden_size,))
    return remat_lib.tag(ctx, 'attention_context')


class BertAddNorm(nn.Module):
  """Dense projection, dropout, residual add and post-LayerNorm (HF `*Output` blocks).

  `remat_name` tags the projection's output (tuning/models/remat.py).
  """

  config: BertConfig
  dtype: Any = jnp.float32
  remat_name: str = 'attention_out'

  @nn.compact
  def __call__(self, x, residual, *, train: bool):
    cfg = self.config
    x = _dense(cfg.hidden_size, 'dense', cfg, self.dtype)(x)
    x = remat_lib.tag(x, self.remat_name)
    x = Dropout(cfg.hidden_dropout_prob, deterministic=not train)(x)
    return _layer_norm(cfg)(x + residual).astype(self.dtype)


class BertIntermediate(nn.Module):
  """The feed-forward expansion: dense + activation."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = _ACTIVATIONS[cfg.hidden_act](
        _dense(cfg.intermediate_size, 'dense', cfg, self.dtype)(x)
    )
    return remat_lib.tag(h, 'mlp_hidden')


class BertLayer(nn.Module):
  """One post-LayerNorm transformer block (`train` may be passed by
  position: `remat_layer` makes it a static argument of `nn.remat`)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, train: bool = False):
    cfg = self.config
    shape = x.shape  # [B, L, hidden]
    attn = BertSelfAttention(cfg, self.dtype, name='attention')(
        x, mask_bias, train=train
    )
    # Everything but attention runs on [B * L, hidden] rows: XLA:CPU then
    # reduces each bias gradient over one axis and feeds the weight
    # gradients' matmuls without transposes; over [B, L] axes both were
    # strided loops slower than the matmuls at short lengths (issue #14).
    rows = lambda t: t.reshape(-1, t.shape[-1])  # pylint: disable=unnecessary-lambda-assignment
    x = BertAddNorm(cfg, self.dtype, name='attention_output')(
        rows(attn), rows(x), train=train
    )
    h = BertIntermediate(cfg, self.dtype, name='intermediate')(x)
    x = BertAddNorm(cfg, self.dtype, 'mlp_out', name='output')(
        h, x, train=train
    )
    return x.reshape(shape)


def remat_layer(cfg: BertConfig):
  """`BertLayer`, or `BertLayer` under `nn.remat` with `cfg.remat`'s
  policy (`train`, argument 3, static)."""
  return remat_lib.wrap(
      BertLayer, cfg.remat, cfg.remat_names, static_argnums=(3,)
  )


class BertStack(nn.Module):
  """The stack of `num_hidden_layers` blocks (HF `encoder`)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, *, train: bool):
    layer = remat_layer(self.config)
    for i in range(self.config.num_hidden_layers):
      # train by position: a static argument under remat (remat_layer)
      x = layer(self.config, self.dtype, name=f'layer_{i}')(x, mask_bias, train)
    return x


class BertPooler(nn.Module):
  """tanh(dense(hidden state of the first token))."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.tanh(
        _dense(self.config.hidden_size, 'dense', self.config, self.dtype)(
            x[:, 0]
        )
    )


class BertEncoder(nn.Module):
  """Full BERT encoder (HF `BertModel`): returns `(last_hidden_state, pooled)`.

  `last_hidden_state` is [B, L, hidden] in `dtype`; `pooled` is tanh(dense(CLS)) [B, hidden].
  """

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      train: bool = False,
  ):
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    # Additive mask [B, 1, 1, L]: 0 where attended, most negative float32 where padded.
    mask_bias = jnp.where(
        attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min
    ).astype(jnp.float32)
    x = BertEmbeddings(cfg, self.dtype, name='embeddings')(
        input_ids, token_type_ids, train=train
    )
    x = BertStack(cfg, self.dtype, name='encoder')(x, mask_bias, train=train)
    pooled = BertPooler(cfg, self.dtype, name='pooler')(x)
    return x, pooled


class BertClassifier(nn.Module):
  """BERT with a sequence-classification head (HF `BertForSequenceClassification`).

  `pooling`: 'pooler' (tanh pooler on [CLS], the HF default), 'cls' (raw [CLS]
  hidden state) or 'mean' (mean over tokens where `attention_mask` is 1).
  The pooler parameters always exist (so converted checkpoints load the same
  way whatever the pooling), they are just unused for 'cls' and 'mean'.
  Returns float32 logits [B, num_outputs].
  """

  config: BertConfig
  num_outputs: int
  pooling: str = 'pooler'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      train: bool = False,
  ):
    if self.pooling not in POOLING_MODES:
      raise ValueError(
          f'Unknown pooling {self.pooling!r}; expected one of {POOLING_MODES}.'
      )
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden, pooled = BertEncoder(cfg, self.dtype, name='bert')(
        input_ids, attention_mask, token_type_ids, train=train
    )
    if self.pooling == 'pooler':
      features = pooled
    elif self.pooling == 'cls':
      features = hidden[:, 0]
    else:
      mask = attention_mask.astype(jnp.float32)[..., None]
      summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
      features = summed / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    rate = (
        cfg.classifier_dropout
        if cfg.classifier_dropout is not None
        else cfg.hidden_dropout_prob
    )
    features = Dropout(rate, deterministic=not train)(features)
    logits = _dense(self.num_outputs, 'classifier', cfg, self.dtype)(
        features.astype(self.dtype)
    )
    return logits.astype(jnp.float32)
