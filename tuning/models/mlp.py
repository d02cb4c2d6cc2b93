"""The multilayer perceptron of the design: Dense-ReLU blocks, dropout, head."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from tuning.platform import bf16_matmul
from tuning.models.dropout import Dropout
from tuning.models.family import Family


class MLP(nn.Module):
  """Dense(h) -> ReLU -> Dropout for each h in `hidden`, then a Dense head."""

  num_outputs: int
  hidden: Sequence[int] = (128, 128)
  dropout: float = 0.5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(
          width,
          dtype=self.dtype,
          name=f'dense_{i}',
          **bf16_matmul.dense_options(self.dtype),
      )(x)
      x = nn.relu(x)
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
) -> MLP:
  """The registry's builder: an `MLP` from `config.model`."""
  del vocab_size
  return MLP(
      num_outputs, tuple(model_config.hidden), model_config.dropout, dtype
  )


# Parameters: dense_<i>/{kernel,bias} and head/{kernel,bias}, which the
# default head regex matches; no default LoRA targets.
FAMILY = Family(names=('mlp',), build=build)
