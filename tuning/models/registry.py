"""Models by name: `config.model.name` selects a builder here."""

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from tuning.models.cnn import CNN
from tuning.models.mlp import MLP
from tuning.models.recurrent import RecurrentClassifier


def _mlp(model_config, num_classes, dtype, vocab_size=None):
  del vocab_size
  return MLP(num_classes, tuple(model_config.hidden), model_config.dropout,
             dtype)


def _cnn(model_config, num_classes, dtype, vocab_size=None):
  del vocab_size
  return CNN(num_classes, tuple(model_config.channels), model_config.dropout,
             dtype)


def _recurrent(cell):
  def build(model_config, num_classes, dtype, vocab_size=None):
    if not vocab_size:
      raise ValueError(f'model {cell!r} needs text data: set '
                       'config.data.text_column')
    return RecurrentClassifier(
        num_classes, vocab_size, cell, model_config.embed_dim,
        model_config.hidden[0], model_config.bidirectional,
        model_config.dropout, dtype)
  return build


def _bert(model_config, num_classes, dtype, vocab_size=None):
  del vocab_size
  from tuning.models import bert  # pylint: disable=g-import-not-at-top
  return bert.build_bert(model_config, num_classes, dtype)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    'mlp': _mlp,
    'cnn': _cnn,
    'lstm': _recurrent('lstm'),
    'gru': _recurrent('gru'),
    'bert': _bert,
}


def build_model(model_config, dtype: str = 'float32', *,
                num_outputs: int | None = None,
                vocab_size: int | None = None) -> nn.Module:
  """Builds the Flax module named by `model_config.name`."""
  name = model_config.name
  if name not in BUILDERS:
    raise ValueError(f'unknown config.model.name {name!r}: choose one of '
                     f'{", ".join(sorted(BUILDERS))}')
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype={dtype!r}: use 'float32' or 'bfloat16'")
  return BUILDERS[name](model_config, num_outputs, jnp.dtype(dtype),
                        vocab_size)
