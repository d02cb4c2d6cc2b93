"""optax optimizers, schedules and regex parameter groups from the config.

Parameters are named by their `/`-joined paths (`dense_0/kernel`). Regexes
over those paths (full match) decide, for every parameter:

- whether it trains: `frozen` regexes, the `linear_probing` preset (only the
  head trains) and LoRA (only the adapters, and optionally the
  head, train). Frozen parameters go through `optax.set_to_zero` in an
  `optax.multi_transform`: no optimizer state, no update; the train step
  does not differentiate them either;
- its learning-rate multiplier: `layer_decay` (lr x decay^depth, depth
  counted from the top of a layered encoder) times the first matching
  `lr_mults` entry;
- whether weight decay applies (`no_decay` regexes turn it off).

The head and the layer index are named by the run's `NamingRules`
(tuning/methods/naming.py: `config.optimizer.head` and `layer_index_regex` where set,
else the model family's); callers that pass none get the user's values over
the defaults of tuning/models/family.py.

`describe_parameters` prints the resulting table at the start of every run.
"""

from __future__ import annotations

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tuning.config.defaults import FIELD
from tuning.methods import naming as naming_lib

ADAPTER_REGEX = r'.*/lora_[ab]'


def parameter_paths(params) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} for every leaf of a parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return {k: tuple(np.shape(v)) for k, v in flat.items()}


def path_mask(params, regexes, default=False):
  """A tree of bools: True where the path fully matches any regex."""
  compiled = [re.compile(r) for r in regexes]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  mask = {
      k: (any(c.fullmatch(k) for c in compiled) if compiled else default)
      for k in flat
  }
  return flax.traverse_util.unflatten_dict(mask, sep='/')


@dataclasses.dataclass(frozen=True)
class ParameterSetting:
  """How the optimizer treats one parameter."""

  trains: bool
  lr_mult: float
  decays: bool  # weight decay applies (and the optimizer has one)


def _regexes(opt_config, name):
  """`opt_config.<name>`'s regexes (None: the field's default, e.g.
  no_decay's biases, norm scales and embeddings)."""
  value = opt_config[name]
  return tuple(FIELD[f'optimizer.{name}'].default if value is None else value)


def _lr_mult_rules(opt_config):
  rules = []
  for item in tuple(opt_config.lr_mults or ()):
    if (
        not isinstance(item, (tuple, list))
        or len(item) != 2
        or not isinstance(item[0], str)
        or not isinstance(item[1], (int, float))
    ):
      raise ValueError(
          f'config.optimizer.lr_mults entry {item!r} is not a (regex, '
          'multiplier) pair: write e.g. "((\'classifier/.*\', 10.0),)"'
      )
    rules.append((re.compile(item[0]), float(item[1])))
  return rules


def layer_depths(
    paths, layer_index_regex: str, embedding_regex: str
) -> dict[str, int]:
  """Depth from the top of a layered encoder, for every path.

  With L layers (the index captured by `layer_index_regex` runs 0..L-1,
  0 the lowest): layer i has depth L - i, embeddings depth L + 1, everything else
  (pooler, head) depth 0.
  """
  layer = re.compile(layer_index_regex)
  embedding = re.compile(embedding_regex)
  index = {}
  for p in paths:
    m = layer.fullmatch(p)
    if m:
      try:
        index[p] = int(m.group(1))
      except (IndexError, TypeError, ValueError):
        raise ValueError(
            'config.optimizer.layer_index_regex='
            f'{layer_index_regex!r} must capture'
            r' the layer index as its first group, e.g. '
            r"'.*layer_(\d+)/.*'"
        ) from None
  if not index:
    raise ValueError(
        f'config.optimizer.layer_decay is set but '
        'config.optimizer.layer_index_regex='
        f'{layer_index_regex!r} matches no '
        'parameter path (it must capture the layer index, e.g. '
        r"'.*layer_(\d+)/.*')"
    )
  layers = max(index.values()) + 1
  return {
      p: (
          layers - index[p]
          if p in index
          else layers + 1
          if embedding.fullmatch(p)
          else 0
      )
      for p in paths
  }


def _naming(naming, opt_config, lora_config) -> naming_lib.NamingRules:
  return naming or naming_lib.resolve(None, opt_config, lora_config)


