"""Plan a run's memory per device before it runs: the real train step,
compiled ahead of time for N virtual devices, with no weights.

  python -m tuning.plan --config=experiments/plan_llama.py:llama-3.1-8b,lora \\
      --devices=8 [--mesh=data=1,fsdp=8] [--device_memory=v5e] \\
      [--config.training.batch_size=16 ...]

What it does:
  1. sets XLA_FLAGS=--xla_force_host_platform_device_count=N (and the CPU
     platform) before JAX starts, so that N CPU devices stand in for the
     accelerators;
  2. builds the model and the train state abstractly (`jax.eval_shape`:
     shapes and dtypes, nothing allocated, no weights read). A causal_lm
     decoder's shapes come from its `model.hf_config` config.json, and no
     data is read (the batch is `training.batch_size` rows of
     `data.max_length` tokens); other tasks read their data once, for the
     batch's columns and the model's input sizes;
  3. lays the state out on the run's mesh (`config.mesh`, or --mesh;
     the planner always plans the mesh layout, tuning/engine/layouts.py:
     pmap replicates the state, as a mesh with fsdp=1 does) and AOT-compiles
     the project's own train step (`train_step_fn`, compiled by the
     layout) with `.lower(...).compile()`, in the form GPU and TPU run
     (tuning/platform/backend.py's `plain()`: none of the XLA:CPU
     workarounds);
  4. prints per device: parameters, optimizer state (and EMA), the batch,
     the temporaries (gradients and activations: the compiled program's
     memory analysis), the total, whether it fits --device_memory
     (v5e 16 GiB, v5p 95 GiB, v6e 32 GiB, h100 80 GiB, h200 141 GiB, or
     a size such as 24GiB), and the largest arrays: of the state, and
     among the values the program computes.

The figures are XLA:CPU's buffer assignment of the step. A TPU or GPU
compiler fuses and schedules differently (and may rematerialise under
memory pressure), so the temporaries there differ: an estimate for
choosing a mesh, batch and method, not a measurement on an accelerator.
The state's bytes per device are exact for the layout.

A Llama 3 config.json's `rope_scaling` (rope_type 'llama3') is dropped for
the plan, with a note: it changes the rotary frequencies, not any shape,
and the decoder family builds only the 'default' rotary embedding.

Bad input is one line: a mesh that does not multiply to --devices, a
device name it does not know, a config that cannot be built or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

from absl import flags

from tuning.cli import flags as cli_flags
from tuning.config import checks
from tuning.config import loading

PROG = 'python -m tuning.plan'
GIB = 2**30
# Memory per chip (GPU) or per TPU chip, in bytes.
DEVICE_MEMORY = {
    'v5e': 16 * GIB,
    'v5p': 95 * GIB,
    'v6e': 32 * GIB,
    'h100': 80 * GIB,
    'h200': 141 * GIB,
}
_UNITS = {
    'b': 1,
    'kb': 10**3,
    'mb': 10**6,
    'gb': 10**9,
    'tb': 10**12,
    'kib': 2**10,
    'mib': 2**20,
    'gib': 2**30,
    'tib': 2**40,
}
LARGEST = 6  # arrays listed in each "largest" table


class PlanError(ValueError):
  """A command line or config the planner cannot plan, worded for the user."""


def device_memory(text: str) -> tuple[str, int]:
  """(its name, bytes) of --device_memory: a device of DEVICE_MEMORY or a
  size such as 16GiB, 80GB, 24g."""
  name = text.strip().lower()
  if name in DEVICE_MEMORY:
    return name, DEVICE_MEMORY[name]
  match = re.fullmatch(r'([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)', name)
  if match and match.group(2):
    unit = match.group(2)
    if not unit.endswith('b'):
      unit += 'ib'  # 16g = 16GiB
    if unit in _UNITS:
      size = int(float(match.group(1)) * _UNITS[unit])
      if size > 0:
        return text.strip(), size
  raise PlanError(
      f'--device_memory={text!r}: unknown device; use one of '
      f'{", ".join(DEVICE_MEMORY)} or a size such as 16GiB'
  )


def mesh_sizes(text: str, devices: int) -> dict[str, int]:
  """--mesh=data=2,fsdp=4 (or 2,4: the sizes in config.mesh's axis order)
  as {axis: size}, checked to multiply to `devices` (-1 = the rest)."""
  from tuning.engine import layouts  # pylint: disable=g-import-not-at-top

  axes = layouts.MESH_AXES
  parts = [p.strip() for p in text.split(',') if p.strip()]
  sizes = {}
  for i, part in enumerate(parts):
    axis, _, value = part.rpartition('=')
    axis = axis.strip() or (axes[i] if i < len(axes) else '')
    if axis not in axes:
      raise PlanError(
          f'--mesh={text}: unknown axis {axis or part!r}; the mesh axes are '
          f'{", ".join(axes)} (e.g. --mesh={axes[0]}=1,{axes[-1]}={devices})'
      )
    try:
      sizes[axis] = int(value)
    except ValueError:
      raise PlanError(
          f'--mesh={text}: {value!r} is not a whole number of devices'
      ) from None
  full = {a: sizes.get(a, 1) for a in axes}
  try:
    return layouts.mesh_shape(full, devices)
  except ValueError as e:
    raise PlanError(
        f'--mesh={text}: {str(e).removeprefix("config.mesh: ")} '
        f'(--devices={devices})'
    ) from None


def define_flags(flag_values: flags.FlagValues):
  flags.DEFINE_string(
      'config',
      None,
      'Experiment config file, optionally :arg; --config.a.b=value '
      'overrides a field, as main.py takes them.',
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      'devices',
      8,
      'How many devices to plan for (virtual CPU devices stand in).',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'mesh',
      None,
      'Mesh axis sizes, e.g. data=1,fsdp=8 (-1 = the rest; default: the '
      "config's config.mesh).",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'device_memory',
      'v5e',
      f'One device\'s memory: {" | ".join(DEVICE_MEMORY)} or a size '
      '(16GiB).',
      flag_values=flag_values,
  )
  flags.mark_flag_as_required('config', flag_values=flag_values)


def _start_virtual_devices(devices: int):
  """N CPU devices, set before JAX's backend starts."""
  if devices < 1:
    raise PlanError(f'--devices={devices}: use 1 or more')
  tokens = [
      t
      for t in os.environ.get('XLA_FLAGS', '').split()
      if not t.startswith('--xla_force_host_platform_device_count')
  ]
  tokens.append(f'--xla_force_host_platform_device_count={devices}')
  os.environ['XLA_FLAGS'] = ' '.join(tokens)
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_platforms', 'cpu')
  if jax.device_count() != devices:
    raise PlanError(
        f'JAX started before the planner set {devices} devices (it has '
        f'{jax.device_count()}): run {PROG} in a process of its own'
    )


# ------------------------------------------------------------ the config


def _plannable_hf_config(config, notes: list[str]):
  """config.model.hf_config without a rope scaling the decoder family
  cannot build (a copy in a temporary folder, noted): the shapes do not
  depend on it."""
  source = config.model.get('hf_config')
  if not source or config.model.name not in ('llama', 'decoder', 'gpt2'):
    return
  from tuning.models import hf_config as hf_config_lib  # pylint: disable=g-import-not-at-top

  hf = hf_config_lib.read_hf_config(source)
  rope = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type == 'default':
    return
  hf = dict(hf, rope_scaling=None)
  if 'rope_parameters' in hf:
    theta = hf['rope_parameters'].get('rope_theta', hf.get('rope_theta'))
    hf['rope_parameters'] = {'rope_type': 'default', 'rope_theta': theta}
  folder = tempfile.mkdtemp(prefix='tuning-plan-')
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf, f)
  config.model.hf_config = folder
  notes.append(
      f'note: rope_type={rope_type!r} dropped for the plan (it changes '
      'the rotary frequencies, not any shape; the decoder family builds '
      "only 'default')"
  )


