"""GRPO's objective (Shao et al. 2024), `config.task=grpo`.

For a group of G completions of one prompt with rewards r, the advantage of
each is (r - mean(r)) / (std(r) + eps), shared by all its tokens. The
per-token loss is the clipped policy-ratio term plus a KL penalty to the
reference model (the k3 estimator, always >= 0):

    ratio = exp(logp - old_logp)
    pg    = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1
    loss_t = pg + beta * kl

averaged per sequence, then over sequences ('sequence', GRPO), or over every
completion token of the batch ('token', DAPO / Dr. GRPO). `sequence_loss`
returns the sum of the batch's terms over a given denominator, so that
micro-batches of one update add up to the whole batch's loss exactly. The
loop (sampling, rewards, LoRA, resume) is tuning/modes/grpo.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tuning.tasks.base import Task

AVERAGING = ('sequence', 'token')


def group_advantages(rewards, group_size: int, eps: float) -> np.ndarray:
  """(r - group mean) / (group std + eps) of [prompts * group_size]
  rewards ordered prompt by prompt (population std, as the paper)."""
  r = np.asarray(rewards, np.float32).reshape(-1, group_size)
  adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)
  return adv.reshape(-1).astype(np.float32)


def token_log_probs(logits, targets):
  """log p(target) per position of [..., vocab] logits, in float32."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def denominator(mask, averaging: str) -> float:
  """What `sequence_loss`'s sum is divided by for a whole batch of
  completion masks [rows, T]: rows ('sequence') or tokens ('token')."""
  mask = np.asarray(mask)
  if averaging == 'sequence':
    return float(mask.shape[0])
  return float(max(mask.sum(), 1))


def sequence_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    beta: float,
    clip_eps: float,
    averaging: str,
    denom,
):
  """(loss, {'kl': sum, 'clipped': sum}) of [rows, T] per-token terms;
  the loss is the batch's sum over `denom` (see `denominator`)."""
  mask = mask.astype(jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  adv = advantages[:, None]
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  pg = -jnp.minimum(ratio * adv, clipped * adv)
  delta = ref_logp - logp
  kl = jnp.exp(delta) - delta - 1.0
  per_token = (pg + beta * kl) * mask
  if averaging == 'sequence':
    lengths = jnp.maximum(mask.sum(1), 1.0)
    total = (per_token.sum(1) / lengths).sum()
  else:
    total = per_token.sum()
  stats = {
      'kl': (kl * mask).sum(),
      'clipped': ((ratio != clipped) * mask).sum(),
  }
  return total / denom, stats


class GrpoTask(Task):
  """The registry's entry for `config.task=grpo`: the run itself is the
  GRPO loop (tuning/modes/grpo.py), not the supervised train step."""

  name = 'grpo'
  labels = None
  best_metric = 'reward'
  best_mode = 'max'

  def model_dims(self):
    return {'num_outputs': None, 'vocab_size': None}


TASK = GrpoTask
