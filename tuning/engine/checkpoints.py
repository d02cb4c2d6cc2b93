"""Checkpoints: the run's own (resume) and pretrained parameters (init).

A run's checkpoints live in `WORKDIR/checkpoints`, written by an orbax
`CheckpointManager` with two items per step: `state` (step, params,
optimizer state) and `data` (the grain iterator state), so that a resumed
run continues with exactly the next batch. The latest checkpoint and the
best one by a validation metric are kept.

Pretrained parameters are restored against an explicit target: every
parameter of the model must be found with the same shape, except those
matching `init.reinit` regexes, which keep their fresh initialisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from tuning.terminal import console
from tuning.methods.optimizers import parameter_paths
from tuning.tasks.registry import task_class


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, worded for the user."""


class RunCheckpoints:
  """The orbax CheckpointManager of one run's work directory."""

  def __init__(
      self,
      directory: str,
      best_metric: str | None = None,
      best_mode: str | None = None,
      read_only: bool = False,
      keep: int = 1,
  ):
    """`best_metric`/`best_mode` None: the run's (its config.json beside
    `directory`: `checkpoint.best_metric`, else its task's default).
    `keep`: how many of the latest checkpoints are kept (besides the best
    one)."""
    if best_metric is None or best_mode is None:
      rule = _best_rule(os.path.dirname(os.path.abspath(directory)))
      best_metric, best_mode = best_metric or rule[0], best_mode or rule[1]
    if best_mode not in ('max', 'min'):
      raise ValueError(
          f"config.checkpoint.best_mode={best_mode!r}: use 'max'" " or 'min'"
      )
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    metric = lambda metrics: metrics[best_metric]  # pylint: disable=unnecessary-lambda-assignment
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(max(int(keep), 1)),
            checkpoint_managers.BestN(
                get_metric_fn=metric,
                n=1,
                reverse=best_mode == 'min',
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        best_fn=metric,
        best_mode=best_mode,
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data')
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state, data_state: dict, metrics=None):
    """Saves asynchronously; `wait()` before reading or exiting."""
    self.wait()  # orbax would wait too; then the previous one is sealed
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
        ),
        metrics=metrics,
        force=True,
    )

  def restore(self, step: int, target_state):
    """Returns (state, data_state) restored against `target_state`."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state),
            data=ocp.args.JsonRestore(),
        ),
    )
    treedef = jax.tree.structure(target_state)
    state = jax.tree.unflatten(treedef, jax.tree.leaves(restored.state))
    return state, restored.data

  def wait(self):
    """Waits for the saves in flight; seals (checksums) the finished ones."""
    self.manager.wait_until_finished()
    if jax.process_index() == 0 and not self.read_only:
      for step in self.manager.all_steps():
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(step_dir, CHECKSUMS)):
          seal(step_dir)

  def restore_verified(self, target_state):
    """(step, state, data_state) of the newest checkpoint that reads.

    Each is verified (checksums, else a finite restore); an unreadable one
    is moved aside to `<step>.corrupt-<time>` (never deleted), saying which
    and why, and the next newest is tried. (None, None, None) when none
    reads. Parameters of other shapes are the user's error, not corruption.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      step_dir = os.path.join(self.directory, str(step))
      problem = verify(step_dir)
      if problem is None:
        _check_same_parameters(step_dir, target_state)
        try:
          state, data_state = self.restore(step, target_state)
        except Exception as e:  # pylint: disable=broad-except
          problem = _short(f'it does not restore: {type(e).__name__}: {e}')
        else:
          if os.path.exists(os.path.join(step_dir, CHECKSUMS)) or all(
              bool(jax.numpy.isfinite(x).all())
              for x in jax.tree.leaves(state)
              if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)
          ):
            return step, state, data_state
          problem = 'it holds non-finite values (unsealed, corrupt data)'
      self.move_aside(step, problem)
    if self.manager.all_steps() == [] and _moved_any(self.directory):
      console.info(
          f'checkpoint: no checkpoint in {self.directory} reads; '
          'starting from the beginning'
      )
    return None, None, None

  def verified_step(self, which: str):
    """The `best`/`latest` step whose files match their checksums (bad
    ones are moved aside, saying so); `which` itself when there is none."""
    while True:
      step = (
          self.best_step() if which == 'best' else None
      ) or self.latest_step()
      if step is None:
        return which
      problem = verify(os.path.join(self.directory, str(step)))
      if problem is None:
        return step
      self.move_aside(step, problem)

  def move_aside(self, step: int, problem: str) -> str:
    """Renames checkpoints/<step> to <step>.corrupt-<time>; says so."""
    source = os.path.join(self.directory, str(step))
    target = f'{source}.corrupt-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f'move aside {step}')
    self.manager.reload()
    console.info(
        f'checkpoint: step {step} in {self.directory} cannot be '
        f'used ({problem}); moved it to {target} (kept, not '
        'deleted); falling back to the newest checkpoint that reads'
    )
    return target

  def close(self):
    self.manager.close()