def load_config(config_args: list[str], mesh_text, devices: int, notes):
  """The experiment config with its overrides, set to plan the mesh."""
  spec = next(
      (a.split('=', 1)[1] for a in config_args if a.startswith('--config=')),
      None,
  )
  if not spec:
    raise cli_flags.UsageError(
        '--config is required (--config=experiments/<name>.py[:arg])'
    )
  config = loading.parse_config_flags([PROG] + config_args, spec)
  config = config.copy_and_resolve_references()
  checks.check(config)
  if config.parallelism != 'mesh':
    notes.append(
        f'note: config.parallelism={config.parallelism!r} planned as the '
        'mesh layout (pmap replicates the state, as fsdp=1 does)'
    )
  config.parallelism = 'mesh'
  if mesh_text:
    for axis, size in mesh_sizes(mesh_text, devices).items():
      config.mesh[axis] = size
  else:
    from tuning.engine import layouts  # pylint: disable=g-import-not-at-top

    try:
      layouts.mesh_shape(config.mesh, devices)
    except ValueError as e:
      raise PlanError(f'{e} (--devices={devices}; or give --mesh)') from None
  _plannable_hf_config(config, notes)
  return config


# ------------------------------------------------------------ the plan


@dataclasses.dataclass
class Plan:
  """What one compiled step needs on each device (bytes)."""

  devices: int
  mesh: dict[str, int]
  batch_rows: int
  batch_length: int | None
  parameters: int  # values, all devices together
  trained_parameters: int
  params_bytes: int  # per device, below likewise
  optimizer_bytes: int
  ema_bytes: int
  other_state_bytes: int
  batch_bytes: int
  temp_bytes: int
  output_bytes: int  # outputs not written over donated inputs
  code_bytes: int
  compile_s: float
  largest_state: list[tuple[str, tuple, str, str, int]]
  largest_values: list[tuple[str, str, int]]

  @property
  def total_bytes(self) -> int:
    return (
        self.params_bytes
        + self.optimizer_bytes
        + self.ema_bytes
        + self.other_state_bytes
        + self.batch_bytes
        + self.temp_bytes
        + self.output_bytes
    )


