"""The frozen LoRA base stored in bfloat16, int8 or NF4
(tuning/methods/quantization.py, config.lora.base_dtype): the rounding
error per block, a tiny Llama LoRA trained 3 steps on each (loss close to
float32's, fewer parameter bytes, float32 adapters), float32 bitwise as
before, and the one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_LLAMA, flat, opt_config, step_config
from tuning.config import checks
from tuning.config.defaults import base_config
from tuning.engine.train_step import initial_state, train_step_fn
from tuning.methods import lora
from tuning.methods import quantization
from tuning.methods.optimizers import build_optimizer, trainable_mask
from tuning.models import decoder_hf
from tuning.tasks.base import token_cross_entropy


def _kernel(shape, seed=0):
  rng = np.random.default_rng(seed)
  # Rows of very different magnitudes: per-block scales matter.
  return (
      rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))
  ).astype(np.float32)


@pytest.mark.parametrize('fmt', ['int8', 'nf4'])
@pytest.mark.parametrize('shape', [(8, 128), (5, 96)])
def test_quantize_dequantize_error_within_the_bound_per_block(fmt, shape):
  kernel = _kernel(shape)
  stored = quantization.quantize(kernel, fmt)
  assert quantization.kernel_shape(stored) == shape
  blocks = -(-shape[1] // quantization.BLOCK)
  assert stored['scales'].shape == (shape[0], blocks)
  assert stored['scales'].dtype == jnp.float32
  codes = stored[fmt]
  assert codes.dtype == (jnp.int8 if fmt == 'int8' else jnp.uint8)
  assert codes.shape == (shape[0], shape[1] // (2 if fmt == 'nf4' else 1))
  # Each block's scale is its absmax.
  padded = np.pad(kernel, ((0, 0), (0, blocks * 64 - shape[1])))
  np.testing.assert_array_equal(
      stored['scales'], np.abs(padded.reshape(shape[0], blocks, 64)).max(-1)
  )
  error = np.abs(np.asarray(quantization.dequantize(stored)) - kernel)
  bound = np.asarray(quantization.max_error(stored))
  assert (error <= bound * (1 + 1e-5) + 1e-7).all()
  # The bound is tight to within a factor 2: the codes are used.
  assert error.max() > 0.5 * bound.max()
  per = 1 / 254 if fmt == 'int8' else 0.1519
  assert abs(bound.max() / np.abs(kernel).max() - per) < 1e-3


def test_nf4_values_are_qloras_and_odd_widths_are_an_error():
  values = quantization.NF4_VALUES
  assert len(values) == 16 and values[0] == -1 and values[-1] == 1
  assert values[7] == 0 and (np.diff(values) > 0).all()
  # A block holding exactly the 16 values (times 2) comes back exactly.
  kernel = np.tile(values * 2, 4)[None]
  np.testing.assert_allclose(
      quantization.dequantize(quantization.quantize(kernel, 'nf4')),
      kernel,
      atol=1e-6,
  )
  with pytest.raises(ValueError, match='odd output size 5'):
    quantization.quantize(np.ones((4, 5), np.float32), 'nf4', 'layer')
  with pytest.raises(ValueError, match="unknown config.lora.base_dtype 'fp8'"):
    quantization.quantize(np.ones((4, 4), np.float32), 'fp8')


def _next_token_task():
  class NextToken:
    inputs = staticmethod(
        lambda b: {'input_ids': b['input_ids'], 'attention_mask': b['mask']}
    )

    @staticmethod
    def loss(logits, batch):
      ce = token_cross_entropy(logits[:, :-1], batch['input_ids'][:, 1:])[0]
      return (ce * batch['mask'][:, 1:]).sum(), {}

    @staticmethod
    def loss_weight(batch):
      return batch['mask'][:, 1:].sum()

  return NextToken


def _train(base_dtype, steps=3):
  """(losses, state, params before training) of a tiny Llama LoRA run."""
  model = decoder_hf.from_hf_config(
      {**TINY_LLAMA, 'vocab_size': 96}, jnp.float32
  )
  config = state_lora(base_dtype)
  lora_model = lora.LoraModel(model, config)
  rng = np.random.default_rng(0)
  batch = {
      'input_ids': rng.integers(3, 96, (4, 12)).astype(np.int32),
      'mask': np.ones((4, 12), np.int32),
      'index': np.arange(4, dtype=np.int32),
  }
  params = jax.jit(
      lambda k: lora_model.init(
          {'params': k}, batch['input_ids'][:1], batch['mask'][:1]
      )
  )(jax.random.key(0))['params']
  params = jax.tree.map(np.asarray, params)
  # Non-zero adapters, so that the base's rounding shows in the loss.
  params = lora.join(
      lora.split(params)[0],
      {
          m: (a, np.full(b.shape, 0.05, np.float32))
          for m, (a, b) in lora.split(params)[1].items()
      },
  )
  opt = _opt(learning_rate=1e-2)
  tx, schedule = build_optimizer(opt, params, 10, 0, config)
  step = jax.jit(
      train_step_fn(
          lora_model,
          tx,
          schedule,
          step_config(),
          task=_next_token_task(),
          trainable=trainable_mask(params, opt, config),
      )
  )
  state = initial_state(params, tx)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return losses, state, params


@pytest.fixture(scope='module')
def float32_run():
  return _train('float32')


def test_float32_base_is_the_plain_lora_tree(float32_run):
  _, state, params = float32_run
  config = state_lora()
  assert all(v.dtype == np.float32 for v in flat(state.params).values())
  # float32 stores nothing differently: quantize_base is the identity.
  assert lora.quantize_base(params, config) is params
  assert lora.dequantized_base(params) is params


@pytest.mark.parametrize(
    'fmt, tolerance, ratio',
    [('bfloat16', 2e-3, 0.6), ('int8', 2e-3, 0.4), ('nf4', 2e-2, 0.35)],
)
def test_smaller_base_trains_close_to_float32_in_fewer_bytes(
    float32_run, fmt, tolerance, ratio
):
  reference, state32, _ = float32_run
  losses, state, start = _train(fmt)
  # The loss follows the float32 run's (relative difference per step).
  np.testing.assert_allclose(losses, reference, rtol=tolerance)
  assert losses[-1] < losses[0]
  params, params32 = flat(state.params), flat(state32.params)
  # The frozen part of the state (everything but adapters and head) is
  # smaller: the adapted kernels are stored in `fmt`.
  trained = flat(trainable_mask(start, _opt(), state_lora()))

  def frozen_bytes(tree, mask):
    return sum(v.nbytes for k, v in tree.items() if not mask.get(k, False))

  mask32 = flat(trainable_mask(state32.params, _opt(), state_lora()))
  assert frozen_bytes(params, trained) < frozen_bytes(params32, mask32)
  adapted = [k for k in params32 if k.endswith('query/kernel')]
  kernel_bytes = sum(params32[k].nbytes for k in adapted)
  stored_bytes = sum(
      v.nbytes
      for k, v in params.items()
      if any(k.startswith(a) for a in adapted)
  )
  assert stored_bytes <= ratio * kernel_bytes, (stored_bytes, kernel_bytes)
  # The adapters, head and norms stay float32 and train; the stored
  # kernels are the same codes after training (frozen).
  for k, v in params.items():
    if '/lora_' in k or k.startswith('lm_head') or 'norm' in k:
      assert v.dtype == np.float32, k
  assert any(
      not np.array_equal(v, flat(start)[k])
      for k, v in params.items()
      if k.endswith('lora_a')
  )
  for k, v in flat(start).items():
    if v.dtype != np.float32:
      np.testing.assert_array_equal(params[k], v)
  # The optimizer holds moments of the trained float32 leaves only.
  assert all(
      x.dtype == np.float32
      for x in jax.tree.leaves(state.opt_state)
      if np.ndim(x)
  )
  # Merged: float32 plain kernels, dequantized plus the adapters.
  merged = flat(
      lora.merge(jax.tree.map(np.asarray, state.params), state_lora())
  )
  assert set(merged) == {k for k in params32 if '/lora_' not in k}
  assert all(v.dtype == np.float32 for v in merged.values())


def state_lora(base_dtype='float32'):
  """Rank 4 on the Llama family's targets."""
  config = base_config().lora
  config.rank, config.base_dtype = 4, base_dtype
  config.targets = decoder_hf.FAMILY.lora_targets
  return config


