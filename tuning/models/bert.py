"""BERT encoder and sequence classifier in Flax Linen, matching Hugging Face `BertModel`.

The computation reproduces `transformers.BertModel` (absolute position
embeddings, post-LayerNorm blocks, exact erf GELU, additive attention mask,
tanh pooler) so that weights converted by `tuning.hf_convert` give the same
hidden states as PyTorch to float32 rounding. `convert_hf` (this family's
`FAMILY.convert_hf`) maps Hugging Face tensor names onto the tree below.

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
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import activations
from tuning.platform import bf16_matmul
from tuning.models.dropout import Dropout
from tuning.models.family import Family
from tuning.models.hf_config import read_hf_config

# Hugging Face `model_type` values this module can load.
SUPPORTED_MODEL_TYPES = ('bert',)
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


def check_supported(hf_config: dict) -> None:
  """Raises a one-line ValueError unless `hf_config` describes a BERT model."""
  model_type = hf_config.get('model_type')
  architectures = hf_config.get('architectures') or []
  bert_arch = all(str(a).startswith('Bert') for a in architectures)
  if model_type not in SUPPORTED_MODEL_TYPES or not bert_arch:
    raise ValueError(
        f'Unsupported model: model_type={model_type!r}, architectures={architectures!r}; '
        f"only BERT checkpoints (model_type 'bert', Bert* architectures) are supported."
    )
  pos_type = hf_config.get('position_embedding_type', 'absolute')
  if pos_type != 'absolute':
    raise ValueError(
        f"Unsupported position_embedding_type={pos_type!r}; only 'absolute' is supported."
    )
  act = hf_config.get('hidden_act', 'gelu')
  if act not in _ACTIVATIONS:
    raise ValueError(
        f'Unsupported hidden_act={act!r}; supported: {sorted(_ACTIVATIONS)}.'
    )


def bert_config_from_hf(hf_config: dict) -> BertConfig:
  """Builds a `BertConfig` from a Hugging Face `config.json` dict (unknown keys ignored)."""
  check_supported(hf_config)
  names = {f.name for f in dataclasses.fields(BertConfig)}
  kwargs = {k: v for k, v in hf_config.items() if k in names}
  if kwargs.get('pad_token_id') is None:
    kwargs.pop('pad_token_id', None)
  return BertConfig(**kwargs)


def _dense(features: int, name: str, config: BertConfig, dtype) -> nn.Dense:
  return bf16_matmul.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name,
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
      return y.reshape(x.shape[:-1] + (heads, head_dim))  # [B, L, H, D]

    q, k, v = project('query'), project('key'), project('value')
    if not train and self.dtype == jnp.float32:
      # No dropout on the probabilities: XLA's fused attention gives the
      # same numbers as the einsums below, about 20% faster on CPU.
      ctx = jax.nn.dot_product_attention(
          q, k, v, bias=mask_bias, implementation='xla'
      )
      return ctx.reshape(ctx.shape[:2] + (cfg.hidden_size,))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim)) + mask_bias
    probs = nn.softmax(scores, axis=-1)
    probs = Dropout(cfg.attention_probs_dropout_prob, deterministic=not train)(
        probs
    )
    ctx = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v)
    return ctx.reshape(ctx.shape[:2] + (cfg.hidden_size,))


class BertAddNorm(nn.Module):
  """Dense projection, dropout, residual add and post-LayerNorm (HF `*Output` blocks)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, *, train: bool):
    cfg = self.config
    x = _dense(cfg.hidden_size, 'dense', cfg, self.dtype)(x)
    x = Dropout(cfg.hidden_dropout_prob, deterministic=not train)(x)
    return _layer_norm(cfg)(x + residual).astype(self.dtype)


class BertIntermediate(nn.Module):
  """The feed-forward expansion: dense + activation."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return _ACTIVATIONS[cfg.hidden_act](
        _dense(cfg.intermediate_size, 'dense', cfg, self.dtype)(x)
    )


class BertLayer(nn.Module):
  """One post-LayerNorm transformer block."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, *, train: bool):
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
    x = BertAddNorm(cfg, self.dtype, name='output')(h, x, train=train)
    return x.reshape(shape)


