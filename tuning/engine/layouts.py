"""How arrays are laid out over devices: pmap replicas or a jit mesh.

`make_layout(config)` returns one of two layouts with one interface, which
train.py uses to place the state and the batches, compile the steps, fetch
results and save checkpoints:

- `PmapLayout` (`config.parallelism='pmap'`, the default): the train state
  is replicated on every local device, a batch is reshaped to
  `[local_devices, B / local_devices, ...]`, the step is `jax.pmap`-ped and
  averages gradients with `pmean`. On the CPU backend only, its optimizer
  update runs on `[1, ...]` views of the state (an XLA:CPU workaround,
  chosen by tuning/platform/backend.py; train_step.with_device_axis).
- `MeshLayout` (`'mesh'`): a `jax.sharding.Mesh` with axes `('data',
  'fsdp')` over all devices (`config.mesh`, -1 = the rest of the devices).
  Every array of the train state (parameters, optimizer state, EMA) whose
  largest dimension divisible by the fsdp size is sharded over 'fsdp' along
  that dimension; the others are replicated. The rule depends only on the
  shape, so optimizer moments are laid out like their parameter. Batch rows
  are split over both axes (fsdp is a data axis too, as in MaxText); each
  process gives only its rows (`jax.make_array_from_process_local_data`).
  The step is `jax.jit`-ted with these shardings; XLA inserts the
  all-gathers of parameters and the reduce-scatters of gradients.
  Checkpoints are written shard by shard by orbax and restored against
  this run's shardings, so they move between device counts and layouts.

A compiled train step is `step(state, batch, *extras)`: extra arguments
(e.g. a teacher's parameters) placed with `place_params` reach the step
function in both layouts (pmap maps their device axis; jit keeps their
shardings); any extra `[rows, ...]` batch column is split like the others.
"""

from __future__ import annotations

import math

from flax import jax_utils
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

from tuning.engine.train_step import AXIS, psum_over_devices
from tuning.platform import backend

PARALLELISMS = ('pmap', 'mesh')
MESH_AXES = ('data', 'fsdp')


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-shaped output, in order (numpy).

  pmap outputs are `[local_devices, ...]`; mesh outputs are `[rows, ...]`
  split over devices; both are cut along their first axis.
  """
  if not hasattr(x, 'addressable_shards'):
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _mib(nbytes: float) -> str:
  return f'{nbytes / 2**20:.3g} MiB'


def _per_device_bytes(tree) -> int:
  """Bytes of a placed tree on this process's first device."""
  return sum(
      x.addressable_shards[0].data.nbytes
      for x in jax.tree.leaves(tree)
      if hasattr(x, 'addressable_shards')
  )


class PmapLayout:
  """Replicated state, `[devices, rows, ...]` batches, a pmapped step."""

  name = 'pmap'
  batch_shards = 1  # each device's step sees only its own rows

  @property
  def update_on_device_axis(self) -> bool:
    """Whether the step updates the state on its `[1, ...]` shards
    (train_step.with_device_axis): an XLA:CPU workaround, so on the CPU
    backend only (tuning/platform/backend.py)."""
    return backend.cpu_workarounds()

  def __init__(self):
    self.devices = jax.local_device_count()
    self.devices_text = f'the {jax.device_count()} device(s)'
    self._identity = jax.pmap(lambda x: x, axis_name=AXIS)

  def place_state(self, state):
    """Replicated with the train step's axis name, as the step returns
    it: with jax_utils.replicate's own axis name, the step's second call
    compiled it again."""
    return self._identity(jax_utils.replicate(state))

  place_params = place_state

  def place_batch(self, batch: dict) -> dict:
    return {
        k: v.reshape((self.devices, -1) + v.shape[1:]) for k, v in batch.items()
    }

  def fetch(self, x) -> np.ndarray:
    """Host copy of a value every device holds (a metric, the step)."""
    return local_rows(x)[0]

  def checkpoint_state(self, state):
    """What to save: a host copy of one replica."""
    return jax.tree.map(self.fetch, state)

  def restore_target(self, host_state):
    return host_state

  def compile_train_step(self, step_fn, state):
    del state
    return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))

  def compile_eval_step(self, eval_fn):
    return jax.pmap(eval_fn, axis_name=AXIS)

  def compile_eval_totals(self, totals_fn):
    """Totals summed over devices (`sum_over_devices` in `totals_fn`);
    every device holds them, `fetch` reads one copy."""
    return jax.pmap(totals_fn, axis_name=AXIS)

  def place_totals(self, totals):
    """Host `[devices, ...]` totals placed as the totals step returns
    them (same axis name, so that feeding them back compiles nothing)."""
    return self._identity(totals)

  @staticmethod
  def sum_over_devices(x):
    return psum_over_devices(x)

  @staticmethod
  def gather_rows(x):
    """Every device's rows, in global order, on every device."""
    return jax.lax.all_gather(x, AXIS, tiled=True)

  def describe(self, state) -> str:
    return (
        f'layout: pmap over {self.devices} local device(s), train state '
        f'replicated ({_mib(_per_device_bytes(state))} per device)'
    )