def _opt(**overrides):
  return opt_config(head=decoder_hf.FAMILY.head_regex, **overrides)


def test_bad_base_dtype_is_one_line():
  config = base_config()
  config.lora.base_dtype = 'fp8'
  with pytest.raises(Exception, match="unknown config.lora.base_dtype 'fp8'"):
    checks.check(config)
  config = base_config()
  config.training.total_steps = 3
  config.lora.base_dtype = 'nf4'
  with pytest.raises(Exception, match='set config.lora.rank') as e:
    checks.check(config)
  assert '\n' not in str(e.value)
  config.lora.rank = 8
  checks.check(config)


def test_nf4_run_loads_float32_weights_and_resumes_exactly(
    tmp_path, monkeypatch
):
  """main.py's run (in this process): float32 pretrained weights loaded
  into an NF4 base, the codes in the checkpoints, resume exact."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from conftest import final_params, preempted_then_resumed  # pylint: disable=g-import-not-at-top
  from tasks.test_causal_lm import causal_config, write_model_folder, write_text_csv  # pylint: disable=g-import-not-at-top
  from tuning.engine.run import Run  # pylint: disable=g-import-not-at-top
  from tuning.modes import experiment  # pylint: disable=g-import-not-at-top

  config = causal_config(
      write_model_folder(tmp_path / 'model'),
      write_text_csv(tmp_path / 'text.csv', rows=120),
      steps=8,
  )
  config.training.eval_every_steps = config.training.checkpoint_every_steps = 4
  run = Run(config, str(tmp_path / 'plain'))
  pretrained = run.init_params()
  run.checkpoints.close()
  ocp.PyTreeCheckpointer().save(
      str(tmp_path / 'pretrained' / 'params'), pretrained
  )
  config.init.checkpoint = str(tmp_path / 'pretrained')
  config.lora.rank, config.lora.base_dtype = 4, 'nf4'
  expected = experiment.run(config, str(tmp_path / 'uninterrupted'))
  resumed = preempted_then_resumed(
      config, str(tmp_path / 'resumed'), monkeypatch, step=4
  )
  assert resumed['test'] == expected['test']
  assert resumed['validation'] == expected['validation']
  saved = flat(final_params(str(tmp_path / 'resumed'))[1])
  query = 'decoder/layer_0/attention/query/kernel'
  assert saved[f'{query}/nf4'].dtype == np.uint8
  # The codes are those of the pretrained float32 kernel.
  np.testing.assert_array_equal(
      saved[f'{query}/nf4'],
      quantization.quantize(flat(pretrained)[query], 'nf4')['nf4'],
  )
  assert saved['lm_head/kernel'].dtype == np.float32  # the trained head
