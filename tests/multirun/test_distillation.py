"""Knowledge distillation: the loss, the step, the teacher cache, main.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_dict
from sklearn.datasets import load_digits

from conftest import TINY, read_json, run_main, run_main_in_process
from conftest import step_config
from tuning.multirun import distillation
from tuning.config.defaults import base_config
from tuning.models.mlp import MLP
from tuning.engine.train_step import initial_state, make_train_step


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_equals_hand_computed_value():
  s = np.array([[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]], np.float32)
  t = np.array([[0.5, 0.0, 3.0], [2.0, -1.0, 0.0]], np.float32)
  labels = np.array([2, 1])
  labelled = np.array([1.0, 0.0], np.float32)
  alpha, temp = 0.3, 2.0
  ce = -_log_softmax(s.astype(np.float64))[np.arange(2), labels]
  pt = np.exp(_log_softmax(t / temp))
  kl = (pt * (np.log(pt) - _log_softmax(s / temp))).sum(-1)
  # Row 0: 0.3 * CE + 0.7 * 4 * KL; row 1 (teacher-labelled): no CE.
  expected = alpha * labelled * ce + (1 - alpha) * temp**2 * kl
  got = distillation.distillation_loss(
      jnp.asarray(s), jnp.asarray(t), labels, labelled, alpha, temp, 'kl'
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert expected[0] > 0 and expected[1] > 0
  mse = distillation.distillation_loss(
      jnp.asarray(s), jnp.asarray(t), labels, labelled, alpha, temp, 'mse'
  )
  np.testing.assert_allclose(
      mse,
      alpha * labelled * ce + (1 - alpha) * ((s - t) ** 2).mean(-1),
      rtol=1e-5,
  )
  # A student equal to its teacher has no KL term left.
  same = distillation.distillation_loss(
      jnp.asarray(t), jnp.asarray(t), labels, np.zeros(2), 0.5, temp
  )
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def _mlp_state_and_batch():
  model = MLP(3, (8,), 0.5)
  x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
  params = model.init({'params': jax.random.key(0)}, x[:1], train=False)[
      'params'
  ]
  tx = optax.adam(1e-2)
  batch = {
      'x': x,
      'label': np.arange(16, dtype=np.int32) % 3,
      'index': np.arange(16, dtype=np.int32),
      'labelled': np.ones(16, np.float32),
      'teacher_logits': np.random.default_rng(1)
      .normal(size=(16, 3))
      .astype(np.float32),
  }
  return model, params, tx, batch


def _two_steps(step_fn, state, batch):
  shard = {k: v[None] for k, v in batch.items()}
  losses = []
  for _ in range(2):
    state, metrics = step_fn(state, shard)
    losses.append(float(metrics['loss'][0]))
  return state, losses


def test_alpha_one_step_equals_plain_training():
  model, params, tx, batch = _mlp_state_and_batch()
  schedule = lambda step: 1e-2  # pylint: disable=unnecessary-lambda-assignment
  replicate = lambda s: jax.tree.map(lambda x: np.asarray(x)[None], s)  # pylint: disable=unnecessary-lambda-assignment
  distill = base_config().distill
  distill.alpha = 1.0
  plain, plain_losses = _two_steps(
      make_train_step(model, tx, schedule, step_config()),
      replicate(initial_state(params, tx)),
      batch,
  )
  kd, kd_losses = _two_steps(
      make_train_step(
          model,
          tx,
          schedule,
          step_config(),
          loss_fn=distillation.make_loss_fn(distill),
      ),
      replicate(initial_state(params, tx)),
      batch,
  )
  np.testing.assert_allclose(kd_losses, plain_losses, rtol=1e-7)
  for a, b in zip(jax.tree.leaves(kd.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # ... while alpha < 1 does learn something else from the teacher.
  distill.alpha = 0.5
  other, _ = _two_steps(
      make_train_step(
          model,
          tx,
          schedule,
          step_config(),
          loss_fn=distillation.make_loss_fn(distill),
      ),
      replicate(initial_state(params, tx)),
      batch,
  )
  assert not np.allclose(
      jax.tree.leaves(other.params)[0], jax.tree.leaves(plain.params)[0]
  )


class _FakeTeacher:
  """Counts its forward passes; logits are a function of the rows."""

  def __init__(self):
    self.calls = 0
    self.config = config_dict.ConfigDict({'augment_copies': 0})
    self.members = config_dict.ConfigDict({'workdirs': ['/t'], 'steps': [7]})

  def logits(self, raw, progress=''):
    del progress
    self.calls += 1
    lengths = np.array([len(t) for t in raw['text']], np.float32)
    return np.stack([lengths, -lengths], axis=1)


def test_teacher_cache_round_trip(tmp_path):
  teacher = _FakeTeacher()
  raw = {'text': np.array(['a good film', 'bad', 'fine'], dtype=object)}
  log = []
  first = distillation.cached_teacher_logits(
      teacher, raw, str(tmp_path), 0, log
  )
  again = distillation.cached_teacher_logits(
      teacher, raw, str(tmp_path), 0, log
  )
  assert teacher.calls == 1 and 'read from' in log[-1]
  assert isinstance(again, np.memmap)  # read by row, not loaded whole
  np.testing.assert_array_equal(again, first)
  np.testing.assert_array_equal(again[:, 0], [11, 3, 4])
  changed = {'text': np.array(['a good film', 'bad', 'great'], dtype=object)}
  third = distillation.cached_teacher_logits(
      teacher, changed, str(tmp_path), 0, log
  )
  assert teacher.calls == 2 and third[2, 0] == 5


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher') / 'run')
  run_main_in_process(
      f'--config={TINY}',
      '--config.model.hidden=(64,64)',
      '--config.training.total_steps=60',
      f'--workdir={workdir}',
  )
  return workdir


def test_distilled_student_through_main(teacher_dir, tmp_path):
  transfer = str(tmp_path / 'transfer.npz')
  np.savez(transfer, x=load_digits().data[:100])
  params = {}
  # The teacher's logits cached, computed in the pmapped step, and computed
  # in the jitted step on a 2 x 2 mesh of 4 devices.
  for name, mode, flags, devices in (
      ('cache', 'cache', (), 1),
      ('step', 'step', (), 1),
      (
          'mesh',
          'step',
          (
              '--config.parallelism=mesh',
              '--config.mesh.data=2',
              '--config.mesh.fsdp=2',
          ),
          4,
      ),
  ):
    workdir = str(tmp_path / name)
    args = (
        f'--config={TINY}',
        '--config.model.hidden=(16,)',
        f'--config.distill.teacher=({teacher_dir!r},)',
        '--config.distill.alpha=0.5',
        f'--config.distill.teacher_logits={mode}',
        f'--config.distill.transfer_path={transfer}',
        f'--workdir={workdir}',
        *flags,
    )
    if devices == 1:  # in this process
      out = run_main_in_process(*args)
    else:
      out = run_main(*args, devices=devices)
    assert '+ 100 teacher-labelled (transfer file)' in out.stdout
    assert 'distillation: validation accuracy, and examples/s' in out.stdout
    results = read_json(os.path.join(workdir, 'results.json'))
    d = results['distillation']
    teacher_results = read_json(os.path.join(teacher_dir, 'results.json'))
    # The teacher evaluated on the student's split is the teacher.
    assert (
        d['teacher_validation']['accuracy']
        == teacher_results['validation']['accuracy']
    )
    assert d['teacher_parameters'] > results['num_parameters']
    params[name] = results['validation']['loss']
    if name == 'cache':
      assert os.path.exists(
          os.path.join(workdir, 'teacher_logits', 'logits.npy')
      )
  # Logits computed in the step and cached ones train the same student.
  np.testing.assert_allclose(params['step'], params['cache'], rtol=1e-4)
  np.testing.assert_allclose(params['mesh'], params['cache'], rtol=1e-4)


def test_ensemble_teacher_of_one_run_twice_teaches_as_the_run(
    teacher_dir, tmp_path
):
  """An ensemble teacher's logits are log(mean probabilities): for two
  copies of one run they differ from its logits by a constant per row, so
  the KL term, and the student, are the same."""
  losses = []
  for name, teachers in (
      ('one', (teacher_dir,)),
      ('two', (teacher_dir, teacher_dir)),
  ):
    workdir = str(tmp_path / name)
    run_main_in_process(
        f'--config={TINY}',
        '--config.model.hidden=(16,)',
        f'--config.distill.teacher={teachers!r}',
        '--config.distill.alpha=0.5',
        '--config.training.total_steps=20',
        f'--workdir={workdir}',
    )
    results = read_json(os.path.join(workdir, 'results.json'))
    losses.append(results['validation']['loss'])
    assert len(results['distillation']['teacher']) == len(teachers)
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_distillation_config_errors(teacher_dir, tmp_path):
  bad = run_main_in_process(
      f'--config={TINY}',
      f'--config.distill.teacher=({teacher_dir!r},{teacher_dir!r})',
      '--config.distill.teacher_logits=step',
      f'--workdir={tmp_path / "bad"}',
      check=False,
  )
  assert bad.returncode == 1
  assert (
      'teacher_logits=step runs one teacher in the train step, not 2'
      in bad.stderr.strip().splitlines()[-1]
  )
  bad = run_main_in_process(
      f'--config={TINY}',
      f'--config.distill.teacher=({teacher_dir!r},)',
      '--config.distill.alpha=1.5',
      f'--workdir={tmp_path / "bad2"}',
      check=False,
  )
  assert (
      'config.distill.alpha=1.5 must be in [0, 1]'
      in bad.stderr.strip().splitlines()[-1]
  )
  for flags, words in (
      (('--config.data.augment=mixup:0.2',), 'set augment_copies >= 1'),
      (
          (
              '--config.data.augment=mask:0.1',
              '--config.distill.augment_copies=2',
          ),
          'augments single sentences',
      ),
  ):
    bad = run_main_in_process(
        f'--config={TINY}',
        f'--config.distill.teacher=({teacher_dir!r},)',
        *flags,
        f'--workdir={tmp_path / "bad3"}',
        check=False,
    )
    assert words in bad.stderr.strip().splitlines()[-1]


def test_defaults_have_distillation_off():
  assert not distillation.enabled(base_config().distill)
