"""Preference optimisation losses: DPO (sigmoid), IPO, SimPO and ORPO.

A batch holds chosen and rejected sequences (`chosen_input_ids`,
`chosen_attention_mask`, `chosen_loss_mask` and the `rejected_*` ones,
tuning/data/preference.py); the decoder runs once on both (`inputs`
stacks them, [2 * rows, length]) and `sequence_logps` sums each reply's
token log-probs in float32 (token t scored from position t - 1 where
`loss_mask[t] == 1`). DPO and IPO compare with the reference model's
summed log-probs. SimPO is reference-free and length-normalised with a margin gamma; ORPO adds
lambda times the odds-ratio term to the chosen reply's NLL.

`config.task=preference` trains on pairs of data.path (JSON Lines, see
tuning/data/preference.py) with `preference.loss`. DPO and IPO read the
reference's log-probs from the batch columns `ref_chosen_logps` and
`ref_rejected_logps`, computed once before training from the pretrained
parameters (LoRA adapters off) and cached in the work directory
(tuning/multirun/preference_reference.py), as TRL's
`precompute_ref_log_probs`: no reference forward pass in the train step,
and no second copy of the parameters. Evaluation reports, per pair, the
loss, the preference accuracy (chosen reward > rejected reward, the
implicit reward beta * log-ratio of DPO), the reward margin and both
rewards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tuning.models import decoder_hf
from tuning.tasks import base

LOSSES = ('dpo', 'ipo', 'simpo', 'orpo')
SIDES = ('chosen', 'rejected')
COLUMNS = ('input_ids', 'attention_mask', 'loss_mask')  # per side


def stacked_inputs(batch):
  """The decoder's inputs: chosen rows then rejected rows."""
  return {
      name: jnp.concatenate(
          [batch[f'chosen_{name}'], batch[f'rejected_{name}']], axis=0
      )
      for name in ('input_ids', 'attention_mask')
  }


def sequence_logps(logits, input_ids, loss_mask):
  """(summed reply log-probs, reply token count) per row, float32."""
  lse_terms = base.token_cross_entropy(logits[:, :-1], input_ids[:, 1:])[0]
  mask = (loss_mask[:, 1:] > 0).astype(jnp.float32)
  return -(lse_terms * mask).sum(axis=1), mask.sum(axis=1)


def stacked_logps(logits, batch):
  """(chosen logps, rejected logps, chosen tokens, rejected tokens) of
  the logits of `stacked_inputs(batch)`."""
  rows = batch['chosen_input_ids'].shape[0]
  ids = stacked_inputs(batch)['input_ids']
  mask = jnp.concatenate(
      [batch['chosen_loss_mask'], batch['rejected_loss_mask']], axis=0
  )
  logps, tokens = sequence_logps(logits, ids, mask)
  return logps[:rows], logps[rows:], tokens[:rows], tokens[rows:]


