"""What a model family declares: its builder, its Hugging Face conversion and
its naming rules.

Each family module (`mlp`, `cnn`, `recurrent`, `bert`, and the decoders and
encoder-decoders) defines one module-level `FAMILY = Family(...)`; the
registry (tuning/models/registry.py) lists the families, so adding one
touches its own module and one registry line.
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
# convert_hf(tensors, hf_config) -> (params tree, report dict): the family's
# Hugging Face safetensors name map (tensors by their HF names, float32).
Converter = Callable[[dict[str, np.ndarray], dict], tuple[dict, dict]]


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: `names` are the `config.model.name` values it builds."""

  names: tuple[str, ...]
  build: Builder
  # Hugging Face `model_type` values (config.json) that `convert_hf` reads.
  hf_model_types: tuple[str, ...] = ()
  convert_hf: Optional[Converter] = None
  # Regexes over `/`-joined parameter paths.
  head_regex: tuple[str, ...] = (r'(head|classifier)/.*',)
  lora_targets: tuple[str, ...] = ()  # Dense module paths, e.g. attention
  layer_regex: str = r'.*layer_(\d+)/.*'  # captures the layer index
