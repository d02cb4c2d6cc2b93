"""Dropout bits (tuning/engine/prng.py) and dropout keys (training.dropout_keys):
the hash bits' statistics, that they are per key, per-example masks in a
batched model (tuning/models/dropout.py), and what each dropout_keys mode
keeps invariant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils

from tuning.engine import prng
from tuning.config.checks import ConfigValueError, check
from tuning.config.defaults import base_config
from tuning.models import dropout
from tuning.models.mlp import MLP
from tuning.methods.optimizers import build_optimizer
from tuning.engine.train_step import initial_state, make_train_step

from conftest import flat, opt_config, step_config


def _key(seed=0):
  return jax.random.key(seed, impl=prng.impl('hash'))


def test_hash_bits_look_uniform_and_independent():
  n = 1 << 20
  key = _key()
  u = np.asarray(jax.random.uniform(key, (n,)))
  assert abs(u.mean() - 0.5) < 3e-3 and abs(u.var() - 1 / 12) < 2e-3
  # Neighbouring positions, and the same positions under a folded key.
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5e-3
  other = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (n,)))
  assert abs(np.corrcoef(u, other)[0, 1]) < 5e-3
  # Every bit is set half of the time.
  bits = np.asarray(jax.random.bits(key, (n,), jnp.uint32))
  ones = [((bits >> b) & 1).mean() for b in range(32)]
  assert max(abs(o - 0.5) for o in ones) < 3e-3, ones
  # Dropout's keep rate, over a 2-D mask.
  keep = np.asarray(jax.random.bernoulli(key, 0.9, (1024, 1024)))
  assert abs(keep.mean() - 0.9) < 2e-3
  # 8-, 16- and 64-bit draws work too.
  for dtype in (jnp.uint8, jnp.uint16, jnp.uint64):
    if dtype == jnp.uint64 and not jax.config.jax_enable_x64:
      continue
    assert jax.random.bits(key, (4,), dtype).dtype == dtype


def test_hash_bits_depend_on_their_own_key_alone():
  """Under vmap (the train step's per-example keys), an example's bits are
  those of its key drawn alone: what keeps results independent of the
  device count."""
  keys = jax.vmap(lambda i: jax.random.fold_in(_key(), i))(jnp.arange(8))
  together = jax.vmap(lambda k: jax.random.bits(k, (3, 5)))(keys)
  for i in (0, 5):
    alone = jax.random.bits(jax.random.fold_in(_key(), i), (3, 5))
    np.testing.assert_array_equal(together[i], alone)
  assert len({bytes(np.asarray(t)) for t in together}) == 8


class _TwoDropouts(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = dropout.Dropout(0.5, deterministic=not train)(x)
    return dropout.Dropout(0.5)(x, deterministic=not train)


def test_per_example_masks_are_each_rows_own():
  """Inside dropout.per_example, a row's masks are those it gets alone
  (with its index), whatever else is in the batch and whether the input
  is [rows, length, features] or its [rows * length, features] view."""
  model, key = _TwoDropouts(), _key()
  x = jnp.arange(1, 4 * 3 * 5 + 1, dtype=jnp.float32).reshape(4, 3, 5)
  index = jnp.array([7, 1, 2, 3])
  run = lambda v: model.apply({}, v, True, rngs={'dropout': key})  # pylint: disable=unnecessary-lambda-assignment
  with dropout.per_example(index):
    together = run(x)
    rows = run(x.reshape(12, 5)).reshape(4, 3, 5)
  np.testing.assert_array_equal(rows, together)
  for i in (0, 2):
    with dropout.per_example(index[i : i + 1]):
      np.testing.assert_array_equal(run(x[i : i + 1])[0], together[i])
  # Rows differ from each other; 1/4 survive two dropouts of 0.5, x 4.
  assert len({bytes(np.asarray(t != 0)) for t in together}) == 4
  kept = np.asarray(together != 0)
  np.testing.assert_array_equal(np.asarray(together)[kept], 4 * x[kept])
  # Outside the context and in eval: Flax's dropout.
  assert run(x).shape == x.shape
  np.testing.assert_array_equal(model.apply({}, x, False), x)


def test_per_example_dropout_names_an_input_without_the_batch_axis():
  with dropout.per_example(jnp.arange(4)):
    with pytest.raises(ValueError, match="dropout_keys='per_shard'"):
      _TwoDropouts().apply({}, jnp.ones((3, 5)), True, rngs={'dropout': _key()})


def _mlp_steps(accumulation, **options):
  model = MLP(3, (8,), 0.5)
  params = model.init({'params': jax.random.key(0)}, np.ones((1, 4)))['params']
  tx, schedule = build_optimizer(opt_config(), params, 10, 2)
  rng = np.random.RandomState(0)
  batch = {
      'x': rng.randn(1, 32, 4).astype(np.float32),
      'label': rng.randint(0, 3, size=(1, 32)).astype(np.int32),
      'index': np.arange(32, dtype=np.int32)[None],
  }
  step = make_train_step(
      model,
      tx,
      schedule,
      step_config(accumulation_steps=accumulation, **options),
  )
  state = jax_utils.replicate(initial_state(params, tx))
  for _ in range(2):
    state, metrics = step(state, batch)
  return flat(jax_utils.unreplicate(state.params)), metrics['loss']


@pytest.mark.parametrize('prng_impl', ['hash', 'threefry2x32'])
def test_per_example_keys_ignore_how_the_batch_is_cut(prng_impl):
  one, loss_one = _mlp_steps(1, prng_impl=prng_impl)
  four, loss_four = _mlp_steps(4, prng_impl=prng_impl)
  np.testing.assert_allclose(loss_four, loss_one, rtol=1e-6)
  for k, v in one.items():
    np.testing.assert_allclose(four[k], v, rtol=1e-5, atol=1e-6)


def test_per_shard_keys_train_but_depend_on_the_cut():
  one, loss_one = _mlp_steps(1, dropout_keys='per_shard')
  four, loss_four = _mlp_steps(4, dropout_keys='per_shard')
  assert np.isfinite(loss_one).all() and np.isfinite(loss_four).all()
  assert not np.allclose(loss_four, loss_one, rtol=1e-4)
  # Deterministic: the same cut gives the same numbers.
  np.testing.assert_array_equal(
      _mlp_steps(4, dropout_keys='per_shard')[1], loss_four
  )


@pytest.mark.parametrize(
    'field,value',
    [('prng_impl', 'philox'), ('dropout_keys', 'per_device')],
)
def test_unknown_dropout_settings_are_one_line_errors(field, value):
  config = base_config()
  config.training.total_steps = 10
  config.training[field] = value
  with pytest.raises(ConfigValueError, match=f'config.training.{field}='):
    check(config)
  with pytest.raises(ValueError, match=f'config.training.{field}='):
    if field == 'prng_impl':
      prng.impl(value)
    else:
      _mlp_steps(1, dropout_keys=value)
