"""Mesh mode (config.parallelism='mesh'): a jitted step on a data x fsdp mesh
trains like pmap, shards the state, and its checkpoints move between device
counts and layouts."""

import os
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict

from conftest import (
    TINY,
    flat,
    read_json,
    run_main,
    run_main_in_process,
    run_main_processes,
    train_losses,
)
from tuning.engine.layouts import mesh_shape, partition_spec

MESH = '--config.parallelism=mesh'


def saved_params(workdir):
  """The latest checkpoint's parameters as numpy, whatever layout saved
  them (a sharded save needs a target to be read on other devices)."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  step = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  path = os.path.join(ckpt_dir, str(step), 'state')
  metadata = ocp.PyTreeCheckpointer().metadata(path)
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  import jax  # pylint: disable=g-import-not-at-top

  item = {
      'params': jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree['params']
      )
  }
  restored = ocp.PyTreeCheckpointer().restore(
      path,
      args=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
      ),
  )
  return step, flat(restored['params'])


def assert_same_training(workdir, reference):
  losses, expected = train_losses(workdir), train_losses(reference)
  assert losses.keys() == expected.keys() and len(losses) >= 4
  np.testing.assert_allclose(
      list(losses.values()), list(expected.values()), rtol=1e-5, atol=1e-6
  )
  (step, params), (ref_step, ref) = saved_params(workdir), saved_params(
      reference
  )
  assert step == ref_step and params.keys() == ref.keys()
  for k in ref:
    np.testing.assert_allclose(params[k], ref[k], rtol=1e-4, atol=1e-5)


def layout_line(out):
  return next(l for l in out.splitlines() if l.startswith('layout: '))


@pytest.fixture(scope='module')
def pmap_on_eight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pmap') / 'run')
  out = run_main(f'--config={TINY}', f'--workdir={workdir}', devices=8).stdout
  assert layout_line(out).startswith('layout: pmap over 8 local device(s)')
  return workdir


@pytest.mark.parametrize(
    'flags,shape',
    [
        (('--config.mesh.data=2', '--config.mesh.fsdp=4'), 'data=2 x fsdp=4'),
        # fsdp=8, with gradient accumulation (micro-batches cut per device).
        (
            ('--config.mesh.fsdp=8', '--config.training.accumulation_steps=2'),
            'data=1 x fsdp=8',
        ),
    ],
)
def test_mesh_trains_like_pmap_and_shards_the_state(
    tmp_path, pmap_on_eight, flags, shape
):
  workdir = str(tmp_path / 'mesh')
  out = run_main(
      f'--config={TINY}', f'--workdir={workdir}', MESH, *flags, devices=8
  ).stdout
  line = layout_line(out)
  # Read from the placed arrays' shardings: the kernels and the 32-wide
  # biases are split over fsdp; the 10-class head bias is not divisible.
  assert line.startswith(
      f'layout: mesh {shape} over 8 device(s); 5 of 6 '
      'parameter arrays sharded over fsdp'
  ), line
  per_device, replicated = map(
      float,
      re.search(
          r'([\d.e-]+) MiB per device \(replicated: ([\d.e-]+) MiB', line
      ).groups(),
  )
  fsdp = int(shape[-1])
  assert per_device < 1.5 * replicated / fsdp, line
  assert_same_training(workdir, pmap_on_eight)
  assert read_json(os.path.join(workdir, 'results.json'))['test'][
      'loss'
  ] == pytest.approx(
      read_json(os.path.join(pmap_on_eight, 'results.json'))['test']['loss'],
      rel=1e-4,
  )


def test_mesh_checkpoints_move_between_device_counts(tmp_path):
  """Saved sharded on 8 devices, resumed on a 2-device mesh, evaluated with
  pmap on 1: the numbers of an uninterrupted run."""
  # A constant schedule after warmup: extending 40 steps to 60 on resume
  # changes no learning rate, so an uninterrupted 60-step run is the
  # reference.
  constant = '--config.optimizer.schedule=constant'
  steps = '--config.training.total_steps=60'
  reference = str(tmp_path / 'reference')
  run_main_in_process(
      f'--config={TINY}', f'--workdir={reference}', constant, steps
  )
  workdir = str(tmp_path / 'run')
  run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      constant,
      MESH,
      '--config.mesh.fsdp=4',
      devices=8,
  )
  out = run_main(
      f'--config={TINY}',
      f'--workdir={workdir}',
      constant,
      steps,
      MESH,
      '--config.mesh.fsdp=2',
      devices=2,
  ).stdout
  assert 'resumed from' in out and 'at step 40' in out
  assert 'layout: mesh data=1 x fsdp=2 over 2 device(s)' in out
  results = read_json(os.path.join(workdir, 'results.json'))
  assert results['steps'] == 60
  assert_same_training(workdir, reference)
  expected = read_json(os.path.join(reference, 'results.json'))['test']
  # Float-tolerance training differences may flip at most one example.
  assert results['test']['accuracy'] == pytest.approx(
      expected['accuracy'], abs=1.5 / 359
  )
  assert results['test']['loss'] == pytest.approx(expected['loss'], rel=1e-4)
  run_main_in_process(
      f'--config={TINY}',
      f'--workdir={workdir}',
      constant,
      steps,
      '--config.mode=eval',
  )
  assert (
      read_json(os.path.join(workdir, 'results.json'))['test']
      == results['test']
  )


def test_two_processes_on_a_mesh_match_pmap(tmp_path, pmap_on_eight):
  """2 processes x 2 devices, parameters sharded across both processes."""
  workdir = str(tmp_path / 'multi')
  outputs = run_main_processes(
      f'--config={TINY}',
      f'--workdir={workdir}',
      MESH,
      '--config.mesh.fsdp=4',
      devices=2,
  )
  assert 'layout: mesh data=1 x fsdp=4 over 4 device(s)' in outputs[0]
  assert 'on 2 device(s) x 2 process(es), global batch 32' in outputs[0]
  assert_same_training(workdir, pmap_on_eight)


@pytest.mark.parametrize(
    'flags,expected',
    [
        (
            (MESH, '--config.mesh.data=3'),
            'config.mesh: data=3 x fsdp=1 = 3 devices, but there are 8',
        ),
        (
            (MESH, '--config.mesh.data=-1', '--config.mesh.fsdp=3'),
            'config.mesh: 8 devices do not split into data=-1 x fsdp=3',
        ),
        (
            (MESH, '--config.mesh.fsdp=4', '--config.training.batch_size=36'),
            "batch_size=36 must be divisible by the mesh's data=2 x fsdp=4 = 8 "
            'device(s)',
        ),
        (
            ('--config.parallelism=pjit',),
            "config.parallelism='pjit': use one of pmap, mesh",
        ),
    ],
)
def test_bad_mesh_settings_are_one_line_errors(tmp_path, flags, expected):
  result = run_main(
      f'--config={TINY}',
      f'--workdir={tmp_path / "run"}',
      *flags,
      devices=8,
      check=False,
      timeout=120,
  )
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], result.stderr


def test_partition_rule_and_mesh_shape():
  assert partition_spec((64, 32), 4) == P('fsdp', None)
  assert partition_spec((30, 64), 8) == P(None, 'fsdp')  # largest divisible
  assert partition_spec((10,), 4) == P()
  assert partition_spec((), 4) == P()
  assert partition_spec((64, 32), 1) == P()
  mesh = lambda **kw: config_dict.ConfigDict(kw)  # pylint: disable=unnecessary-lambda-assignment
  assert mesh_shape(mesh(data=-1, fsdp=4), 8) == {'data': 2, 'fsdp': 4}
  assert mesh_shape(mesh(data=2, fsdp=-1), 8) == {'data': 2, 'fsdp': 4}
  with pytest.raises(ValueError, match='only one axis can be -1'):
    mesh_shape(mesh(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match=r'config.mesh.fsdp=0'):
    mesh_shape(mesh(data=-1, fsdp=0), 8)