CHECKSUMS = 'checksums.json'


def _short(text: str, limit: int = 300) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit] + '...'


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def _file_digests(step_dir: str) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file under a step dir."""
  digests = {}
  for root, _, files in os.walk(step_dir):
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel.startswith(CHECKSUMS):  # itself, or its .tmp being written
        continue
      digests[rel] = [os.path.getsize(path), _sha256(path)]
  return digests


def seal(step_dir: str):
  """Writes `<step_dir>/checksums.json` (sizes and sha256 of its files)."""
  path = os.path.join(step_dir, CHECKSUMS)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(_file_digests(step_dir), f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.tmp', path)


def verify(step_dir: str) -> str | None:
  """What is wrong with a step's files (None: they match, or unsealed)."""
  path = os.path.join(step_dir, CHECKSUMS)
  try:
    with open(path, encoding='utf-8') as f:
      expected = json.load(f)
  except (OSError, ValueError):
    return None  # not sealed (an older run, or killed before sealing)
  for rel, (size, digest) in sorted(expected.items()):
    file = os.path.join(step_dir, rel)
    if not os.path.exists(file):
      return f'its file {rel} is missing'
    if os.path.getsize(file) != size:
      return (
          f'its file {rel} has {os.path.getsize(file)} bytes, '
          f'{size} were written'
      )
    if _sha256(file) != digest:
      return f'its file {rel} does not match its checksum (corrupt bytes)'
  return None


def _moved_any(directory: str) -> bool:
  return any('.corrupt-' in name for name in os.listdir(directory))


def _check_same_parameters(step_dir: str, target_state):
  """A resumed checkpoint must hold this model's parameters, same shapes."""
  try:
    saved, _ = _saved_shapes(os.path.join(step_dir, 'state'))
  except Exception:  # pylint: disable=broad-except
    return  # unreadable metadata: the restore says so
  params = getattr(target_state, 'params', None)
  if params is None:
    return
  wanted = {
      k: tuple(v.shape)
      for k, v in flax.traverse_util.flatten_dict(
          flax.core.unfreeze(params), sep='/'
      ).items()
  }
  problems = [
      f'{p}: checkpoint has {saved.get(p, "nothing")}, model wants ' f'{shape}'
      for p, shape in wanted.items()
      if saved.get(p) != shape
  ]
  problems += [
      f'{p}: in the checkpoint, not in the model'
      for p in saved
      if p not in wanted
  ]
  if problems:
    raise CheckpointError(
        f"the checkpoint {step_dir} (this --workdir's, to resume) was written"
        ' by another model: '
        + '; '.join(problems[:6])
        + (f'; and {len(problems) - 6} more' if len(problems) > 6 else '')
        + ' (rerun with the settings that wrote it, or use a new --workdir '
        'for this model)'
    )


def _best_rule(workdir: str) -> tuple[str, str]:
  """(metric, mode) that chose the best checkpoint of the run in
  `workdir`, from its config.json (classification's when there is none)."""
  task, metric, mode = 'classification', None, None
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      try:
        config = json.load(f)
      except json.JSONDecodeError:
        config = {}
    task = config.get('task') or task
    metric = (config.get('checkpoint') or {}).get('best_metric')
    mode = (config.get('checkpoint') or {}).get('best_mode')
  default = task_class(task)
  return metric or default.best_metric, mode or default.best_mode


def run_checkpoint_dir(path: str) -> str | None:
  """The CheckpointManager folder of a run directory (or the folder itself)."""
  for candidate in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(candidate) and any(
        name.isdigit() for name in os.listdir(candidate)
    ):
      return candidate
  return None


def is_hugging_face_source(path: str) -> bool:
  """A Hugging Face model folder (safetensors) or a hub id like org/name."""
  if os.path.isdir(path):
    return (
        os.path.exists(os.path.join(path, 'config.json'))
        and not os.path.exists(os.path.join(path, 'params'))
        and run_checkpoint_dir(path) is None
    )
  return re.fullmatch(r'[\w.-]+/[\w.-]+', path) is not None


def resolve_init_source(path: str, cache_dir: str) -> str:
  """Converts a Hugging Face source or a .gguf file once (cached in
  `cache_dir`); other paths are returned as they are."""
  if str(path).lower().endswith('.gguf'):
    from tuning.formats import gguf as gguf_checkpoint  # pylint: disable=g-import-not-at-top

    return gguf_checkpoint.ensure_converted(path, cache_dir)
  if not is_hugging_face_source(path):
    return path
  from tuning.formats import huggingface as hf_convert  # pylint: disable=g-import-not-at-top

  return hf_convert.ensure_converted(path, cache_dir)