def pair_losses(
    kind: str,
    chosen,
    rejected,
    *,
    ref_chosen=None,
    ref_rejected=None,
    chosen_tokens=None,
    rejected_tokens=None,
    beta: float = 0.1,
    gamma: float = 0.5,
    orpo_lambda: float = 0.1,
):
  """(per-pair loss, chosen reward, rejected reward), float32.

  dpo: -log sigmoid(beta * (chosen - ref_chosen - rejected + ref_rejected));
  ipo: (log-ratio difference - 1 / (2 beta))^2 on summed log-probs;
  simpo: -log sigmoid(beta * (chosen / n_c - rejected / n_r) - gamma);
  orpo: -chosen / n_c - lambda * log sigmoid(log odds(p_c) - log odds(p_r))
  with p = exp(mean token log-prob). Rewards: beta * log-ratio for
  dpo/ipo, beta * mean log-prob for simpo and orpo.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen, rejected = f32(chosen), f32(rejected)
  if kind in ('dpo', 'ipo'):
    if ref_chosen is None or ref_rejected is None:
      raise ValueError(
          f'preference.loss={kind} needs the reference log-probs; '
          'use simpo or orpo for a reference-free loss'
      )
    c = chosen - f32(ref_chosen)
    r = rejected - f32(ref_rejected)
    if kind == 'dpo':
      loss = -jax.nn.log_sigmoid(beta * (c - r))
    else:
      loss = (c - r - 1.0 / (2.0 * beta)) ** 2
    return loss, beta * c, beta * r
  if kind in ('simpo', 'orpo'):
    mc = chosen / jnp.maximum(f32(chosen_tokens), 1.0)
    mr = rejected / jnp.maximum(f32(rejected_tokens), 1.0)
    if kind == 'simpo':
      loss = -jax.nn.log_sigmoid(beta * (mc - mr) - gamma)
    else:
      # log odds(p) = log p - log(1 - p), p = exp(mean logp) < 1
      log_odds = lambda m: m - jnp.log1p(-jnp.exp(jnp.minimum(m, -1e-6)))
      ratio = jax.nn.log_sigmoid(log_odds(mc) - log_odds(mr))
      loss = -mc - orpo_lambda * ratio
    return loss, beta * mc, beta * mr
  raise ValueError(
      f'unknown preference.loss {kind!r}: choose one of {", ".join(LOSSES)}'
  )


REFERENCE_COLUMNS = ('ref_chosen_logps', 'ref_rejected_logps')
_SUMS = ('loss', 'accuracy', 'margin', 'chosen_reward', 'rejected_reward')


def needs_reference(kind: str) -> bool:
  return kind in ('dpo', 'ipo')


class Preference(base.Task):
  """Pairs of replies, one preferred: DPO, IPO, SimPO or ORPO."""

  name = 'preference'
  labels = None
  best_metric = 'accuracy'
  best_mode = 'max'
  table_columns = (
      ('pref acc', 'accuracy', 8, '.4f'),
      ('margin', 'margin', 8, '.4f'),
      ('loss', 'loss', 8, '.4f'),
      ('pairs', 'examples', 6, 'd'),
  )
  validation_column = ('val acc', 'accuracy', 8, '.4f')

  def __init__(self, config, data):
    super().__init__(config, data)
    p = config.preference
    if p.loss not in LOSSES:
      raise ValueError(
          f'unknown preference.loss {p.loss!r}: choose one of '
          f'{", ".join(LOSSES)}'
      )
    self.kind = p.loss
    self.options = {
        'beta': float(p.beta),
        'gamma': float(p.gamma),
        'orpo_lambda': float(p.orpo_lambda),
    }
    self.needs_reference = needs_reference(p.loss)

  @staticmethod
  def build_data(config, workdir):
    """The pair tables (tuning/data/preference.py)."""
    from tuning.data import preference as pairs  # pylint: disable=g-import-not-at-top

    del workdir
    return pairs.build_preference_datasets(config.data)

  def model_dims(self):
    name = self.config.model.name
    if name not in decoder_hf.FAMILY.names:
      raise ValueError(
          f'config.task=preference needs a decoder, not config.model.name='
          f'{name!r}: use one of {", ".join(decoder_hf.FAMILY.names)}'
      )
    return {'num_outputs': None, 'vocab_size': None}

  inputs = staticmethod(stacked_inputs)

  def _pairs(self, logits, batch):
    chosen, rejected, n_c, n_r = stacked_logps(logits, batch)
    refs = {}
    if self.needs_reference:
      missing = [c for c in REFERENCE_COLUMNS if c not in batch]
      if missing:
        raise ValueError(
            f'preference.loss={self.kind} needs the reference log-probs '
            f'({", ".join(missing)}), which training adds; use simpo or '
            'orpo for a reference-free loss'
        )
      refs = {
          'ref_chosen': batch['ref_chosen_logps'],
          'ref_rejected': batch['ref_rejected_logps'],
      }
    loss, c_reward, r_reward = pair_losses(
        self.kind,
        chosen,
        rejected,
        chosen_tokens=n_c,
        rejected_tokens=n_r,
        **refs,
        **self.options,
    )
    return {
        'loss': loss,
        'accuracy': (c_reward > r_reward).astype(jnp.float32),
        'margin': c_reward - r_reward,
        'chosen_reward': c_reward,
        'rejected_reward': r_reward,
    }

  def loss(self, outputs, batch):
    values = self._pairs(outputs, batch)
    return values['loss'].sum(), {
        k: values[k].sum() for k in ('accuracy', 'margin')
    }

  @staticmethod
  def loss_weight(batch):
    return jnp.float32(batch['chosen_input_ids'].shape[0])

  def eval_rows(self, outputs, batch):
    w = batch['weight'].astype(jnp.float32)
    values = self._pairs(outputs, batch)
    return {
        **{k: values[k] * w for k in _SUMS},
        'examples': w,
    }

  def metrics(self, totals):
    n = float(totals['examples'])
    out = {k: float(totals[k]) / max(n, 1.0) for k in _SUMS}
    out['examples'] = int(round(n))
    return out

  def scalars(self, metrics):
    return {k: metrics[k] for k in ('accuracy', 'margin', 'loss')}

  def report(self, metrics, title):
    return (
        f'{title}: preference accuracy {metrics["accuracy"]:.4f}  margin '
        f'{metrics["margin"]:.4f}  loss {metrics["loss"]:.4f}  rewards '
        f'chosen {metrics["chosen_reward"]:.4f} rejected '
        f'{metrics["rejected_reward"]:.4f}  ({metrics["examples"]} pairs)'
    )

  def results(self):
    return {'task': self.name, 'loss_kind': self.kind, **self.options}


TASK = Preference