def mesh_shape(mesh_config, device_count: int) -> dict[str, int]:
  """{'data': d, 'fsdp': f} from the config (-1 = the rest), checked."""
  sizes = {}
  for axis in MESH_AXES:
    # .get: callers may give only the axes they set (a run's config.mesh
    # holds both, with defaults.py's defaults).
    size = mesh_config.get(axis, 1)
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(
          f'config.mesh.{axis}={size!r}: use a positive '
          'number of devices, or -1 for the rest'
      )
    sizes[axis] = size
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(
        'config.mesh: only one axis can be -1 (the rest of the '
        f'devices); got {" and ".join(rest)}'
    )
  known = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if device_count % known:
      raise ValueError(
          f'config.mesh: {device_count} devices do not split '
          f'into {_shape_text(sizes)}'
      )
    sizes[rest[0]] = device_count // known
  if math.prod(sizes.values()) != device_count:
    raise ValueError(
        f'config.mesh: {_shape_text(sizes)} = '
        f'{math.prod(sizes.values())} devices, but there are '
        f'{device_count} (set one axis to -1 for the rest)'
    )
  return sizes


def _shape_text(sizes: dict) -> str:
  return ' x '.join(f'{a}={s}' for a, s in sizes.items())


def partition_spec(shape, fsdp: int) -> P:
  """'fsdp' on the largest dimension divisible by `fsdp`; else replicated."""
  if fsdp > 1:
    candidates = [
        (size, -i) for i, size in enumerate(shape) if size % fsdp == 0
    ]
    if candidates:
      _, neg_dim = max(candidates)
      spec = [None] * len(shape)
      spec[-neg_dim] = 'fsdp'
      return P(*spec)
  return P()


class MeshLayout:
  """A ('data', 'fsdp') mesh: state sharded over fsdp, a jitted step."""

  name = 'mesh'
  update_on_device_axis = False  # global arrays: no device axis

  def __init__(self, mesh_config):
    self.sizes = mesh_shape(mesh_config, jax.device_count())
    self.mesh = jax.make_mesh(
        tuple(self.sizes.values()),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
    )
    self.devices = jax.local_device_count()
    self.batch_shards = jax.device_count()
    self.devices_text = (
        f"the mesh's {_shape_text(self.sizes)} = "
        f'{jax.device_count()} device(s)'
    )
    self.fsdp = self.sizes['fsdp']
    self.replicated = NamedSharding(self.mesh, P())
    self.rows = NamedSharding(self.mesh, P(MESH_AXES))

  def sharding(self, shape) -> NamedSharding:
    return NamedSharding(self.mesh, partition_spec(shape, self.fsdp))

  def _put(self, x):
    if isinstance(x, jax.Array) and x.sharding == self.sharding(x.shape):
      return x  # e.g. restored from a checkpoint against this layout
    x = np.asarray(x)
    # Works with several processes too: each fills its own shards.
    return jax.make_array_from_callback(
        x.shape, self.sharding(x.shape), lambda index: x[index]
    )

  def place_state(self, state):
    return jax.tree.map(self._put, state)

  place_params = place_state

  def place_batch(self, batch: dict) -> dict:
    """This process's rows -> global arrays with rows over all devices."""
    return {
        k: jax.make_array_from_process_local_data(self.rows, v)
        for k, v in batch.items()
    }

  def fetch(self, x) -> np.ndarray:
    return (
        np.asarray(x.addressable_data(0))
        if hasattr(x, 'addressable_data')
        else np.asarray(x)
    )

  def checkpoint_state(self, state):
    """The sharded arrays themselves: orbax writes each process's shards."""
    return state

  def restore_target(self, host_state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            np.shape(x),
            np.asarray(x).dtype,
            sharding=self.sharding(np.shape(x)),
        ),
        host_state,
    )

  def compile_train_step(self, step_fn, state):
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        step_fn, out_shardings=(shardings, self.replicated), donate_argnums=(0,)
    )

  def compile_eval_step(self, eval_fn):
    return jax.jit(eval_fn, out_shardings=self.rows)

  def compile_eval_totals(self, totals_fn):
    return jax.jit(totals_fn, out_shardings=self.replicated)

  def place_totals(self, totals):
    return jax.device_put(totals, self.replicated)

  @staticmethod
  def sum_over_devices(x):
    return x  # the step already sees the global batch

  def gather_rows(self, x):
    """The global rows replicated, so that sums over them are computed
    alike on any mesh."""
    return jax.lax.with_sharding_constraint(x, self.replicated)

  def describe(self, state) -> str:
    params = jax.tree.leaves(state.params)
    sharded = [p for p in params if 'fsdp' in p.sharding.spec]
    full = sum(x.nbytes for x in jax.tree.leaves(state))
    return (
        f'layout: mesh {_shape_text(self.sizes)} over '
        f'{jax.device_count()} device(s); {len(sharded)} of {len(params)}'
        f' parameter arrays sharded over fsdp '
        f'({sum(p.size for p in sharded)} of '
        f'{sum(p.size for p in params)} values), '
        f'{len(params) - len(sharded)} replicated; train state '
        f'{_mib(_per_device_bytes(state))} per device '
        f'(replicated: {_mib(full)})'
    )


def make_layout(config):
  """The layout `config.parallelism` names."""
  parallelism = config.parallelism
  if parallelism == 'pmap':
    return PmapLayout()
  if parallelism == 'mesh':
    return MeshLayout(config.mesh)
  raise ValueError(
      f'config.parallelism={parallelism!r}: use one of '
      f'{", ".join(PARALLELISMS)}'
  )
