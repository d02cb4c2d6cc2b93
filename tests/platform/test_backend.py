"""The XLA:CPU workarounds are chosen by backend (tuning/platform/backend.py):
on the CPU backend, models in bfloat16 run their Dense and tied output
layers through tuning/platform/bf16_matmul.py's custom VJPs and the pmapped
step updates on the device axis; with the choice off (`backend.plain()`,
what GPU and TPU get) the models are plain flax, with no custom VJP of ours,
and float32 numbers are the same either way."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import IDS, MASK, TINY_LLAMA, tiny_bert
from tuning.engine.layouts import PmapLayout
from tuning.models import decoder_hf
from tuning.models.mlp import MLP
from tuning.platform import backend


def test_the_choice_is_by_backend_name():
  assert backend.workarounds_for('cpu')
  assert not backend.workarounds_for('gpu')
  assert not backend.workarounds_for('tpu')
  assert jax.default_backend() == 'cpu' and backend.cpu_workarounds()
  assert PmapLayout().update_on_device_axis
  with backend.plain():
    assert not backend.cpu_workarounds()
    assert not PmapLayout().update_on_device_axis
  assert backend.cpu_workarounds()


def _custom_calls_of_ours(closed_jaxpr) -> list[str]:
  """Source locations of the custom_vjp/custom_jvp functions defined in
  tuning/ that a jaxpr calls (sub-jaxprs included)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name.startswith(('custom_vjp', 'custom_jvp')):
        where = eqn.params['call_jaxpr'].jaxpr.debug_info.func_src_info
        if '/tuning/' in where:
          found.append(where)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(closed_jaxpr.jaxpr)
  return found


def _bert(dtype):
  model = tiny_bert(dtype)
  return model, lambda p: model.apply({'params': p}, IDS, MASK)


def _tied_llama(dtype):
  model = decoder_hf.from_hf_config(
      {**TINY_LLAMA, 'tie_word_embeddings': True}, dtype
  )
  apply = lambda p: model.apply({'params': p}, IDS)  # noqa: E731
  return model, apply


def _mlp(dtype):
  model = MLP(3, (8,), 0.0, dtype=dtype)
  x = np.random.RandomState(0).randn(4, 5).astype(np.float32)
  return model, lambda p: model.apply({'params': p}, x)


@pytest.fixture(scope='module')
def params():
  """float32 parameters of the tiny BERT, the tied Llama and the MLP."""
  init = lambda model, *x: jax.jit(model.init)(jax.random.key(0), *x)  # noqa: E731
  return {
      'bert': init(tiny_bert(), IDS[:1], MASK[:1])['params'],
      'llama': init(_tied_llama(jnp.float32)[0], IDS)['params'],
      'mlp': init(_mlp(jnp.float32)[0], np.ones((1, 5)))['params'],
  }


def test_bfloat16_models_use_our_custom_vjps_only_on_cpu(params):
  jaxprs = {}
  for plain in (False, True):
    with backend.plain() if plain else contextlib.nullcontext():
      for name, build in (('bert', _bert), ('llama', _tied_llama)):
        for dtype in (jnp.float32, jnp.bfloat16):
          apply = build(dtype)[1]
          jaxprs[name, dtype, plain] = jax.make_jaxpr(apply)(params[name])
  for name in ('bert', 'llama'):
    on = _custom_calls_of_ours(jaxprs[name, jnp.bfloat16, False])
    assert on and all('bf16_matmul.py' in w for w in on), (name, on)
    if name == 'llama':  # the tied output layer too
      assert any('_tied_logits' in w for w in on), on
    assert not _custom_calls_of_ours(jaxprs[name, jnp.bfloat16, True]), name
    # float32 never takes them.
    assert not _custom_calls_of_ours(jaxprs[name, jnp.float32, False]), name


def test_forcing_the_choice_off_keeps_float32_numbers_and_bfloat16_close(
    params,
):
  for name, build, dtypes in (
      ('bert', _bert, (jnp.float32,)),
      ('mlp', _mlp, (jnp.float32, jnp.bfloat16)),
  ):
    for dtype in dtypes:
      _, apply = build(dtype)
      loss = lambda p: (apply(p).astype(jnp.float32) ** 2).sum()  # noqa: E731,B023
      on = jax.jit(jax.value_and_grad(loss))(params[name])
      with backend.plain():
        off = jax.jit(jax.value_and_grad(loss))(params[name])
      scale = max(np.abs(b).max() for b in jax.tree.leaves(off))
      for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
        if dtype == jnp.float32:
          np.testing.assert_array_equal(a, b, err_msg=name)
        else:  # bfloat16: plain autodiff rounds elsewhere
          np.testing.assert_allclose(
              a, b, rtol=5e-2, atol=2e-2 * scale, err_msg=name
          )
