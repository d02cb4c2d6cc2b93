"""The train and eval steps, for either layout of tuning/engine/layouts.py.

`train_step_fn` returns the step as a plain function; a layout compiles it
(`jax.pmap` with gradients averaged over devices, or `jax.jit` on a mesh
where the step sees the global batch). `make_train_step` and
`make_eval_step` are the pmapped versions.

Randomness is derived inside the step: the step key is
`fold_in(key(seed), step)` and each example's dropout masks fold in the
example's position in the *global* batch (tuning/models/dropout.py; the
model itself runs on the whole batch). So the dropout masks, and so the
results, do not depend on how many devices or hosts share the batch, nor
on how a device's batch is cut into micro-batches for gradient
accumulation (`dropout_keys='per_shard'` draws one mask for a device's
micro-batch instead). The bits come from `prng_impl` (tuning/engine/prng.py;
default 'hash').

One step of `make_train_step`:
- differentiates only the trainable parameters (frozen ones enter the loss
  under `stop_gradient` and get zero gradients, which their `set_to_zero`
  optimizer branch ignores);
- with `accumulation_steps` = k, cuts each device's batch into k
  micro-batches and sums their gradients in a `lax.scan`, then makes one
  optimizer update (schedules count optimizer steps);
- checks that the loss and gradients are finite: `on_nonfinite='skip'`
  keeps the previous parameters and optimizer state for that step (and
  counts it in `state.skipped`); 'stop' leaves the decision to the caller,
  which stops the run (the `nonfinite` metric is 1);
- updates an exponential moving average of the parameters when
  `ema_decay` is set (`state.ema_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tuning.config.checks import check_field
from tuning.data import augmentation
from tuning.data import triples
from tuning.engine import prng
from tuning.models import dropout
from tuning.platform import backend
from tuning.tasks import classification

AXIS = 'batch'
NON_FEATURES = (
    'label',
    'weight',
    'index',
    'labelled',
    'teacher_logits',
    *augmentation.MIX_COLUMNS,  # mixup/cutmix: the other label, lam
    triples.SOURCE_COLUMN,  # a triple's corruption slot: its true triple
)
TEACHER_PREFIX = 'teacher/'  # a distillation teacher's own input columns


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  # Exponential moving average of params (None unless ema_decay is set).
  ema_params: Any = None
  # Steps skipped for a non-finite loss or gradient (None unless 'skip').
  skipped: Any = None


def psum_over_devices(x):
  """`psum` over the pmap axis; the identity where there is one device
  in all, where XLA:CPU's one-participant all-reduce still copies its
  operand (39 ms of a 1.7 s SmolLM2 step, 8 ms of a 0.35 s MiniLM one)."""
  return x if jax.device_count() == 1 else jax.lax.psum(x, AXIS)


def with_device_axis(tree):
  """Each array of `tree` as a `[1, ...]` view (a free reshape).

  Under `pmap` every state array reaches XLA as its `[1, ...]` shard and
  leaves the same way, the step seeing it without that axis. An optimizer
  update computed without it ends in a reshape back to `[1, ...]`, and
  XLA:CPU then fuses the reshape into the new first moment and computes
  that moment a second time inside the parameter update; the donated
  state's old values are then read after their buffers are overwritten,
  so XLA copies every parameter and moment first. Measured on a 2-core
  EPYC (issue #14): AdamW over SmolLM2's 135M parameters took 443 ms with
  816 copies, and 242 ms with none on `[1, ...]` views, the time of the
  same update under `jit` with no device axis. The values agree to
  rounding (the fusions differ: a float32 ulp at most in tests). An
  XLA:CPU workaround: the pmapped step takes it on the CPU backend only
  (tuning/platform/backend.py; `PmapLayout.update_on_device_axis`).
  """
  return jax.tree.map(lambda x: x[None], tree)


def without_device_axis(tree):
  return jax.tree.map(lambda x: x[0], tree)


def features_of(batch: dict) -> dict:
  return {
      k: v
      for k, v in batch.items()
      if k not in NON_FEATURES and not k.startswith(TEACHER_PREFIX)
  }


def teacher_features_of(batch: dict) -> dict:
  return {
      k[len(TEACHER_PREFIX) :]: v
      for k, v in batch.items()
      if k.startswith(TEACHER_PREFIX)
  }


def micro_batches(batch: dict, count: int, shards: int = 1) -> dict:
  """[rows, ...] -> [count, rows / count, ...] for gradient accumulation.

  With `shards` > 1 (rows split over that many devices), micro-batch j takes
  the j-th part of every device's rows, so that cutting moves no data and
  the micro-batches equal pmap's (where each device cuts its own rows).
  """

  def cut(v):
    v = v.reshape((shards, count, -1) + v.shape[1:]).swapaxes(0, 1)
    return v.reshape((count, -1) + v.shape[3:])

  return {k: cut(v) for k, v in batch.items()}


def per_example_logits(model, params, features, index, rng, train: bool):
  """Applies `model` to the whole (micro-)batch; each example's dropout
  masks come from its own key, the module's key folded with the example's
  global index (tuning/models/dropout.py), so they do not depend on how the
  batch is split."""
  rngs = {'dropout': rng} if train else {}
  with dropout.per_example(index):
    return model.apply({'params': params}, **features, train=train, rngs=rngs)


def per_shard_logits(model, params, features, index, rng, train: bool):
  """Applies `model` to the whole (micro-)batch at once; its dropout key
  folds in the global index of its first row, so that every device and
  micro-batch draws other bits, but which bits an example gets depends on
  how the batch is split."""
  rngs = {'dropout': jax.random.fold_in(rng, index[0])} if train else {}
  return model.apply({'params': params}, **features, train=train, rngs=rngs)


DROPOUT_KEYS = {
    'per_example': per_example_logits,
    'per_shard': per_shard_logits,
}


def ema_decay_at(decay: float, step):
  """The EMA decay at `step`, warmed up as min(decay, (1 + t) / (10 + t))."""
  t = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def _ema_update(d):
  """One EMA update of a leaf, kept in its dtype; integer leaves (a frozen
  base's codes, tuning/methods/quantization.py) are kept as they are."""

  def update(e, p):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      return p
    new = d * e + (1.0 - d) * p
    return new if new.dtype == p.dtype else new.astype(p.dtype)

  return update


def _floating(tree):
  """The floating-point leaves of `tree` (a norm over integer codes would
  overflow); all of them in a float32 tree."""
  return [
      x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  ]


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """What the train step needs of a layout: `sum_over_devices` adds the
  gradients, sums and weights of all devices (`psum` under pmap; the
  identity under jit, where the step sees the global batch, its rows split
  over `batch_shards` devices), and `update_on_device_axis` (the pmapped
  step's on XLA:CPU, `backend.cpu_workarounds()`): the optimizer update,
  the EMA and the skip run on `[1, ...]` views of the state
  (`with_device_axis`). tuning/engine/layouts.py's layouts have the same
  three attributes. The default: a step jitted on one device."""

  sum_over_devices: Callable[[Any], Any] = lambda x: x
  batch_shards: int = 1
  update_on_device_axis: bool = False


def train_step_fn(
    model,
    tx,
    schedule,
    config,
    *,
    task=classification.Classification,
    layout=StepLayout(),
    trainable=None,
    loss_fn=None,
    teacher_model=None,
):
  """Returns the uncompiled `(state, batch) -> (state, metrics)`, or with
  a `teacher_model`, `(state, batch, teacher_params) -> ...`: the teacher's
  logits of the batch's `teacher/*` columns become its `teacher_logits`
  column (for a distillation `loss_fn`).

  `config` is the run's: the step reads `config.seed` and
  `config.training`'s accumulation_steps, on_nonfinite, ema_decay,
  prng_impl and dropout_keys (tuning/config/defaults.py).
  `training.prng_impl` names the dropout bits (tuning/engine/prng.py): the
  default 'hash' and 'threefry2x32' draw each example's bits from its own
  key alone, so that results do not depend on the device count; hash costs
  about a tenth of threefry's time (1% of a MiniLM step against 11%).
  'rbg' is not elementwise in the key (its bits then change with the
  device count) and was slower than threefry on MiniLM.
  `training.dropout_keys='per_shard'` draws a device's (micro-)batch's
  masks from one key (`per_shard_logits`) instead of one key per example:
  not independent of how the batch is split, and no faster since the model
  stopped running example by example.

  `task.loss(outputs, batch)` gives the task's (loss sum, {metric: sum})
  over a batch's rows and `task.loss_weight(batch)` what those sums are
  divided by (default: classification, a mean over examples); see
  tuning/tasks/base.py. `loss_fn` replaces `task.loss` (a distillation
  loss). The weight of the whole global batch is known before the model
  runs, so each micro-batch's gradient is that of its loss sum over it,
  and token-level losses weigh every token alike across micro-batches and
  devices. `task.inputs(batch)` picks the model's inputs (None: every
  column but labels, weights and indices). `layout`: a `StepLayout` or the
  run's layout. `trainable` is a tree of bools like the params (None: all
  train).
  """
  training = config.training
  for name in ('on_nonfinite', 'dropout_keys', 'accumulation_steps'):
    check_field(f'training.{name}', training[name])
  seed = config.seed
  accumulation_steps = training.accumulation_steps
  on_nonfinite = training.on_nonfinite
  ema_decay = training.ema_decay
  prng_impl = training.prng_impl
  logits_of = DROPOUT_KEYS[training.dropout_keys]
  loss_fn = loss_fn or task.loss
  loss_weight = task.loss_weight
  inputs_of = task.inputs or features_of
  sum_over_devices = layout.sum_over_devices
  batch_shards = layout.batch_shards
  update_on_device_axis = layout.update_on_device_axis
  flat_trainable = (
      None if trainable is None else flax.traverse_util.flatten_dict(trainable)
  )

  def step(state: TrainState, batch, teacher_params=None):
    if teacher_model is not None:
      batch = dict(
          batch,
          teacher_logits=jax.lax.stop_gradient(
              teacher_model.apply(
                  {'params': teacher_params},
                  **teacher_features_of(batch),
                  train=False,
              )
          ),
      )
    rng = jax.random.fold_in(
        jax.random.key(seed, impl=prng.impl(prng_impl)), state.step
    )
    flat = flax.traverse_util.flatten_dict(state.params)
    trains = {
        k: flat_trainable is None or bool(flat_trainable[k]) for k in flat
    }
    frozen = {
        k: jax.lax.stop_gradient(v) for k, v in flat.items() if not trains[k]
    }
    trained = {k: v for k, v in flat.items() if trains[k]}

    # Every sum is divided by the weight of the whole global batch.
    total_weight = sum_over_devices(loss_weight(batch))

    def objective(trained_params, micro):
      params = flax.traverse_util.unflatten_dict({**frozen, **trained_params})
      outputs = logits_of(
          model, params, inputs_of(micro), micro['index'], rng, train=True
      )
      loss_sum, sums = loss_fn(outputs, micro)
      return loss_sum / total_weight, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accumulation_steps == 1:
      (loss, sums), grads = grad_fn(trained, batch)
    else:

      def accumulate(carry, micro_batch):
        return jax.tree.map(jnp.add, carry, grad_fn(trained, micro_batch)), None

      micro = micro_batches(batch, accumulation_steps, batch_shards)
      zeros = jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype),
          jax.eval_shape(grad_fn, trained, jax.tree.map(lambda v: v[0], micro)),
      )
      ((loss, sums), grads), _ = jax.lax.scan(accumulate, zeros, micro)
    grads = sum_over_devices(grads)
    loss = sum_over_devices(loss)
    sums = {k: sum_over_devices(v) / total_weight for k, v in sums.items()}
    # One non-finite gradient makes the norm non-finite (as does a norm
    # past float32's range, ~1.8e19): no pass of its own over the grads.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    full_grads = flax.traverse_util.unflatten_dict(
        {**grads, **{k: jnp.zeros_like(v) for k, v in frozen.items()}}
    )
    lift, drop = (
        (with_device_axis, without_device_axis)
        if update_on_device_axis
        else (lambda t: t, lambda t: t)
    )

    def update(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    operands = (lift(state.params), lift(state.opt_state), lift(full_grads))
    skipped = state.skipped
    if on_nonfinite == 'skip':
      # A branch, not a select of new or old values: the select read the
      # donated old state after the update, and XLA copied it all first.
      params, opt_state = jax.lax.cond(
          finite, update, lambda p, s, g: (p, s), *operands
      )
      skipped = state.skipped + (~finite).astype(jnp.int32)
    else:
      params, opt_state = update(*operands)
    ema_params = state.ema_params
    if ema_decay is not None:
      d = ema_decay_at(ema_decay, state.step)
      ema_params = drop(
          jax.tree.map(_ema_update(d), lift(state.ema_params), params)
      )
    params, opt_state = drop(params), drop(opt_state)
    metrics = {
        'loss': loss,
        **sums,
        'grad_norm': grad_norm,
        'param_norm': optax.tree.norm(_floating(params)),
        'learning_rate': schedule(state.step),
        'nonfinite': (~finite).astype(jnp.float32),
    }
    if skipped is not None:
      metrics['skipped'] = skipped
    return (
        TrainState(state.step + 1, params, opt_state, ema_params, skipped),
        metrics,
    )

  return step


def make_train_step(model, tx, schedule, config, **options):
  """The pmapped train step: `batch` arrays have a leading device axis;
  gradients are summed over devices with `psum`. `config` and `options`:
  those of `train_step_fn` (but `layout`)."""
  layout = StepLayout(
      psum_over_devices, update_on_device_axis=backend.cpu_workarounds()
  )
  step = train_step_fn(model, tx, schedule, config, layout=layout, **options)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


def eval_fn(model, inputs_of=None):
  """Returns the uncompiled `(params, batch) -> outputs` (e.g. logits)."""
  inputs_of = inputs_of or features_of

  def step(params, batch):
    return model.apply({'params': params}, **inputs_of(batch), train=False)

  return step


def eval_totals_fn(
    model,
    task,
    sum_over_devices=lambda x: x,
    gather_rows=lambda x: x,
    inputs_of=None,
):
  """Returns the uncompiled `(params, batch, running) -> totals`: the
  task's evaluation totals of a batch, added to the running totals of the
  earlier batches (so that one compiled step does all the work of a pass;
  without `running`, the step gives the batch's own totals, e.g. for their
  shapes). Per-row values (`task.eval_rows`) are gathered over the devices
  (`gather_rows`) and summed in row order, so that the totals are the same
  on any number of devices; integer counts (`task.eval_counts`) are summed
  over devices (`sum_over_devices`)."""
  outputs_of = eval_fn(model, inputs_of)

  def step(params, batch, running=None):
    outputs = outputs_of(params, batch)
    totals = {
        k: gather_rows(v).sum(axis=0)
        for k, v in task.eval_rows(outputs, batch).items()
    }
    totals.update(
        jax.tree.map(sum_over_devices, task.eval_counts(outputs, batch))
    )
    if running is None:
      return totals
    return jax.tree.map(jnp.add, running, totals)

  return step


def make_eval_step(model):
  """Returns a pmapped `(params, batch) -> logits`."""
  return jax.pmap(eval_fn(model), axis_name=AXIS)


def initial_state(params, tx, ema: bool = False, count_skipped: bool = False):
  """A step-0 TrainState (EMA = the params; skipped count 0 when asked)."""
  return TrainState(
      np.zeros((), np.int32),
      params,
      tx.init(params),
      jax.tree.map(np.array, params) if ema else None,
      np.zeros((), np.int32) if count_skipped else None,
  )