class BertStack(nn.Module):
  """The stack of `num_hidden_layers` blocks (HF `encoder`)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, *, train: bool):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f'layer_{i}')(
          x, mask_bias, train=train
      )
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

  @classmethod
  def from_hf_config(
      cls,
      hf_config: dict,
      num_outputs: int,
      pooling: str = 'pooler',
      dtype=jnp.float32,
      dropout: Optional[float] = None,
  ) -> 'BertClassifier':
    """Builds the classifier from a HF config dict; `dropout` overrides the hidden
    and classifier dropout rates when not None (attention dropout is kept)."""
    config = bert_config_from_hf(hf_config)
    if dropout is not None:
      config = dataclasses.replace(
          config,
          hidden_dropout_prob=float(dropout),
          classifier_dropout=float(dropout),
      )
    if pooling not in POOLING_MODES:
      raise ValueError(
          f'Unknown pooling {pooling!r}; expected one of {POOLING_MODES}.'
      )
    return cls(
        config=config, num_outputs=num_outputs, pooling=pooling, dtype=dtype
    )


def build_bert(
    model_config,
    dtype,
    *,
    num_outputs: int | None,
    vocab_size: int | None = None,
) -> nn.Module:
  """The registry's builder: a `BertClassifier` from an ml_collections model config.

  Fields: `hf_config` (a config.json, a HF model folder or a converted checkpoint
  folder), `pooling` (default 'pooler'), `dropout` (optional override, may be None).
  The vocabulary is the checkpoint's (`vocab_size` is not used).
  """
  del vocab_size
  hf_path = model_config.get('hf_config')
  if not hf_path:
    raise ValueError(
        'model.hf_config is not set: give the path to a Hugging Face config.json '
        'or a folder holding one.'
    )
  return BertClassifier.from_hf_config(
      read_hf_config(hf_path),
      num_outputs,
      pooling=model_config.get('pooling', 'pooler') or 'pooler',
      dtype=dtype,
      dropout=model_config.get('dropout', None),
  )


# ---------------------------------------------------------------- Hugging Face conversion

# Source tensors that are expected but not part of the encoder/classifier tree.
_IGNORED = (
    (re.compile(r'^embeddings\.position_ids$'), 'position id buffer'),
    (re.compile(r'^cls\.'), 'pretraining head'),
)
_HEAD = {
    'classifier.weight': (('classifier', 'kernel'), True),
    'classifier.bias': (('classifier', 'bias'), False),
}


def hf_name_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name (without `bert.` prefix) -> (Flax param path, transpose?)."""
  m: dict[str, tuple[tuple[str, ...], bool]] = {}

  def linear(hf: str, path: tuple[str, ...]):
    m[f'{hf}.weight'] = (path + ('kernel',), True)
    m[f'{hf}.bias'] = (path + ('bias',), False)

  def norm(hf: str, path: tuple[str, ...]):
    m[f'{hf}.weight'] = (path + ('scale',), False)
    m[f'{hf}.bias'] = (path + ('bias',), False)

  emb = ('bert', 'embeddings')
  for name in (
      'word_embeddings',
      'position_embeddings',
      'token_type_embeddings',
  ):
    m[f'embeddings.{name}.weight'] = (emb + (name, 'embedding'), False)
  norm('embeddings.LayerNorm', emb + ('LayerNorm',))
  for i in range(config.num_hidden_layers):
    hf, fx = f'encoder.layer.{i}', ('bert', 'encoder', f'layer_{i}')
    for qkv in ('query', 'key', 'value'):
      linear(f'{hf}.attention.self.{qkv}', fx + ('attention', qkv))
    linear(f'{hf}.attention.output.dense', fx + ('attention_output', 'dense'))
    norm(
        f'{hf}.attention.output.LayerNorm',
        fx + ('attention_output', 'LayerNorm'),
    )
    linear(f'{hf}.intermediate.dense', fx + ('intermediate', 'dense'))
    linear(f'{hf}.output.dense', fx + ('output', 'dense'))
    norm(f'{hf}.output.LayerNorm', fx + ('output', 'LayerNorm'))
  linear('pooler.dense', ('bert', 'pooler', 'dense'))
  return m


