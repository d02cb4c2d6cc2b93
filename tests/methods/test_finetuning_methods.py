"""Fine-tuning methods, in-process on a tiny random BERT and an MLP:
parameter groups (weight decay, freezing, linear probing, layer-wise LR
decay, LR multipliers), gradient accumulation, the NaN guard, EMA, early
stopping and resume (LoRA and bf16: test_lora.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils

from tuning.methods import lora
from tuning.methods.early_stopping import EarlyStopping
from tuning.models.mlp import MLP
from tuning.methods.optimizers import (
    build_optimizer,
    clip_by_global_norm,
    describe_parameters,
    parameter_settings,
    trainable_mask,
)
from tuning.engine.train_step import (
    AXIS,
    initial_state,
    make_train_step,
    StepLayout,
    psum_over_devices,
    train_step_fn,
)

from conftest import bert_params, flat, lora_config, opt_config, step_config


def test_weight_decay_mask_matches_the_intended_parameters():
  settings = parameter_settings(bert_params(), opt_config())
  decayed = {p for p, s in settings.items() if s.decays}
  kernels = {p for p in settings if p.endswith('/kernel')}
  assert decayed == kernels  # all Dense kernels, nothing else
  assert len(kernels) == 2 * 6 + 2  # 6 per layer, pooler, classifier
  for p in settings:
    if p.endswith('bias') or 'LayerNorm' in p or 'embeddings' in p:
      assert not settings[p].decays, p
  # adam has no weight decay at all; an explicit no_decay=() decays all.
  assert not any(
      s.decays
      for s in parameter_settings(
          bert_params(), opt_config(name='adam')
      ).values()
  )
  assert all(
      s.decays
      for s in parameter_settings(
          bert_params(), opt_config(no_decay=())
      ).values()
  )


def test_layer_decay_and_lr_multipliers_per_path():
  params = bert_params()
  settings = parameter_settings(
      params,
      opt_config(
          layer_decay=0.5, lr_mults=(('classifier/.*', 10.0), ('.*', 3.0))
      ),
  )
  mult = {p: s.lr_mult for p, s in settings.items()}
  assert mult['classifier/kernel'] == 10.0  # depth 0, first rule wins
  assert mult['bert/pooler/dense/kernel'] == 3.0  # depth 0
  assert mult['bert/encoder/layer_1/attention/query/kernel'] == 3.0 * 0.5
  assert mult['bert/encoder/layer_0/output/LayerNorm/scale'] == 3.0 * 0.25
  assert mult['bert/embeddings/word_embeddings/embedding'] == 3.0 * 0.125
  assert mult['bert/embeddings/LayerNorm/bias'] == 3.0 * 0.125
  table = '\n'.join(describe_parameters(params, opt_config(layer_decay=0.5)))
  assert 'lr_mult' in table and '0.125' in table
  # The multipliers scale the updates (plain SGD, constant LR 1).
  tx, _ = build_optimizer(
      opt_config(
          name='sgd',
          momentum=0.0,
          weight_decay=0.0,
          clip_norm=0.0,
          schedule='constant',
          learning_rate=1.0,
          layer_decay=0.5,
      ),
      params,
      10,
      0,
  )
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  upd = flat(updates)
  assert np.allclose(upd['bert/embeddings/word_embeddings/embedding'], -0.125)
  assert np.allclose(upd['bert/encoder/layer_0/attention/key/bias'], -0.25)
  assert np.allclose(upd['classifier/bias'], -1.0)
  with pytest.raises(ValueError, match='layer_index_regex'):
    parameter_settings(
        params, opt_config(layer_decay=0.5, layer_index_regex=r'block_(\d+)/.*')
    )
  with pytest.raises(ValueError, match='lr_mults'):
    parameter_settings(params, opt_config(lr_mults=('classifier',)))


def test_linear_probe_trains_only_the_head_and_frozen_have_no_state():
  params = bert_params()
  config = opt_config(linear_probing=True)
  mask = flat(trainable_mask(params, config))
  assert {p for p, t in mask.items() if t} == {
      'classifier/kernel',
      'classifier/bias',
  }
  tx, _ = build_optimizer(config, params, 10, 0)
  state = tx.init(params)
  state_size = sum(np.size(x) for x in jax.tree.leaves(state))
  head_size = 32 * 2 + 2
  assert state_size <= 2 * head_size + 8  # Adam moments of the head + counts
  table = describe_parameters(params, config)
  assert any('FROZEN' in row for row in table)
  assert f'trainable {head_size:,} /' in table[-1]


def test_frozen_params_are_unchanged_by_a_train_step():
  model = MLP(3, (8,), 0.0)
  params = model.init({'params': jax.random.key(0)}, np.ones((1, 4)))['params']
  config = opt_config(frozen=('dense_0/.*',))
  tx, schedule = build_optimizer(config, params, 10, 0)
  mask = trainable_mask(params, config)
  step = make_train_step(model, tx, schedule, step_config(), trainable=mask)
  batch = {
      'x': np.random.RandomState(0).randn(1, 8, 4).astype(np.float32),
      'label': np.array([[0, 1, 2, 0, 1, 2, 0, 1]], np.int32),
      'index': np.arange(8, dtype=np.int32)[None],
  }
  state = jax_utils.replicate(initial_state(params, tx))
  new, _ = step(state, batch)
  before, after = flat(params), flat(jax_utils.unreplicate(new.params))
  np.testing.assert_array_equal(
      after['dense_0/kernel'], before['dense_0/kernel']
  )
  assert not np.allclose(after['head/kernel'], before['head/kernel'])


def _mlp_setup(**opt_overrides):
  model = MLP(3, (8,), 0.5)
  params = model.init({'params': jax.random.key(0)}, np.ones((1, 4)))['params']
  config = opt_config(**opt_overrides)
  tx, schedule = build_optimizer(config, params, 10, 2)
  rng = np.random.RandomState(0)
  batch = {
      'x': rng.randn(1, 32, 4).astype(np.float32),
      'label': rng.randint(0, 3, size=(1, 32)).astype(np.int32),
      'index': np.arange(32, dtype=np.int32)[None],
  }
  return model, params, tx, schedule, batch


def test_accumulated_micro_batches_match_one_batch_in_a_step():
  model, params, tx, schedule, batch = _mlp_setup()
  results = []
  for accumulation in (1, 4):
    step = make_train_step(
        model, tx, schedule, step_config(accumulation_steps=accumulation)
    )
    state = jax_utils.replicate(initial_state(params, tx))
    for _ in range(3):
      state, metrics = step(state, batch)
    results.append((jax_utils.unreplicate(state.params), metrics))
  (p1, m1), (p4, m4) = results
  np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-6)
  np.testing.assert_allclose(m4['accuracy'], m1['accuracy'])
  for k, v in flat(p1).items():
    np.testing.assert_allclose(flat(p4)[k], v, rtol=1e-5, atol=1e-6)


def test_nonfinite_step_is_flagged_and_skipped_when_asked():
  model, params, tx, schedule, batch = _mlp_setup()
  bad = dict(batch, x=batch['x'].copy())
  bad['x'][0, 3, 1] = np.nan
  stop = make_train_step(model, tx, schedule, step_config())
  _, metrics = stop(jax_utils.replicate(initial_state(params, tx)), bad)
  assert float(metrics['nonfinite'][0]) == 1.0
  skip = make_train_step(model, tx, schedule, step_config(on_nonfinite='skip'))
  state = jax_utils.replicate(initial_state(params, tx, count_skipped=True))
  state, _ = skip(state, batch)
  good = jax_utils.unreplicate(state.params)
  state, metrics = skip(state, bad)
  assert int(metrics['skipped'][0]) == 1 and int(state.skipped[0]) == 1
  assert int(state.step[0]) == 2
  for k, v in flat(good).items():
    np.testing.assert_array_equal(
        flat(jax_utils.unreplicate(state.params))[k], v
    )
  state, metrics = skip(state, batch)
  assert float(metrics['nonfinite'][0]) == 0 and int(state.skipped[0]) == 1
  with pytest.raises(ValueError, match='on_nonfinite'):
    make_train_step(model, tx, schedule, step_config(on_nonfinite='ignore'))


def test_ema_tracks_the_parameters():
  model, params, tx, schedule, batch = _mlp_setup()
  step = make_train_step(model, tx, schedule, step_config(ema_decay=0.5))
  state = jax_utils.replicate(initial_state(params, tx, ema=True))
  state, _ = step(state, batch)  # step 0: decay min(0.5, 1/10) = 0.1
  p, e = flat(jax_utils.unreplicate(state.params)), flat(
      jax_utils.unreplicate(state.ema_params)
  )
  for k, v in flat(params).items():
    np.testing.assert_allclose(e[k], 0.1 * v + 0.9 * p[k], rtol=1e-5, atol=1e-7)


def test_global_norm_clipping_matches_optax():
  rng = np.random.RandomState(0)
  grads = {'a': rng.randn(4, 3).astype(np.float32), 'b': rng.randn(5)}
  grads['b'] = grads['b'].astype(np.float32)
  norm = float(
      np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
  )
  for max_norm in (norm / 3, norm * 2):  # clipped, then left alone
    ours, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, None)
    for k in grads:
      np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6)
    total = np.sqrt(sum((np.asarray(v) ** 2).sum() for v in ours.values()))
    np.testing.assert_allclose(total, min(norm, max_norm), rtol=1e-5)


def _copied_state(compiled_text: str) -> list[str]:
  """Shapes of the entry parameters that a compiled step copies."""
  entry = compiled_text[compiled_text.index('\nENTRY') :]
  shapes = dict(re.findall(r'%([\w.\-]+) = (\S+) parameter\(', entry))
  copied = re.findall(r' copy\(%([\w.\-]+)\)', entry)
  return [shapes[name] for name in copied if name in shapes]


def _select_of_both(pred, true_fun, false_fun, *operands):
  """`lax.cond` as the skip once was: both branches, then a select."""
  return jax.tree.map(
      lambda new, old: jnp.where(pred, new, old),
      true_fun(*operands),
      false_fun(*operands),
  )


@pytest.mark.parametrize('on_nonfinite', ['stop', 'skip'])
def test_pmapped_update_on_the_device_axis_copies_no_kernel_or_moment(
    on_nonfinite, monkeypatch
):
  """The pmapped step as a run gets it on XLA:CPU (make_train_step)
  copies no kernel or Adam moment; the old form did, in either mode: the
  update without the state's [1, ...] shards (train_step.with_device_axis,
  chosen for the CPU backend by tuning/platform/backend.py), and with
  'skip' a select of the new or old values instead of a branch (each
  alone makes XLA:CPU copy the state first). The values agree."""
  model, params, tx, schedule, batch = _mlp_setup()
  config = step_config(on_nonfinite=on_nonfinite)
  state = lambda: jax_utils.replicate(  # pylint: disable=unnecessary-lambda-assignment
      initial_state(params, tx, count_skipped=on_nonfinite == 'skip')
  )
  states, copied = {}, {}
  for form in ('old', 'new'):
    with monkeypatch.context() as patch:
      if form == 'old':
        step = jax.pmap(
            train_step_fn(
                model,
                tx,
                schedule,
                config,
                layout=StepLayout(psum_over_devices),  # no device axis
            ),
            axis_name=AXIS,
            donate_argnums=(0,),
        )
        if on_nonfinite == 'skip':
          patch.setattr(jax.lax, 'cond', _select_of_both)
      else:
        step = make_train_step(model, tx, schedule, config)
      text = step.lower(state(), batch).compile().as_text()
      copied[form] = [
          shape
          for shape in _copied_state(text)
          if shape.split(']')[0].count(',') >= 2  # [1, K, N]: kernel, moment
      ]
      current = state()
      for _ in range(3):
        current, _ = step(current, batch)
      states[form] = jax_utils.unreplicate(current)
  assert len(copied['old']) >= 6, copied['old']  # kernels, mu, nu
  assert not copied['new'], copied['new']
  for a, b in zip(
      jax.tree.leaves(states['old']), jax.tree.leaves(states['new'])
  ):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)


def test_early_stopping_counts_evaluations_without_improvement(tmp_path):
  stopper = EarlyStopping(2, 'accuracy', 'max')
  assert not stopper.update(10, {'accuracy': 0.5})
  assert not stopper.update(20, {'accuracy': 0.6})
  assert not stopper.update(30, {'accuracy': 0.6})
  assert stopper.update(40, {'accuracy': 0.55})
  assert 'best 0.6000 at step 20' in stopper.message(40)
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 10, "split": "validation", "loss": 1.0}\n'
      '{"step": 20, "split": "validation", "loss": 2.0}\n'
      '{"step": 30, "split": "validation", "loss": 0.5}\n'
  )
  resumed = EarlyStopping(2, 'loss', 'min')
  resumed.replay(str(tmp_path), 20)
  assert resumed.best == 1.0 and resumed.since_best == 1
  with pytest.raises(ValueError, match='best_metric'):
    EarlyStopping(1, 'auc').update(1, {'accuracy': 1.0})


def test_state_with_lora_ema_skip_and_frozen_groups_resumes_exactly(tmp_path):
  from tuning.engine.checkpoints import RunCheckpoints  # pylint: disable=g-import-not-at-top

  model = lora.LoraModel(
      MLP(3, (8,), 0.5), lora_config(targets=('dense_0',), dropout=0.2)
  )
  params = model.init({'params': jax.random.key(0)}, np.ones((1, 4)))['params']
  config = opt_config(layer_decay=0.5, layer_index_regex=r'dense_(\d+)/.*')
  tx, schedule = build_optimizer(config, params, 10, 2, model.config)
  step = make_train_step(
      model,
      tx,
      schedule,
      step_config(accumulation_steps=2, on_nonfinite='skip', ema_decay=0.9),
      trainable=trainable_mask(params, config, model.config),
  )
  new = lambda: initial_state(params, tx, ema=True, count_skipped=True)  # pylint: disable=unnecessary-lambda-assignment
  _, _, _, _, batch = _mlp_setup()
  state = jax_utils.replicate(new())
  for _ in range(2):
    state, _ = step(state, batch)
  checkpoints = RunCheckpoints(str(tmp_path / 'ckpt'))
  checkpoints.save(2, jax.tree.map(lambda x: np.asarray(x[0]), state), {})
  checkpoints.wait()
  restored, _ = checkpoints.restore(2, new())
  resumed = jax_utils.replicate(restored)
  for _ in range(2):
    state, _ = step(state, batch)
    resumed, _ = step(resumed, batch)
  a = jax.tree.leaves(jax.tree.map(np.asarray, state))
  b = jax.tree.leaves(jax.tree.map(np.asarray, resumed))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert int(resumed.step[0]) == 4 and resumed.ema_params is not None
  base = flat(jax_utils.unreplicate(resumed.params))
  np.testing.assert_array_equal(
      base['dense_0/kernel'], flat(params)['dense_0/kernel']
  )