def parameter_settings(
    params,
    opt_config,
    lora_config=None,
    naming: naming_lib.NamingRules | None = None,
) -> dict[str, ParameterSetting]:
  """{path: ParameterSetting} from the optimizer (and LoRA) config.

  `naming`: the run's head and layer-index regexes (`naming_rules(config)`).
  """
  naming = _naming(naming, opt_config, lora_config)
  paths = list(parameter_paths(params))
  frozen = [re.compile(r) for r in _regexes(opt_config, 'frozen')]
  no_decay = [re.compile(r) for r in _regexes(opt_config, 'no_decay')]
  head = [re.compile(r) for r in naming.head]
  adapter = re.compile(ADAPTER_REGEX)
  lora_on = bool(lora_config is not None and lora_config.rank)
  linear_probing = bool(opt_config.linear_probing)
  if linear_probing and lora_on:
    raise ValueError(
        'config.optimizer.linear_probing and config.lora.rank '
        'are both set: choose one (LoRA trains the head too with '
        'config.lora.train_head=True)'
    )
  is_head = {p: any(r.fullmatch(p) for r in head) for p in paths}
  if (linear_probing or (lora_on and lora_config.train_head)) and not any(
      is_head.values()
  ):
    raise ValueError(
        f'config.optimizer.head={tuple(r.pattern for r in head)}'
        ' matches no parameter: give the regexes of the head'
    )
  decay = opt_config.layer_decay
  depths = (
      layer_depths(
          paths,
          naming.layer_regex,
          opt_config.embedding_regex,
      )
      if decay is not None
      else {}
  )
  rules = _lr_mult_rules(opt_config)
  has_decay = opt_config.name in ('adamw', 'sgd') and bool(
      opt_config.weight_decay
  )
  settings = {}
  for p in paths:
    if lora_on:
      trains = bool(adapter.fullmatch(p)) or (
          lora_config.train_head and is_head[p]
      )
    elif linear_probing:
      trains = is_head[p]
    else:
      trains = True
    trains = trains and not any(r.fullmatch(p) for r in frozen)
    mult = float(decay) ** depths[p] if decay is not None else 1.0
    for regex, m in rules:
      if regex.fullmatch(p):
        mult *= m
        break
    if mult == 0:
      trains = False  # a zero multiplier freezes: no state, no update
    settings[p] = ParameterSetting(
        trains=trains,
        lr_mult=mult if trains else 0.0,
        decays=has_decay
        and trains
        and not any(r.fullmatch(p) for r in no_decay),
    )
  if not any(s.trains for s in settings.values()):
    raise ValueError(
        'no parameter trains: check config.optimizer.frozen, '
        'lr_mults, linear_probing/head and config.lora'
    )
  return settings


def _tree(params, values: dict):
  del params
  return flax.traverse_util.unflatten_dict(values, sep='/')


