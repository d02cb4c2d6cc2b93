"""Knowledge-graph embeddings: TransE and DistMult triple classifiers.

The model reads `triples` [n, 3] (head, relation, tail in one id space:
entities, then relations; tuning/data/triples.py) and embeds all three with
one table of `vocab_size` rows, or `triple_words` [n, 3, words] (each
entity the mean of its words' vectors, each relation its own vector). The plausibility score is TransE's
-||h + r - t|| (L1 or L2; Bordes et al. 2013) or DistMult's sum(h * r * t)
(Yang et al. 2015); the logits are [0, score + b], b a learnt scalar, so
the classification task's cross-entropy is the logistic loss
softplus(-y (score + b)) and class 1 is "true" (b starts at minus the mean
score of the example the model is initialised on). WN11's protocol then picks
a threshold per relation on validation (tuning/modes/triple_thresholds.py).
Everything is float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tuning.models.family import Family

KINDS = ('transe', 'distmult')


def score(h, r, t, kind: str = 'transe', norm: int = 1):
  """The plausibility of embedded triples [..., dim] -> [...] (float32)."""
  h, r, t = (x.astype(jnp.float32) for x in (h, r, t))
  if kind == 'distmult':
    return jnp.sum(h * r * t, axis=-1)
  d = h + r - t
  if norm == 1:
    return -jnp.sum(jnp.abs(d), axis=-1)
  return -jnp.sqrt(jnp.sum(d * d, axis=-1) + 1e-12)


class TripleScorer(nn.Module):
  """Logits [n, 2] of triples [n, 3]: [0, score + bias]."""

  vocab_size: int
  dim: int = 50
  kind: str = 'transe'
  norm: int = 1

  @nn.compact
  def __call__(self, triples=None, triple_words=None, *, train: bool = False):
    del train
    bound = 6.0 / self.dim**0.5  # Bordes et al.'s uniform initialisation
    table = self.param(
        'embeddings',
        nn.initializers.uniform(2 * bound),
        (self.vocab_size, self.dim),
        jnp.float32,
    )
    table = table - bound  # uniform(-bound, bound)
    if triple_words is not None:  # each one the mean of its words
      mask = (triple_words > 0)[..., None].astype(jnp.float32)
      vectors = jnp.sum(table[triple_words] * mask, axis=-2)
      vectors = vectors / jnp.maximum(jnp.sum(mask, axis=-2), 1.0)
    else:
      vectors = table[triples]
    h, r, t = vectors[:, 0], vectors[:, 1], vectors[:, 2]
    s = score(h, r, t, self.kind, self.norm)
    # Initialised to minus the mean score of the batch it is built from,
    # so that training starts near p(true) = 1/2, not at a saturated loss.
    bias = self.param('bias', lambda _: -jnp.mean(jax.lax.stop_gradient(s)))
    z = s + bias
    return jnp.stack([jnp.zeros_like(z), z], axis=-1)


def build(model_config, dtype, *, num_outputs=None, vocab_size=None):
  """The registry's builder: a `TripleScorer` from `config.model`."""
  del dtype  # embeddings and scores are float32
  if vocab_size is None:
    raise ValueError(
        f'config.model.name={model_config.name!r} reads triples: set '
        "config.data.source='triples' and data.triple_input ids or words"
    )
  if num_outputs != 2:
    raise ValueError(
        f'config.model.name={model_config.name!r} classifies triples as '
        f'false or true (2 classes), not {num_outputs}'
    )
  norm = int(model_config.transe_norm)
  if norm not in (1, 2):
    raise ValueError(f'config.model.transe_norm={norm}: use 1 (L1) or 2 (L2)')
  return TripleScorer(
      vocab_size, int(model_config.embed_dim), model_config.name, norm
  )


# Parameters: embeddings (entities, then relations) and bias; no head and
# no LoRA targets.
FAMILY = Family(names=KINDS, build=build)