def _shard_bytes(sds) -> int:
  shape = sds.sharding.shard_shape(sds.shape)
  return math.prod(shape) * sds.dtype.itemsize


def _path_name(path) -> str:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.tree_util.keystr(path, simple=True, separator='/')


def _abstract_batch(config, task, layout):
  """The train batch's columns as ShapeDtypeStructs, rows over devices, and
  the data it came from (None: a causal_lm batch needs no data)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = config.training.batch_size
  if config.task == 'causal_lm':
    length = config.data.max_length
    columns = {
        'input_ids': ((rows, length), np.int32),
        'attention_mask': ((rows, length), np.int32),
        'index': ((rows,), np.int32),
    }
  else:
    example = task.data.first_train_example()
    columns = {
        k: ((rows,) + np.shape(v)[1:], np.asarray(v).dtype)
        for k, v in example.items()
    }
    columns['index'] = ((rows,), np.int32)
  return {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=layout.rows)
      for k, (shape, dtype) in columns.items()
  }


def _task(config):
  from tuning.tasks.registry import task_class  # pylint: disable=g-import-not-at-top

  kind = task_class(config.task)
  if config.task == 'causal_lm':
    return kind(config, None)
  from tuning.data import datasets  # pylint: disable=g-import-not-at-top

  build_data = getattr(kind, 'build_data', None)
  data = (
      build_data(config, tempfile.mkdtemp(prefix='tuning-plan-'))
      if build_data
      else datasets.build_datasets(
          config.data, labels=kind.labels, append_eos=kind.append_eos
      )
  )
  return kind(config, data)


def make_plan(config, devices: int) -> Plan:
  """Builds the state abstractly and compiles the train step for the
  config's mesh of `devices` virtual devices."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from tuning.config.durations import resolve_steps  # pylint: disable=g-import-not-at-top
  from tuning.engine import layouts  # pylint: disable=g-import-not-at-top
  from tuning.engine import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  from tuning.methods import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from tuning.methods import optimizers  # pylint: disable=g-import-not-at-top
  from tuning.methods.naming import naming_rules  # pylint: disable=g-import-not-at-top
  from tuning.models.registry import build_model  # pylint: disable=g-import-not-at-top
  from tuning.multirun import distillation  # pylint: disable=g-import-not-at-top
  from tuning.platform import backend  # pylint: disable=g-import-not-at-top

  if distillation.enabled(config.distill):
    raise PlanError(
        'config.distill.teacher is set: the planner plans a run without a '
        'distillation teacher (unset it to plan the student alone)'
    )
  layout = layouts.make_layout(config)
  batch_rows = config.training.batch_size
  accumulation = config.training.accumulation_steps
  if batch_rows % (devices * accumulation):
    raise PlanError(
        f'config.training.batch_size={batch_rows} must be divisible by '
        f'{devices} devices x config.training.accumulation_steps='
        f'{accumulation}'
    )
  task = _task(config)
  model = build_model(config.model, config.dtype, **task.model_dims())
  naming = naming_rules(config)
  lora = config.lora if lora_lib.enabled(config.lora) else None
  if lora:
    model = lora_lib.LoraModel(model, lora, naming=naming)
  batch = _abstract_batch(config, task, layout)
  inputs_of = task.inputs or train_step_lib.features_of
  example = {
      k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype)
      for k, v in inputs_of(batch).items()
  }
  params = jax.eval_shape(
      lambda k, x: model.init({'params': k}, **x, train=False)['params'],
      jax.random.key(config.seed),
      example,
  )
  # The schedule's length changes no shape; without data, an epoch is a step.
  total = resolve_steps(config.training, 'total', 1.0) or 1
  warmup = resolve_steps(config.optimizer, 'warmup', 1.0, default=0)
  tx, schedule = optimizers.build_optimizer(
      config.optimizer, params, total, warmup, lora, naming=naming
  )
  trainable = optimizers.trainable_mask(
      params, config.optimizer, lora, naming=naming
  )
  state = jax.eval_shape(
      lambda p: train_step_lib.initial_state(
          p,
          tx,
          ema=False,
          count_skipped=config.training.on_nonfinite == 'skip',
      ),
      params,
  )
  if config.training.ema_decay is not None:
    state = state.replace(ema_params=params)
  state = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(
          s.shape, s.dtype, sharding=layout.sharding(s.shape)
      ),
      state,
  )
  step_fn = train_step_lib.train_step_fn(
      model,
      tx,
      schedule,
      config,
      task=task,
      layout=layout,
      trainable=trainable,
  )
  start = time.time()
  with backend.plain():  # what GPU and TPU compile
    compiled = (
        layout.compile_train_step(step_fn, state).lower(state, batch).compile()
    )
  compile_s = time.time() - start
  memory = compiled.memory_analysis()

  def tree_bytes(tree) -> int:
    return sum(_shard_bytes(s) for s in jax.tree.leaves(tree))

  flat_trainable = flax.traverse_util.flatten_dict(trainable)
  state_bytes = tree_bytes(state)
  params_bytes = tree_bytes(state.params)
  optimizer_bytes = tree_bytes(state.opt_state)
  ema_bytes = tree_bytes(state.ema_params)
  largest_state = sorted(
      (
          (
              _path_name(path),
              s.shape,
              str(s.dtype),
              str(tuple(s.sharding.spec)),
              _shard_bytes(s),
          )
          for path, s in jax.tree_util.tree_flatten_with_path(state)[0]
      ),
      key=lambda row: -row[4],
  )[:LARGEST]
  return Plan(
      devices=devices,
      mesh=dict(layout.sizes),
      batch_rows=batch_rows,
      batch_length=(
          config.data.max_length if config.task == 'causal_lm' else None
      ),
      parameters=sum(math.prod(s.shape) for s in jax.tree.leaves(params)),
      trained_parameters=sum(
          math.prod(s.shape)
          for k, s in flax.traverse_util.flatten_dict(params).items()
          if flat_trainable[k]
      ),
      params_bytes=params_bytes,
      optimizer_bytes=optimizer_bytes,
      ema_bytes=ema_bytes,
      other_state_bytes=state_bytes
      - params_bytes
      - optimizer_bytes
      - ema_bytes,
      batch_bytes=tree_bytes(batch),
      temp_bytes=int(memory.temp_size_in_bytes),
      output_bytes=max(
          0, int(memory.output_size_in_bytes - memory.alias_size_in_bytes)
      ),
      code_bytes=int(memory.generated_code_size_in_bytes),
      compile_s=compile_s,
      largest_state=largest_state,
      largest_values=largest_values(compiled.as_text()),
  )