def trainable_mask(
    params,
    opt_config,
    lora_config=None,
    naming: naming_lib.NamingRules | None = None,
):
  """A tree of bools: True for the parameters that train."""
  settings = parameter_settings(params, opt_config, lora_config, naming)
  return _tree(params, {p: s.trains for p, s in settings.items()})


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by a constant from a tree (no state)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return (
        jax.tree.map(lambda u, m: u * m if m != 1 else u, updates, multipliers),
        state,
    )

  return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` (same state), its scale one multiply.

  Updates whose global norm exceeds `max_norm` are scaled by max_norm /
  norm (as PyTorch's `clip_grad_norm_` does). optax divides every element
  by the norm instead; XLA:CPU will not repeat a division inside each
  consumer, so it wrote the clipped gradients out as one more array: 2.3%
  of SmolLM2's bfloat16 train step (issue #14). A multiply is folded into
  the optimizer's own pass. The results differ from optax's by rounding.
  """

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def rsqrt_schedule(peak: float, warmup_steps: int):
  """Inverse square root with linear warm-up (Vaswani et al. 2017):
  peak * min(step / warmup, sqrt(warmup / step)); step 0 gives 0, and
  without warm-up it is peak / sqrt(max(step, 1))."""
  warmup = float(max(int(warmup_steps), 0))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if not warmup:
      return peak * jax.lax.rsqrt(jnp.maximum(step, 1.0))
    return peak * jnp.minimum(
        step / warmup, jnp.sqrt(warmup / jnp.maximum(step, 1.0))
    )

  return schedule


def learning_rate_schedule(opt_config, total_steps: int, warmup_steps: int):
  """Linear warmup, then cosine, linear or constant decay (optimizer steps);
  or 'rsqrt': inverse square root with its own linear warm-up."""
  peak = opt_config.learning_rate
  if opt_config.schedule == 'rsqrt':
    return rsqrt_schedule(peak, warmup_steps)
  end = peak * opt_config.end_learning_rate_factor
  decay_steps = max(total_steps - warmup_steps, 1)
  if opt_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(
        peak, decay_steps, alpha=opt_config.end_learning_rate_factor
    )
  elif opt_config.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt_config.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(
        f'unknown config.optimizer.schedule '
        f'{opt_config.schedule!r}: use cosine, linear, constant or rsqrt'
    )
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def build_optimizer(
    opt_config,
    params,
    total_steps: int,
    warmup_steps: int,
    lora_config=None,
    naming: naming_lib.NamingRules | None = None,
):
  """Returns (optax transformation, learning-rate schedule).

  `total_steps`/`warmup_steps` count optimizer steps (one per global batch,
  whatever the gradient accumulation).
  """
  schedule = learning_rate_schedule(opt_config, total_steps, warmup_steps)
  settings = parameter_settings(params, opt_config, lora_config, naming)
  decay_mask = jax.tree.map(
      lambda no: not no,
      path_mask(params, _regexes(opt_config, 'no_decay')),
  )
  name = opt_config.name
  if name == 'adamw':
    core = optax.adamw(
        schedule,
        opt_config.b1,
        opt_config.b2,
        opt_config.eps,
        weight_decay=opt_config.weight_decay,
        mask=decay_mask,
    )
  elif name == 'adam':
    core = optax.adam(schedule, opt_config.b1, opt_config.b2, opt_config.eps)
  elif name == 'sgd':
    core = optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, decay_mask),
        optax.sgd(
            schedule, opt_config.momentum or None, nesterov=opt_config.nesterov
        ),
    )
  else:
    raise ValueError(
        f'unknown config.optimizer.name {name!r}: use adam, ' 'adamw or sgd'
    )
  parts = []
  if opt_config.clip_norm:
    parts.append(clip_by_global_norm(opt_config.clip_norm))
  parts.append(core)
  tx = optax.chain(*parts)
  if not all(s.trains for s in settings.values()):
    labels = _tree(
        params,
        {p: 'trained' if s.trains else 'frozen' for p, s in settings.items()},
    )
    tx = optax.multi_transform(
        {'trained': tx, 'frozen': optax.set_to_zero()}, labels
    )
  if any(s.trains and s.lr_mult != 1 for s in settings.values()):
    # After multi_transform: frozen updates are zeros, scaling them is moot.
    tx = optax.chain(
        tx,
        scale_by_tree(
            _tree(
                params,
                {
                    p: s.lr_mult if s.trains else 1.0
                    for p, s in settings.items()
                },
            )
        ),
    )
  return tx, schedule


def describe_parameters(
    params,
    opt_config,
    lora_config=None,
    naming: naming_lib.NamingRules | None = None,
) -> list[str]:
  """Lines of a table: each parameter, its size, trained?, LR multiplier,
  weight decay?, then the trainable/frozen totals."""
  settings = parameter_settings(params, opt_config, lora_config, naming)
  rows = [
      f'  {"parameter":<52} {"shape":<14} {"size":>10}  {"status":<6}  '
      f'{"lr_mult":>7}  wd'
  ]
  totals = {'trained': 0, 'frozen': 0}
  for path, shape in parameter_paths(params).items():
    s = settings[path]
    size = int(np.prod(shape))
    totals['trained' if s.trains else 'frozen'] += size
    rows.append(
        f'  {path:<52} {str(shape):<14} {size:>10,}  '
        f'{"train" if s.trains else "FROZEN":<6}  '
        f'{s.lr_mult:>7.3g}  {"yes" if s.decays else "no"}'
    )
  total = totals['trained'] + totals['frozen']
  rows.append(
      f'  trainable {totals["trained"]:,} / frozen '
      f'{totals["frozen"]:,} parameters ('
      f'{100 * totals["trained"] / max(total, 1):.2f}% trainable)'
  )
  return rows
