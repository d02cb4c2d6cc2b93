"""A small convolutional classifier for images (e.g. 8x8 digits, MNIST)."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from tuning.platform import bf16_matmul
from tuning.models.dropout import Dropout
from tuning.models.family import Family


class CNN(nn.Module):
  """3x3 conv-ReLU blocks with a 2x2 max-pool after each, then flatten,
  dropout and a Dense head. Input: [batch, height, width, channels].
  """

  num_outputs: int
  channels: Sequence[int] = (32, 64)
  dropout: float = 0.5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if x.ndim != 4:
      raise ValueError(
          f'the cnn model needs images [batch, h, w, c], got '
          f'shape {x.shape}: set config.data.image_shape'
      )
    x = x.astype(self.dtype)
    for i, width in enumerate(self.channels):
      x = nn.Conv(width, (3, 3), dtype=self.dtype, name=f'conv_{i}')(x)
      x = nn.relu(x)
      if min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(
        self.num_outputs,
        dtype=self.dtype,
        name='head',
        **bf16_matmul.dense_options(self.dtype),
    )(x)
    return logits.astype(jnp.float32)


def build(
    model_config,
    dtype,
    *,
    num_outputs: int | None,
    vocab_size: int | None = None,
) -> CNN:
  """The registry's builder: a `CNN` from `config.model`."""
  del vocab_size
  return CNN(
      num_outputs, tuple(model_config.channels), model_config.dropout, dtype
  )


# Parameters: conv_<i>/{kernel,bias} and head/{kernel,bias}, which the
# default head regex matches; no default LoRA targets.
FAMILY = Family(names=('cnn',), build=build)