# ------------------------------------------------------------ HLO values

_SHAPE = re.compile(
    r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)' r'\[([0-9,]*)\]'
)
_BITS = {
    'pred': 8,
    's8': 8,
    'u8': 8,
    's16': 16,
    'u16': 16,
    'f16': 16,
    'bf16': 16,
    's32': 32,
    'u32': 32,
    'f32': 32,
    's64': 64,
    'u64': 64,
    'f64': 64,
}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
# Ops whose result is another value's buffer (or the step's inputs).
_NOT_NEW = (
    'parameter(',
    'get-tuple-element(',
    'tuple(',
    'bitcast(',
    'constant(',
)


def largest_values(hlo_text: str, count: int = LARGEST):
  """The largest values the compiled (per-device) program computes: [(op,
  shape, bytes)], outside fused computations (whose values live in
  registers or their fusion's output), by the JAX operation that made
  them. Not all are alive at once: the peak is the memory analysis's."""
  fused = set(re.findall(r'calls=%?([\w.\-]+)', hlo_text))
  found = {}
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and '=' not in line.split('{')[0]:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match or computation in fused:
      continue
    name, rest = match.groups()
    head = rest.split(' metadata=')[0]
    shapes_text = head.split('(')[0] if not head.startswith('(') else head
    op = re.search(r'\}?\s*([\w\-]+)\(', head)
    if (
        any(k in head for k in _NOT_NEW)
        and op
        and op.group(1) + '(' in _NOT_NEW
    ):
      continue
    total = 0
    for dtype, dims in _SHAPE.findall(shapes_text):
      size = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
      total += size * _BITS[dtype] // 8
    if not total:
      continue
    source = re.search(r'op_name="([^"]+)"', rest)
    what = source.group(1) if source else name
    what = re.sub(r'^jit\([^)]*\)/', '', what)
    shape = ' '.join(f'{d}[{s}]' for d, s in _SHAPE.findall(shapes_text)[:2])
    key = (what, shape)
    found[key] = max(found.get(key, 0), total)
  ranked = sorted(found.items(), key=lambda kv: -kv[1])[:count]
  return [(what, shape, size) for (what, shape), size in ranked]


