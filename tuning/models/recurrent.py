"""LSTM / GRU text classifiers over token ids."""

import flax.linen as nn
import jax.numpy as jnp

from tuning.platform import bf16_matmul
from tuning.models.dropout import Dropout
from tuning.models.family import Family


class RecurrentClassifier(nn.Module):
  """Embedding -> (bi)LSTM or GRU -> masked max-pool -> Dense head.

  `attention_mask` marks real tokens; padding is excluded through the
  recurrence (`seq_lengths`) and from the pooling.
  """

  num_outputs: int
  vocab_size: int
  cell: str = 'lstm'  # lstm | gru
  embed_dim: int = 64
  hidden: int = 128
  bidirectional: bool = True
  dropout: float = 0.5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      train: bool = False,
  ):
    del token_type_ids
    if attention_mask is None:
      attention_mask = (input_ids > 0).astype(jnp.int32)
    lengths = jnp.maximum(attention_mask.sum(axis=-1), 1)
    x = nn.Embed(self.vocab_size, self.embed_dim, name='embed')(input_ids)
    x = Dropout(self.dropout, deterministic=not train)(x).astype(self.dtype)
    cell_type = {'lstm': nn.OptimizedLSTMCell, 'gru': nn.GRUCell}[self.cell]
    forward = nn.RNN(cell_type(self.hidden, dtype=self.dtype), name='forward')
    h = forward(x, seq_lengths=lengths)
    if self.bidirectional:
      backward = nn.RNN(
          cell_type(self.hidden, dtype=self.dtype),
          reverse=True,
          keep_order=True,
          name='backward',
      )
      h = jnp.concatenate([h, backward(x, seq_lengths=lengths)], axis=-1)
    mask = attention_mask[..., None] > 0
    pooled = jnp.where(mask, h, jnp.finfo(h.dtype).min).max(axis=1)
    pooled = Dropout(self.dropout, deterministic=not train)(pooled)
    logits = nn.Dense(
        self.num_outputs,
        dtype=self.dtype,
        name='head',
        **bf16_matmul.dense_options(self.dtype),
    )(pooled)
    return logits.astype(jnp.float32)


def build(
    model_config, dtype, *, num_outputs: int | None, vocab_size: int | None
) -> RecurrentClassifier:
  """The registry's builder: `config.model.name` ('lstm' or 'gru') is the
  cell; `vocab_size` is the data's vocabulary."""
  cell = model_config.name
  if not vocab_size:
    raise ValueError(
        f'model {cell!r} needs text data: set ' 'config.data.text_column'
    )
  return RecurrentClassifier(
      num_outputs,
      vocab_size,
      cell,
      model_config.embed_dim,
      model_config.hidden[0],
      model_config.bidirectional,
      model_config.dropout,
      dtype,
  )


# Parameters: embed/embedding, forward/..., backward/..., head/{kernel,bias}
# (the default head regex matches head/); no default LoRA targets.
FAMILY = Family(names=('lstm', 'gru'), build=build)
