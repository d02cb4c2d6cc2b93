"""The BERT family's Hugging Face side, and its declaration.

* `bert_config_from_hf`: a BERT config.json (a dict) as the `bert.BertConfig`
  it describes (`check_supported` refuses other models).
* `convert_hf`: safetensors tensors, by their Hugging Face names, as the
  `BertClassifier` parameter tree (the name map `hf_name_map`; the
  pretraining head and buffers are reported as left out).
* `export_hf` (the reverse of `convert_hf`: a params tree as Hugging Face
  tensors and config.json) and `hf_linear_names` (where LoRA adapters go in
  PEFT's module names);
* `from_hf_config`, `build_bert` and `FAMILY`: a `BertClassifier` from a
  config.json, and what tuning/models/registry.py lists.

The model itself is tuning/models/bert.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tuning.models import bert
from tuning.models import family as family_lib
from tuning.models import hf_config as hf_config_lib
from tuning.models import remat as remat_lib

# Hugging Face `model_type` values this module can load.
SUPPORTED_MODEL_TYPES = ('bert',)

# ------------------------------------------------------------ config.json


def check_supported(hf_config: dict) -> None:
  """Raises a one-line ValueError unless `hf_config` describes a BERT model
  (`BertConfig` checks its activation)."""
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


def bert_config_from_hf(hf_config: dict) -> bert.BertConfig:
  """Builds a `BertConfig` from a Hugging Face `config.json` dict (unknown keys ignored)."""
  check_supported(hf_config)
  names = {f.name for f in dataclasses.fields(bert.BertConfig)}
  kwargs = {k: v for k, v in hf_config.items() if k in names}
  if kwargs.get('pad_token_id') is None:
    kwargs.pop('pad_token_id', None)
  return bert.BertConfig(**kwargs)


# ------------------------------------------------------------ tensor names

# Source tensors that are expected but not part of the encoder/classifier tree.
_IGNORED = (
    (re.compile(r'^embeddings\.position_ids$'), 'position id buffer'),
    (re.compile(r'^cls\.'), 'pretraining head'),
)
_HEAD = {
    'classifier.weight': (('classifier', 'kernel'), True),
    'classifier.bias': (('classifier', 'bias'), False),
}


def hf_name_map(
    config: bert.BertConfig,
) -> dict[str, tuple[tuple[str, ...], bool]]:
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
    tensors: dict[str, np.ndarray], hf_config: dict, keep=None
) -> tuple[dict, dict[str, Any]]:
  """Maps HF tensors onto the `BertClassifier` params tree (`FAMILY.convert_hf`).

  Returns `(params, summary)`; summary has `converted` (count), `left_out`
  ({name: reason}), `has_classifier`, `pooler_missing` and `notes` (lines
  for the printed summary). Raises a ValueError naming an unsupported
  config, any missing or unexpected tensors, or any shape mismatch.
  `keep(path, array)` (optional) is given each parameter as it is converted
  and the tree holds what it returns (tuning/formats/huggingface.py `spill`).
  """
  keep = keep or (lambda path, array: array)
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
    value = np.ascontiguousarray(value, dtype=np.float32)
    _set(params, path, keep('/'.join(path), value))

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


def _check_shapes(params: dict, config: bert.BertConfig) -> None:
  """Compares converted shapes with those of a freshly built model."""
  num_outputs = (
      params['classifier']['bias'].shape[0] if 'classifier' in params else 2
  )
  model = bert.BertClassifier(config=config, num_outputs=num_outputs)
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


# ------------------------------------------------------------ export

_POOLER = ('pooler.dense.weight', 'pooler.dense.bias')


def _labels(hf_config: dict, num_labels: int) -> dict[str, Any]:
  """`id2label` / `label2id` for a head with `num_labels` outputs: the
  config's own names where it has one per output, transformers' defaults
  (LABEL_i) where it has none or only defaults."""
  id2label = {
      int(k): str(v) for k, v in (hf_config.get('id2label') or {}).items()
  }
  defaults = all(v == f'LABEL_{k}' for k, v in id2label.items())
  if len(id2label) != num_labels or sorted(id2label) != list(range(num_labels)):
    if not defaults:
      raise ValueError(
          f'config.json id2label names {len(id2label)} labels but the '
          f'classification head has {num_labels} outputs: give id2label one '
          'name per output (0..num_labels-1)'
      )
    id2label = {i: f'LABEL_{i}' for i in range(num_labels)}
  return {
      'id2label': {str(i): id2label[i] for i in range(num_labels)},
      'label2id': {id2label[i]: i for i in range(num_labels)},
  }


def export_hf(params, hf_config: dict) -> tuple[dict[str, np.ndarray], dict]:
  """A `BertClassifier` params tree as Hugging Face BERT tensors (float32
  numpy, [out, in] Linear weights) and the config.json to write: the reverse
  of `convert_hf`, from the same `hf_name_map`.

  With a `classifier` head: `BertForSequenceClassification` (`bert.`-prefixed
  encoder, `classifier.weight/bias`; `id2label`/`label2id` for the head's
  outputs, kept from `hf_config` when it names them). That class classifies
  the tanh pooler output, so the pooler must be there. Without a head: a
  `BertModel` (no prefix); a tree without a pooler (converted from a
  checkpoint that had none) is written without one, and transformers
  initialises `BertModel`'s pooler randomly (its `last_hidden_state` is
  unaffected). Raises a ValueError naming missing or unexpected parameters.
  """
  if not isinstance(hf_config, dict):
    hf_config = hf_config_lib.read_hf_config(hf_config)
  config = bert_config_from_hf(hf_config)
  flat = family_lib.flat_float32(params)
  has_head = any(k.startswith('classifier/') for k in flat)
  names = dict(hf_name_map(config))
  pooler = {'/'.join(names[n][0]) for n in _POOLER}
  if not has_head and not pooler & set(flat):
    for name in _POOLER:
      del names[name]
  if has_head:
    names.update(_HEAD)
  wanted = {'/'.join(path): name for name, (path, _) in names.items()}
  family_lib.check_export_paths(
      flat,
      wanted,
      'BERT',
      ' (BertForSequenceClassification classifies the pooler output)'
      if has_head and pooler - set(flat)
      else '',
  )
  prefix = 'bert.' if has_head else ''
  tensors = {}
  for name, (path, transpose) in names.items():
    value = flat['/'.join(path)]
    hf_name = name if name in _HEAD else prefix + name
    tensors[hf_name] = np.ascontiguousarray(value.T if transpose else value)
  out = dict(hf_config)
  out.pop('num_labels', None)  # transformers writes id2label instead
  if has_head:
    out['architectures'] = ['BertForSequenceClassification']
    out.update(_labels(hf_config, flat['classifier/bias'].shape[0]))
  else:
    out['architectures'] = ['BertModel']
  return tensors, out


def hf_linear_names(hf_config: dict) -> dict[str, str]:
  """{Flax Dense module path: transformers nn.Linear module name} of a BERT
  model, from `hf_name_map`: e.g. 'bert/encoder/layer_0/attention/query' ->
  'bert.encoder.layer.0.attention.self.query', and 'classifier' ->
  'classifier'. The names are those of `BertForSequenceClassification`
  (every `Bert*For*` class nests the encoder under `bert.`; a bare
  `BertModel` has the same names without that prefix)."""
  if not isinstance(hf_config, dict):
    hf_config = hf_config_lib.read_hf_config(hf_config)
  config = bert_config_from_hf(hf_config)
  modules = {}
  for name, (path, transpose) in {**hf_name_map(config), **_HEAD}.items():
    if path[-1] == 'kernel' and transpose and name.endswith('.weight'):
      hf_module = name.removesuffix('.weight')
      prefix = '' if name in _HEAD else 'bert.'
      modules['/'.join(path[:-1])] = prefix + hf_module
  return modules


# ------------------------------------------------------------ the family


def from_hf_config(
    hf_config: dict,
    num_outputs: int,
    pooling: str = 'pooler',
    dtype=jnp.float32,
    dropout: Optional[float] = None,
) -> bert.BertClassifier:
  """A `BertClassifier` from a HF config dict; `dropout` overrides the hidden
  and classifier dropout rates when not None (attention dropout is kept)."""
  config = bert_config_from_hf(hf_config)
  if dropout is not None:
    config = dataclasses.replace(
        config,
        hidden_dropout_prob=float(dropout),
        classifier_dropout=float(dropout),
    )
  if pooling not in bert.POOLING_MODES:
    raise ValueError(
        f'Unknown pooling {pooling!r}; expected one of {bert.POOLING_MODES}.'
    )
  return bert.BertClassifier(
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
  folder), `pooling` (default 'pooler'), `dropout` (optional override, may be None),
  `remat` and `remat_names` (optional; tuning/models/remat.py).
  The vocabulary is the checkpoint's (`vocab_size` is not used).
  """
  del vocab_size
  # .get: a model config may hold only hf_config (conversions, tests), and
  # a model family does not import tuning/config's defaults.
  hf_path = model_config.get('hf_config')
  if not hf_path:
    raise ValueError(
        'model.hf_config is not set: give the path to a Hugging Face config.json '
        'or a folder holding one.'
    )
  model = from_hf_config(
      hf_config_lib.read_hf_config(hf_path),
      num_outputs,
      pooling=model_config.get('pooling', 'pooler') or 'pooler',
      dtype=dtype,
      dropout=model_config.get('dropout', None),
  )
  return model.clone(
      config=dataclasses.replace(
          model.config, **remat_lib.from_model_config(model_config)
      )
  )


FAMILY = family_lib.Family(
    names=('bert',),
    build=build_bert,
    hf_model_types=SUPPORTED_MODEL_TYPES,
    convert_hf=convert_hf,
    export_hf=export_hf,
    hf_linear_names=hf_linear_names,
    head_regex=(r'(head|classifier)/.*',),
    lora_targets=(r'.*attention/(query|value)',),
    layer_regex=r'.*layer_(\d+)/.*',
)
