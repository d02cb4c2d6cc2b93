"""What a model family declares: its builder, its Hugging Face conversion and
its naming rules.

A family without pretrained checkpoints (`mlp`, `cnn`, `recurrent`) is one
module: its model and its `FAMILY = Family(...)`. A family that reads Hugging
Face checkpoints is two: the model (`bert`, `decoder`, `encoder_decoder`:
config, modules, parameter tree) and its Hugging Face side (`bert_hf`,
`decoder_hf`, `encoder_decoder_hf`: config.json mapping, tensor-name map,
builder and `FAMILY`), which imports the model and never the reverse. The
registry (tuning/models/registry.py) lists the families, so adding one
touches its own modules and one registry line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

# build(model_config, dtype, *, num_outputs, vocab_size) -> flax.linen.Module.
# `num_outputs`: the task's output width (classes for classification, 1 for
# scalar regression, None when the model's own config fixes it, e.g. a
# language model's vocabulary); `vocab_size`: the data's vocabulary size for
# models that embed token ids they were not pretrained on (None otherwise).
Builder = Callable[..., Any]
# convert_hf(tensors, hf_config, keep=None) -> (params tree, report dict):
# the family's Hugging Face safetensors name map (tensors by their HF names,
# float32 arrays or tuning/formats/huggingface.py LazyTensors, read when
# np.asarray takes them). `keep(path, array)` is given each converted
# parameter as it is made and the tree holds what it returns (a converter
# without `keep` is given the whole model as arrays).
Converter = Callable[[dict[str, np.ndarray], dict], tuple[dict, dict]]
# export_hf(params, hf_config) -> (tensors, hf_config): the reverse of
# `convert_hf`: a params tree (numpy or jax arrays) as Hugging Face-named
# float32 numpy arrays, in the order transformers writes them, and the
# config.json to write beside them (`architectures` set to the transformers
# class that reads them). Raises ValueError naming a missing or unexpected
# parameter. `convert_hf(*export_hf(params, c))` gives `params` back bitwise.
Exporter = Callable[[Any, dict], tuple[dict[str, np.ndarray], dict]]
# hf_linear_names(hf_config) -> {Flax Dense module path: Hugging Face
# nn.Linear module name}, e.g. 'decoder/layer_0/attention/query' ->
# 'model.layers.0.self_attn.q_proj': where LoRA adapters go in PEFT's names.
# Layers without a one-to-one nn.Linear (GPT-2's fused Conv1D) are absent.
LinearNames = Callable[[dict], dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: `names` are the `config.model.name` values it builds."""

  names: tuple[str, ...]
  build: Builder
  # Hugging Face `model_type` values (config.json) that `convert_hf` reads.
  hf_model_types: tuple[str, ...] = ()
  convert_hf: Optional[Converter] = None
  export_hf: Optional[Exporter] = None
  hf_linear_names: Optional[LinearNames] = None
  # Regexes over `/`-joined parameter paths.
  head_regex: tuple[str, ...] = (r'(head|classifier)/.*',)
  lora_targets: tuple[str, ...] = ()  # Dense module paths, e.g. attention
  layer_regex: str = r'.*layer_(\d+)/.*'  # captures the layer index


def flat_float32(params) -> dict[str, np.ndarray]:
  """A params tree (numpy or jax arrays) as {`/`-joined path: float32 numpy
  array}: what a family's `export_hf` reads."""
  import jax  # pylint: disable=g-import-not-at-top

  return {
      '/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(
          v, np.float32
      )
      for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def check_export_paths(have, wanted, kind: str, hint: str = '') -> None:
  """ValueError naming the parameters `export_hf` misses or does not know
  (`have`, `wanted`: collections of `/`-joined paths; `kind`: what the
  checkpoint is, e.g. 'BERT'; `hint`: appended to the message)."""
  missing = sorted(set(wanted) - set(have))
  unexpected = sorted(set(have) - set(wanted))
  if missing or unexpected:
    raise ValueError(
        f'cannot export these parameters as a {kind} checkpoint: '
        + '; '.join(
            f'{what}: {", ".join(items)}'
            for what, items in (
                ('missing', missing),
                ('unexpected', unexpected),
            )
            if items
        )
        + hint
    )