def _canonical_name(name: str) -> str:
  """Strips the `bert.` prefix and renames legacy LayerNorm gamma/beta."""
  if name.startswith('bert.'):
    name = name[len('bert.') :]
  return re.sub(
      r'LayerNorm\.gamma$',
      'LayerNorm.weight',
      re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name),
  )


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def convert_hf(
    tensors: dict[str, np.ndarray], hf_config: dict
) -> tuple[dict, dict[str, Any]]:
  """Maps HF tensors onto the `BertClassifier` params tree (`FAMILY.convert_hf`).

  Returns `(params, summary)`; summary has `converted` (count), `left_out`
  ({name: reason}), `has_classifier`, `pooler_missing` and `notes` (lines
  for the printed summary). Raises a ValueError naming an unsupported
  config, any missing or unexpected tensors, or any shape mismatch.
  """
  config = bert_config_from_hf(hf_config)
  name_map = hf_name_map(config)
  params: dict = {}
  used, left_out, unexpected, problems = set(), {}, [], []
  for raw_name, value in tensors.items():
    name = raw_name if raw_name in _HEAD else _canonical_name(raw_name)
    target = name_map.get(name) or _HEAD.get(name)
    if target is None:
      reason = next((r for pat, r in _IGNORED if pat.search(name)), None)
      if reason:
        left_out[raw_name] = reason
      else:
        unexpected.append(raw_name)
      continue
    path, transpose = target
    value = value.T if transpose else value
    used.add(name)
    _set(params, path, np.ascontiguousarray(value, dtype=np.float32))

  missing = [n for n in name_map if n not in used]
  # Checkpoints saved without a pooler (e.g. from BertForMaskedLM) are accepted: the
  # pooler then keeps its fresh initialisation in the model.
  pooler_missing = {'pooler.dense.weight', 'pooler.dense.bias'} <= set(missing)
  if pooler_missing:
    missing = [n for n in missing if not n.startswith('pooler.')]
  has_head = set(_HEAD) & used
  if len(has_head) == 1:
    missing += sorted(set(_HEAD) - used)
  if missing:
    prefix = 'bert.' if any(k.startswith('bert.') for k in tensors) else ''
    named = [n if n.startswith('classifier.') else prefix + n for n in missing]
    problems.append(f"missing tensors: {', '.join(named)}")
  if unexpected:
    problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
  if problems:
    raise ValueError('Cannot convert checkpoint; ' + '; '.join(problems))

  _check_shapes(params, config)
  notes = [f"Classification head: {'yes' if has_head else 'no'}."]
  if pooler_missing:
    notes.append(
        'No pooler in the checkpoint: bert/pooler stays freshly initialised.'
    )
  summary = {
      'converted': len(used),
      'left_out': left_out,
      'has_classifier': bool(has_head),
      'pooler_missing': pooler_missing,
      'notes': notes,
  }
  return params, summary


def _check_shapes(params: dict, config: BertConfig) -> None:
  """Compares converted shapes with those of a freshly built model."""
  num_outputs = (
      params['classifier']['bias'].shape[0] if 'classifier' in params else 2
  )
  model = BertClassifier(config=config, num_outputs=num_outputs)
  ids = jnp.zeros((1, 4), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))[
      'params'
  ]
  flat_expected = {
      '/'.join(k.key for k in p): v.shape
      for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  bad = []
  for p, v in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = '/'.join(k.key for k in p)
    if flat_expected.get(name) != v.shape:
      bad.append(
          f'{name}: checkpoint {v.shape} vs model {flat_expected.get(name)}'
      )
  if bad:
    raise ValueError(
        'Shape mismatch between checkpoint and config: ' + '; '.join(bad)
    )


FAMILY = Family(
    names=('bert',),
    build=build_bert,
    hf_model_types=SUPPORTED_MODEL_TYPES,
    convert_hf=convert_hf,
    head_regex=(r'(head|classifier)/.*',),
    lora_targets=(r'.*attention/(query|value)',),
    layer_regex=r'.*layer_(\d+)/.*',
)
