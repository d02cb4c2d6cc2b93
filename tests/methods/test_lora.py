"""LoRA on a tiny random BERT (zero-init identity, merge, dropout, which
parameters train) and bf16 computation with float32 params/state/loss."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils

from tuning.methods import lora
from tuning.methods.optimizers import (
    build_optimizer,
    parameter_settings,
    trainable_mask,
)
from tuning.engine.train_step import initial_state, make_train_step

from conftest import (
    IDS,
    MASK,
    bert_params,
    flat,
    lora_config,
    opt_config,
    step_config,
    tiny_bert,
)


def test_lora_zero_init_same_logits_merge_and_only_adapters_train():
  base_model = tiny_bert()
  base = bert_params(base_model)
  config = lora_config(targets=(r'.*attention/(query|value)',), alpha=8.0)
  model = lora.LoraModel(base_model, config)
  params = model.init({'params': jax.random.key(0)}, IDS[:1], MASK[:1])[
      'params'
  ]
  paths = flat(params)
  assert 'bert/encoder/layer_0/attention/query/lora_a' in paths
  assert paths['bert/encoder/layer_1/attention/value/lora_b'].shape == (4, 32)
  assert 'bert/encoder/layer_0/attention/key/lora_a' not in paths
  plain = base_model.apply({'params': base}, IDS, MASK)
  # B = 0: the adapted model is the base model.
  np.testing.assert_allclose(
      model.apply({'params': params}, IDS, MASK), plain, rtol=1e-6, atol=1e-6
  )
  # Non-zero adapters: the merged plain params give the LoRA logits.
  rng = np.random.RandomState(0)
  params = {**paths}
  for p in params:
    if p.endswith('lora_b'):
      params[p] = rng.randn(*params[p].shape).astype(np.float32) * 0.3
  params = flax.traverse_util.unflatten_dict(params, sep='/')
  adapted = model.apply({'params': params}, IDS, MASK)
  assert not np.allclose(adapted, plain, atol=1e-4)
  merged = lora.merge(params, config)
  assert 'lora_a' not in str(jax.tree_util.tree_structure(merged))
  np.testing.assert_allclose(
      base_model.apply({'params': merged}, IDS, MASK),
      adapted,
      rtol=1e-5,
      atol=1e-5,
  )
  # Only the adapters and the head train.
  settings = parameter_settings(params, opt_config(), config)
  trained = {p for p, s in settings.items() if s.trains}
  assert trained == {p for p in flat(params) if 'lora_' in p} | {
      'classifier/kernel',
      'classifier/bias',
  }
  assert len(trained) == 2 * 2 * 2 + 2
  no_head = parameter_settings(
      params, opt_config(), lora_config(train_head=False)
  )
  assert not any(s.trains for p, s in no_head.items() if 'classifier' in p)
  assert 'adapted Dense layers' in lora.describe(params, config)
  with pytest.raises(ValueError, match='config.lora.targets'):
    lora.target_modules(base, lora_config(targets=('nothing',)))


def test_lora_dropout_only_in_training():
  base_model = tiny_bert()
  config = lora_config(targets=(r'.*query',), dropout=0.5)
  model = lora.LoraModel(base_model, config)
  params = flat(
      model.init({'params': jax.random.key(0)}, IDS[:1], MASK[:1])['params']
  )
  params = flax.traverse_util.unflatten_dict(
      {
          p: (np.ones_like(v) if p.endswith('lora_b') else v)
          for p, v in params.items()
      },
      sep='/',
  )
  evaluate = model.apply({'params': params}, IDS, MASK)
  np.testing.assert_array_equal(
      evaluate, model.apply({'params': params}, IDS, MASK)
  )
  a = model.apply(
      {'params': params},
      IDS,
      MASK,
      train=True,
      rngs={'dropout': jax.random.key(1)},
  )
  b = model.apply(
      {'params': params},
      IDS,
      MASK,
      train=True,
      rngs={'dropout': jax.random.key(2)},
  )
  assert not np.allclose(a, b) and not np.allclose(a, evaluate)


def _bert_batch(n=8):
  rng = np.random.RandomState(0)
  ids = rng.randint(4, 50, size=(1, n, 6)).astype(np.int32)
  return {
      'input_ids': ids,
      'attention_mask': np.ones_like(ids),
      'label': rng.randint(0, 2, size=(1, n)).astype(np.int32),
      'index': np.arange(n, dtype=np.int32)[None],
  }


def test_bfloat16_computes_in_bf16_with_float32_params_state_and_loss():
  model = lora.LoraModel(
      tiny_bert(jnp.bfloat16, dropout=0.1),
      lora_config(targets=('.*attention/query',)),
  )
  params = model.init({'params': jax.random.key(0)}, IDS[:1], MASK[:1])[
      'params'
  ]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  logits = model.apply({'params': params}, IDS, MASK)
  assert logits.dtype == jnp.float32
  # Matmuls do run in bf16: the logits differ from the float32 model's.
  f32 = lora.LoraModel(tiny_bert(), lora_config(targets=('.*attention/query',)))
  assert not np.array_equal(logits, f32.apply({'params': params}, IDS, MASK))
  config = opt_config()
  tx, schedule = build_optimizer(config, params, 10, 0, model.config)
  step = make_train_step(
      model,
      tx,
      schedule,
      step_config(),
      trainable=trainable_mask(params, config, model.config),
  )
  state, metrics = step(
      jax_utils.replicate(initial_state(params, tx)), _bert_batch()
  )
  for tree in (state.params, state.opt_state):
    assert {
        x.dtype
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    } == {jnp.dtype('float32')}
  assert metrics['loss'].dtype == jnp.float32
  assert np.isfinite(metrics['loss']).all()
