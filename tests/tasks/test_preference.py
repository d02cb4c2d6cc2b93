"""Preference losses: DPO on a tiny random Llama equals TRL's computation
(its DPOTrainer._compute_loss, sigmoid loss, reproduced in torch on the
same transformers models), IPO/SimPO/ORPO equal numpy, and the LoRA
reference (adapters off) equals the base model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import TINY_LLAMA
from tuning.formats import huggingface as hf_convert
from tuning.methods import lora
from tuning.models import decoder_hf
from tuning.multirun import preference_reference
from tuning.tasks import preference

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
F = torch.nn.functional
BETA = 0.1


def _hf(seed):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
          **{k: v for k, v in TINY_LLAMA.items() if k != 'model_type'}
      )
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """[(hf, flax model, params)] of a policy and a reference."""
  out = []
  for seed in (0, 1):
    folder = tmp_path_factory.mktemp(f'llama{seed}')
    hf = _hf(seed)
    hf.save_pretrained(folder / 'hf')
    hf_convert.convert(str(folder / 'hf'), str(folder / 'c'), verbose=False)
    params = hf_convert.load_converted_params(str(folder / 'c'))
    model = decoder_hf.build(
        ml_collections.ConfigDict({'hf_config': str(folder / 'c')}),
        jnp.float32,
    )
    out.append((hf, model, params))
  return out


def _batch():
  """Three pairs, right padded; prompts of 3-4 tokens, replies of 2-5."""
  rng = np.random.default_rng(0)
  batch = {}
  for side, lengths in (('chosen', (3, 5, 2)), ('rejected', (4, 2, 3))):
    ids = np.zeros((3, 10), np.int32)
    mask = np.zeros_like(ids)
    loss = np.zeros_like(ids)
    for row, (prompt, reply) in enumerate(zip((3, 4, 3), lengths)):
      n = prompt + reply
      ids[row, :n] = rng.integers(3, 32, n)
      ids[row, :prompt] = 7 + row  # the pair's shared prompt
      mask[row, :n] = 1
      loss[row, prompt:n] = 1
    batch.update(
        {
            f'{side}_input_ids': ids,
            f'{side}_attention_mask': mask,
            f'{side}_loss_mask': loss,
        }
    )
  return batch


def _trl_logps(hf, batch):
  """What DPOTrainer._compute_loss sums: the completion tokens' log-probs
  of the concatenated [chosen; rejected] batch."""
  ids = torch.tensor(
      np.concatenate([batch['chosen_input_ids'], batch['rejected_input_ids']])
  ).long()
  mask = torch.tensor(
      np.concatenate(
          [batch['chosen_attention_mask'], batch['rejected_attention_mask']]
      )
  ).long()
  completion = torch.tensor(
      np.concatenate([batch['chosen_loss_mask'], batch['rejected_loss_mask']])
  ).long()
  with torch.no_grad():
    logits = hf(input_ids=ids, attention_mask=mask).logits.double()
  shift = completion[:, 1:]
  per_token = torch.gather(
      F.log_softmax(logits[:, :-1], -1), 2, ids[:, 1:, None]
  )[..., 0]
  logps = (per_token * shift).sum(1)
  return logps.chunk(2, dim=0)


def test_dpo_equals_trl(models):
  (hf, model, params), (ref_hf, ref_model, ref_params) = models
  batch = _batch()
  chosen, rejected = _trl_logps(hf, batch)
  ref_chosen, ref_rejected = _trl_logps(ref_hf, batch)
  chosen_lr, rejected_lr = chosen - ref_chosen, rejected - ref_rejected
  trl_losses = -F.logsigmoid(BETA * (chosen_lr - rejected_lr))
  trl_rewards = BETA * chosen_lr, BETA * rejected_lr
  trl_accuracy = (trl_rewards[0] > trl_rewards[1]).double().mean()

  def ours(m, p):
    logits = jax.jit(m.apply)({'params': p}, **preference.stacked_inputs(batch))
    return preference.stacked_logps(logits, batch)

  c, r, nc, nr = ours(model, params)
  rc, rr, _, _ = ours(ref_model, ref_params)
  loss, cw, rw = preference.pair_losses(
      'dpo', c, r, ref_chosen=rc, ref_rejected=rr, beta=BETA
  )
  np.testing.assert_allclose(c, chosen.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(r, rejected.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(loss, trl_losses.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(cw, trl_rewards[0].numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(rw, trl_rewards[1].numpy(), atol=1e-5, rtol=0)
  assert float(jnp.mean(cw > rw)) == pytest.approx(float(trl_accuracy))
  assert nc.tolist() == [3, 5, 2] and nr.tolist() == [4, 2, 3]


def test_lora_reference_is_the_base(models):
  _, model, params = models[0]
  batch = _batch()
  config = ml_collections.ConfigDict(
      {'rank': 2, 'alpha': 4.0, 'targets': ('.*',), 'dropout': 0.0}
  )
  config.base_dtype = 'float32'
  wrapped = lora.LoraModel(model, config)
  adapted = lora.add_adapters(params, config, jax.random.key(0))
  adapted = jax.tree_util.tree_map_with_path(
      lambda path, v: (
          jnp.full_like(v, 0.05)
          if 'lora_b' in jax.tree_util.keystr(path)
          else v
      ),
      adapted,
  )
  base_logits = model.apply(
      {'params': params}, **preference.stacked_inputs(batch)
  )
  base_c, base_r, _, _ = preference.stacked_logps(base_logits, batch)
  ref_c, ref_r = preference_reference.split_logps(
      wrapped, lora.without_adapters(adapted), batch, 3
  )
  np.testing.assert_allclose(ref_c, base_c, atol=1e-5)
  np.testing.assert_allclose(ref_r, base_r, atol=1e-5)
  policy = wrapped.apply(
      {'params': adapted}, **preference.stacked_inputs(batch)
  )
  pol_c, _, _, _ = preference.stacked_logps(policy, batch)
  assert np.abs(np.asarray(pol_c - base_c)).max() > 1e-3  # adapters act


C, R = np.array([-4.0, -9.0, -2.5]), np.array([-6.0, -3.0, -2.0])
RC, RR = np.array([-5.0, -8.0, -3.0]), np.array([-5.5, -4.0, -2.5])
NC, NR = np.array([4.0, 6.0, 2.0]), np.array([3.0, 2.0, 5.0])


def _logsig(x):
  return -np.log1p(np.exp(-x))


def test_ipo_simpo_orpo_equal_numpy():
  ipo, _, _ = preference.pair_losses(
      'ipo', C, R, ref_chosen=RC, ref_rejected=RR, beta=0.5
  )
  np.testing.assert_allclose(ipo, ((C - RC) - (R - RR) - 1.0) ** 2, rtol=1e-6)
  simpo, cw, rw = preference.pair_losses(
      'simpo', C, R, chosen_tokens=NC, rejected_tokens=NR, beta=2.0, gamma=0.5
  )
  want = -_logsig(2.0 * (C / NC - R / NR) - 0.5)
  np.testing.assert_allclose(simpo, want, rtol=1e-6)
  np.testing.assert_allclose(cw, 2.0 * C / NC, rtol=1e-6)
  orpo, _, _ = preference.pair_losses(
      'orpo', C, R, chosen_tokens=NC, rejected_tokens=NR, orpo_lambda=0.2
  )
  mc, mr = C / NC, R / NR
  log_odds = (mc - np.log1p(-np.exp(mc))) - (mr - np.log1p(-np.exp(mr)))
  np.testing.assert_allclose(orpo, -mc - 0.2 * _logsig(log_odds), rtol=1e-6)
  with pytest.raises(ValueError, match='dpo needs the reference'):
    preference.pair_losses('dpo', C, R)
  with pytest.raises(ValueError, match='unknown preference.loss'):
    preference.pair_losses('kto', C, R)