# ------------------------------------------------------------ the table


def gib(nbytes: float) -> str:
  return f'{nbytes / GIB:.2f} GiB'


def _size(nbytes: float) -> str:
  if nbytes >= GIB:
    return gib(nbytes)
  if nbytes >= 2**20:
    return f'{nbytes / 2**20:.1f} MiB'
  return f'{nbytes / 2**10:.1f} KiB'


def format_plan(plan: Plan, memory_name: str, memory_bytes: int) -> list[str]:
  """The printed plan, one line each."""
  mesh = ' x '.join(f'{a}={s}' for a, s in plan.mesh.items())
  length = f' x {plan.batch_length} tokens' if plan.batch_length else ''
  fits = plan.total_bytes <= memory_bytes
  rows = [
      ('parameters', plan.params_bytes),
      ('optimizer state', plan.optimizer_bytes),
  ]
  if plan.ema_bytes:
    rows.append(('EMA parameters', plan.ema_bytes))
  if plan.other_state_bytes:
    rows.append(('other state', plan.other_state_bytes))
  rows += [
      ('batch', plan.batch_bytes),
      ('gradients, activations (temporaries)', plan.temp_bytes),
  ]
  if plan.output_bytes:
    rows.append(('outputs (metrics)', plan.output_bytes))
  lines = [
      f'plan: {plan.devices} devices, mesh {mesh}; global batch '
      f'{plan.batch_rows} rows{length}; {plan.parameters:,} parameters '
      f'({plan.trained_parameters:,} trained); compiled in '
      f'{plan.compile_s:.1f} s',
      'per device:',
  ]
  width = max(len(name) for name, _ in rows)
  for name, nbytes in rows:
    lines.append(f'  {name:<{width}}  {nbytes:>16,} B  {gib(nbytes):>11}')
  lines.append(
      f'  {"total":<{width}}  {plan.total_bytes:>16,} B  '
      f'{gib(plan.total_bytes):>11}'
  )
  lines.append(
      f'fits {memory_name} ({gib(memory_bytes)} per device): '
      f'{"yes" if fits else "no"} '
      f'({100 * plan.total_bytes / memory_bytes:.0f}% of it)'
  )
  lines.append('largest state arrays per device:')
  for name, shape, dtype, spec, nbytes in plan.largest_state:
    lines.append(
        f'  {_size(nbytes):>10}  {name}  {dtype}{list(shape)}  sharded {spec}'
    )
  lines.append(
      'largest values the step computes per device (not all alive at once):'
  )
  for what, shape, nbytes in plan.largest_values:
    lines.append(f'  {_size(nbytes):>10}  {shape}  {what}')
  lines.append(
      "(XLA:CPU's buffer assignment of the step GPU and TPU run; their "
      'compilers schedule temporaries differently: an estimate)'
  )
  return lines


