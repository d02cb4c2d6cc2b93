"""The model families: `config.model.name` selects one, and a Hugging Face
`config.json`'s `model_type` selects the one that converts it.

Adding a family: a module exporting `FAMILY = Family(...)` (for a family
with Hugging Face checkpoints, its `_hf` module; see tuning/models/family.py)
and one line in `FAMILIES`.
"""

import flax.linen as nn
import jax.numpy as jnp

from tuning.models import bert_hf
from tuning.models import cnn
from tuning.models import decoder_hf
from tuning.models import encoder_decoder_hf
from tuning.models import kg_embedding
from tuning.models import mlp
from tuning.models import recurrent
from tuning.models.family import Family

FAMILIES: tuple[Family, ...] = (
    mlp.FAMILY,
    cnn.FAMILY,
    recurrent.FAMILY,
    bert_hf.FAMILY,
    decoder_hf.FAMILY,
    encoder_decoder_hf.FAMILY,
    kg_embedding.FAMILY,
)


def model_names() -> list[str]:
  """Every `config.model.name` some family builds, sorted."""
  return sorted(name for f in FAMILIES for name in f.names)


def family(model_name: str) -> Family:
  """The family that builds `config.model.name`."""
  for f in FAMILIES:
    if model_name in f.names:
      return f
  raise ValueError(
      f'unknown config.model.name {model_name!r}: choose one of '
      f'{", ".join(model_names())}'
  )


def family_for_hf_model_type(model_type: str) -> Family:
  """The family that converts Hugging Face checkpoints of `model_type`."""
  for f in FAMILIES:
    if model_type in f.hf_model_types and f.convert_hf is not None:
      return f
  supported = sorted(
      t for f in FAMILIES if f.convert_hf is not None for t in f.hf_model_types
  )
  raise ValueError(
      f'unsupported Hugging Face model_type={model_type!r} (in '
      f'config.json): supported model types are '
      f'{", ".join(repr(t) for t in supported)}'
  )


def build_model(
    model_config,
    dtype: str = 'float32',
    *,
    num_outputs: int | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
  """Builds the Flax module named by `model_config.name`.

  `num_outputs`: the task's output width (classes for classification);
  `vocab_size`: the data's vocabulary, for models that embed token ids.
  """
  model_family = family(model_config.name)
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype={dtype!r}: use 'float32' or 'bfloat16'")
  return model_family.build(
      model_config,
      jnp.dtype(dtype),
      num_outputs=num_outputs,
      vocab_size=vocab_size,
  )