def _params_checkpoint_path(path: str, step) -> str:
  """Finds the orbax tree that holds a checkpoint's parameters."""
  path = os.path.abspath(path)  # orbax reads no metadata from relative paths
  if not os.path.exists(path):
    raise CheckpointError(
        f'init checkpoint not found: {path} (check ' 'config.init.checkpoint)'
    )
  manager_dir = run_checkpoint_dir(path)
  if manager_dir is not None:
    checkpoints = RunCheckpoints(manager_dir, read_only=True)
    if step in ('best', 'latest'):
      chosen = (
          checkpoints.best_step() if step == 'best' else None
      ) or checkpoints.latest_step()
    else:
      chosen = int(step)
    if chosen is None or not os.path.isdir(
        os.path.join(manager_dir, str(chosen))
    ):
      steps = ', '.join(str(s) for s in checkpoints.manager.all_steps())
      raise CheckpointError(
          f'no checkpoint step {step} in {manager_dir} '
          f'(steps there: {steps or "none"}; set '
          'config.init.step)'
      )
    problem = verify(os.path.join(manager_dir, str(chosen)))
    if problem is not None:
      steps = ', '.join(str(s) for s in checkpoints.manager.all_steps())
      raise CheckpointError(
          f'checkpoint {os.path.join(manager_dir, str(chosen))} is corrupt '
          f'({problem}): choose another step with config.init.step (steps '
          f'there: {steps})'
      )
    return os.path.join(manager_dir, str(chosen), 'state')
  for candidate in (os.path.join(path, 'params'), path):
    if os.path.exists(os.path.join(candidate, '_METADATA')):
      return candidate
  raise CheckpointError(
      f'{path} holds no orbax checkpoint (expected a run '
      'work directory, its checkpoints/ folder, or a '
      'converted model with params/)'
  )


def _saved_shapes(tree_path: str) -> tuple[dict[str, tuple], bool]:
  """{path: shape} of the saved parameters, and whether they sit under
  a 'params' key (a run's state) or at the top (a params-only tree)."""
  metadata = ocp.PyTreeCheckpointer().metadata(tree_path)
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  nested = isinstance(tree, dict) and 'params' in tree and 'opt_state' in tree
  if nested:
    tree = tree['params']
  flat = flax.traverse_util.flatten_dict(dict(tree), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}, nested


def load_pretrained_params(path: str, target_params, reinit=(), step='best'):
  """Returns (params, report) with params restored against the target.

  Raises CheckpointError listing every parameter that is missing from the
  checkpoint or has another shape, unless it matches a `reinit` regex.
  """
  tree_path = _params_checkpoint_path(path, step)
  try:
    saved, nested = _saved_shapes(tree_path)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'cannot read the checkpoint {tree_path} '
        f'({_short(f"{type(e).__name__}: {e}")}): it is '
        'corrupt or not an orbax checkpoint; point '
        'config.init.checkpoint at another'
    ) from None
  wanted = parameter_paths(target_params)
  patterns = [re.compile(r) for r in reinit]
  reinitialised = [p for p in wanted if any(r.fullmatch(p) for r in patterns)]
  problems = []
  for p, shape in wanted.items():
    if p in reinitialised:
      continue
    if p not in saved:
      problems.append(
          f'{p}: missing from the checkpoint (model wants ' f'{shape})'
      )
    elif saved[p] != shape:
      problems.append(f'{p}: checkpoint has {saved[p]}, model wants {shape}')
  if problems:
    raise CheckpointError(
        f'cannot load {path}: '
        + '; '.join(problems)
        + ' (add a regex for these parameters to config.init.reinit to '
        'initialise them afresh, or fix config.model)'
    )
  flat_target = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(target_params), sep='/'
  )
  to_load = {
      p: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
      for p, v in flat_target.items()
      if p not in reinitialised
  }
  item = flax.traverse_util.unflatten_dict(to_load, sep='/')
  if nested:
    item = {'params': item}
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        tree_path,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'cannot read the checkpoint {tree_path} '
        f'({_short(f"{type(e).__name__}: {e}")}): its '
        'files are corrupt; use another checkpoint'
    ) from None
  if nested:
    restored = restored['params']
  flat_loaded = flax.traverse_util.flatten_dict(restored, sep='/')
  merged = {
      p: (np.asarray(flat_loaded[p]) if p in flat_loaded else v)
      for p, v in flat_target.items()
  }
  step_dir = os.path.basename(os.path.dirname(tree_path))
  report = {
      'source': tree_path,
      'step': int(step_dir) if step_dir.isdigit() else None,
      'loaded': sorted(flat_loaded),
      'reinitialised': sorted(reinitialised),
      'left_out': sorted(p for p in saved if p not in wanted),
  }
  return flax.traverse_util.unflatten_dict(merged, sep='/'), report