# ------------------------------------------------------------ the command


def _split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(the --config and --config.* arguments, the others)."""
  config_args, rest = [], []
  for arg in argv:
    is_config = arg.startswith(('--config=', '--config.', '--noconfig.'))
    (config_args if is_config else rest).append(arg)
  return config_args, rest


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  config_args, rest = _split_config_args(argv)
  # --config stays a flag for --help and the required check.
  rest += [a for a in config_args if a.startswith('--config=')]

  def plan_command(flag_values, positional):
    cli_flags.no_positional(positional)
    memory_name, memory_bytes = device_memory(flag_values.device_memory)
    devices = flag_values.devices
    _start_virtual_devices(devices)
    notes = []
    try:
      config = load_config(config_args, flag_values.mesh, devices, notes)
      for note in notes:
        print(note, flush=True)
      plan = make_plan(config, devices)
    except (
        PlanError,
        cli_flags.UsageError,
        loading.ConfigError,
        checks.ConfigValueError,
    ):
      raise  # worded for the user already
    except Exception as e:  # pylint: disable=broad-except
      raise PlanError(
          f'the train step of {flag_values.config} does not build or '
          f'compile: {cli_flags.error_line(e)}'
      ) from e
    print('\n'.join(format_plan(plan, memory_name, memory_bytes)), flush=True)
    return 0

  return cli_flags.run(
      PROG,
      __doc__,
      define_flags,
      plan_command,
      argv=rest,
      usage_errors=(PlanError, loading.ConfigError, checks.ConfigValueError),
  )


if __name__ == '__main__':
  sys.exit(main())
