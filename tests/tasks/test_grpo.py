"""GRPO (config.task=grpo): loss, rewards, learning and exact resume on a
tiny random decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuning.config.defaults import base_config
from tuning.methods import lora as lora_lib
from tuning.models import decoder as decoder_lib
from tuning.modes import grpo as grpo_mode
from tuning.multirun import rewards as rewards_lib
from tuning.tasks import grpo as grpo_loss

VOCAB = 12
TARGET = 3  # the token the test reward asks for ('d')


def encode(text):
  return [ord(ch) - ord('a') for ch in text]


def decode(ids):
  return ''.join(chr(ord('a') + i) for i in ids)


def target_share(prompts, completions, **_):
  del prompts
  return [c.count(decode([TARGET])) / max(len(c), 1) for c in completions]


def make_loop(steps_config=None, accumulation=1, lr=0.05, averaging='token'):
  cfg = decoder_lib.DecoderConfig(
      kind='llama',
      vocab_size=VOCAB,
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      num_kv_heads=2,
      head_dim=8,
      intermediate_size=32,
      max_positions=64,
      activation='silu',
      norm_eps=1e-5,
      tie_embeddings=False,  # an lm_head Dense that LoRA adapts
  )
  c = base_config()
  c.lora.rank = 4
  c.lora.alpha = 8.0
  c.lora.targets = ('.*',)
  model = lora_lib.LoraModel(decoder_lib.DecoderLM(cfg), c.lora)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  g = c.grpo
  g.group_size = 4
  g.prompts_per_step = 2
  g.max_new_tokens = 6
  g.loss_averaging = averaging
  g.beta = 0.01
  for k, v in (steps_config or {}).items():
    g[k] = v
  return grpo_mode.Grpo(
      model,
      jax.tree.map(np.asarray, params['params']),
      encode,
      decode,
      ['ab', 'bca', 'cab', 'abc'],
      {},
      rewards_lib.Reward('target_share', target_share),
      g,
      learning_rate=lr,
      seed=1,
      accumulation_steps=accumulation,
  )


def test_mean_reward_rises():
  loop = make_loop()
  rewards = [loop.train_step()['reward_mean'] for _ in range(8)]
  first, last = np.mean(rewards[:2]), np.mean(rewards[-2:])
  assert last > first + 0.4, rewards


def _numpy_loss(logp, old, ref, adv, mask, beta, eps, averaging):
  ratio = np.exp(logp - old)
  pg = -np.minimum(
      ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None]
  )
  kl = np.exp(ref - logp) - (ref - logp) - 1
  per = (pg + beta * kl) * mask
  if averaging == 'sequence':
    return np.mean(per.sum(1) / mask.sum(1))
  return per.sum() / mask.sum()


@pytest.mark.parametrize('averaging', ['sequence', 'token'])
def test_loss_equals_hand_computation(averaging):
  rng = np.random.default_rng(0)
  logp = -rng.random((4, 5)).astype(np.float32)
  old = logp + 0.3 * rng.standard_normal((4, 5)).astype(np.float32)
  ref = logp + 0.2 * rng.standard_normal((4, 5)).astype(np.float32)
  mask = np.array([[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  adv = grpo_loss.group_advantages([1.0, 0.0, 0.5, 0.5], 2, 1e-4)
  np.testing.assert_allclose(adv, [1, -1, 0, 0], atol=1e-3)
  kwargs = dict(beta=0.1, clip_eps=0.2, averaging=averaging)
  want = _numpy_loss(logp, old, ref, adv, mask, 0.1, 0.2, averaging)
  denom = grpo_loss.denominator(mask, averaging)
  got, _ = grpo_loss.sequence_loss(
      logp, old, ref, adv, jnp.asarray(mask), denom=denom, **kwargs
  )
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Micro-batches over the whole batch's denominator add up to it.
  parts = sum(
      float(
          grpo_loss.sequence_loss(
              logp[s],
              old[s],
              ref[s],
              adv[s],
              jnp.asarray(mask[s]),
              denom=denom,
              **kwargs,
          )[0]
      )
      for s in (slice(0, 2), slice(2, 4))
  )
  np.testing.assert_allclose(parts, want, rtol=1e-5)


def test_reference_is_base_without_adapters():
  loop = make_loop()
  loop.train_step()
  params = loop.params()
  ref = lora_lib.without_adapters(params)
  ids = jnp.array([[1, 2, 3, 4]])
  plain = loop.model.model.apply({'params': lora_lib.split(params)[0]}, ids)
  np.testing.assert_allclose(
      loop.model.apply({'params': ref}, ids), plain, atol=1e-6
  )
  assert not np.allclose(loop.model.apply({'params': params}, ids), plain)


def test_accumulation_gives_the_same_update():
  one, two = make_loop(), make_loop(accumulation=2)
  one.train_step()
  two.train_step()
  for a, b in zip(jax.tree.leaves(one.adapters), jax.tree.leaves(two.adapters)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_resume_gives_identical_next_step(tmp_path):
  path = str(tmp_path / grpo_mode.STATE_FILE)
  straight = make_loop()
  straight.train_step()
  straight.save(path)
  straight.train_step()
  resumed = make_loop()
  resumed.restore(path)
  assert resumed.step == 1
  resumed.train_step()
  assert resumed.last_completions == straight.last_completions
  for a, b in zip(
      jax.tree.leaves(resumed.adapters), jax.tree.leaves(straight.adapters)
  ):
    np.testing.assert_array_equal(a, b)


def test_builtin_rewards():
  exact = rewards_lib.build('gsm8k_exact', 'answer')
  r = exact(
      ['q'] * 3,
      ['so #### 1,234', 'it is 12', '#### 7'],
      answer=['steps #### 1234', '12', '8'],
  )
  np.testing.assert_array_equal(r, [1, 0, 0])
  assert exact.is_check
  rx = rewards_lib.build('regex:^yes')
  np.testing.assert_array_equal(rx(['p', 'p'], ['yes sir', 'no']), [1, 0])
  dotted = rewards_lib.build('tests.tasks.test_grpo:target_share')
  np.testing.assert_allclose(dotted(['p'], ['dd']), [1.0])


def bad_length(prompts, completions, **_):
  return [1.0]


def bad_type(prompts, completions, **_):
  return ['good'] * len(completions)


@pytest.mark.parametrize(
    'spec, message',
    [
        (None, 'config.grpo.reward is not set'),
        ('bleu', "unknown config.grpo.reward 'bleu'"),
        ('no_such.module:fn', "cannot import 'fn' from 'no_such.module'"),
        ('regex:(', 'not a regular expression'),
        ('classifier:/nonexistent', 'is not a finished tuning run'),
    ],
)
def test_bad_reward_specs(spec, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(')) as e:
    rewards_lib.build(spec)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize(
    'fn, message',
    [
        ('bad_length', 'returned 1 values for 2 completions'),
        ('bad_type', "returned 'good'"),
    ],
)
def test_bad_reward_values(fn, message):
  reward = rewards_lib.build(f'tests.tasks.test_grpo:{fn}')
  with pytest.raises(ValueError, match=message) as e:
    reward(['a', 'b'], ['c', 'd'])
  assert '\n' not in str(e.value)


def test_task_grpo_runs_the_grpo_loop():
  from tuning.modes import experiment  # pylint: disable=g-import-not-at-top

  c = base_config()
  c.task = 'grpo'
  assert experiment._runner(c) is grpo_mode.train  # pylint: disable=protected-access
