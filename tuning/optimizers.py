"""optax optimizers, schedules and regex parameter groups from the config.

Parameters are named by their `/`-joined paths (`dense_0/kernel`). Regexes
over those paths choose which parameters are frozen (no optimizer state, no
update) and which get no weight decay; `describe_parameters` prints the
resulting table at the start of every run.
"""

from __future__ import annotations

import re

import flax
import jax
import numpy as np
import optax

# By default weight decay skips biases, norm scales and embeddings.
DEFAULT_NO_DECAY = (r'.*bias$', r'.*(LayerNorm|layer_norm|norm).*',
                    r'.*(embed|embeddings).*')


def parameter_paths(params) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} for every leaf of a parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return {k: tuple(np.shape(v)) for k, v in flat.items()}


def path_mask(params, regexes, default=False):
  """A tree of bools: True where the path fully matches any regex."""
  compiled = [re.compile(r) for r in regexes]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  mask = {k: (any(c.fullmatch(k) for c in compiled) if compiled else default)
          for k in flat}
  return flax.traverse_util.unflatten_dict(mask, sep='/')


def learning_rate_schedule(opt_config, total_steps: int, warmup_steps: int):
  """Linear warmup, then cosine, linear or constant decay (optimizer steps)."""
  peak = opt_config.learning_rate
  end = peak * opt_config.end_learning_rate_factor
  decay_steps = max(total_steps - warmup_steps, 1)
  if opt_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps,
                                        alpha=opt_config.end_learning_rate_factor)
  elif opt_config.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt_config.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f'unknown config.optimizer.schedule '
                     f'{opt_config.schedule!r}: use cosine, linear or constant')
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def build_optimizer(opt_config, params, total_steps: int, warmup_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(opt_config, total_steps, warmup_steps)
  decay_mask = path_mask(params, opt_config.get('no_decay', DEFAULT_NO_DECAY))
  decay_mask = jax.tree.map(lambda no: not no, decay_mask)
  name = opt_config.name
  if name == 'adamw':
    core = optax.adamw(schedule, opt_config.b1, opt_config.b2, opt_config.eps,
                       weight_decay=opt_config.weight_decay, mask=decay_mask)
  elif name == 'adam':
    core = optax.adam(schedule, opt_config.b1, opt_config.b2, opt_config.eps)
  elif name == 'sgd':
    core = optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, decay_mask),
        optax.sgd(schedule, opt_config.momentum or None,
                  nesterov=opt_config.nesterov))
  else:
    raise ValueError(f'unknown config.optimizer.name {name!r}: use adam, '
                     'adamw or sgd')
  parts = []
  if opt_config.clip_norm:
    parts.append(optax.clip_by_global_norm(opt_config.clip_norm))
  parts.append(core)
  tx = optax.chain(*parts)
  frozen = tuple(opt_config.get('frozen', ()))
  if frozen:
    labels = jax.tree.map(lambda f: 'frozen' if f else 'trained',
                          path_mask(params, frozen))
    tx = optax.multi_transform({'trained': tx,
                                'frozen': optax.set_to_zero()}, labels)
  return tx, schedule


def describe_parameters(params, opt_config) -> list[str]:
  """Lines of a table: each parameter, its size, trained?, weight decay?"""
  frozen = path_mask(params, tuple(opt_config.get('frozen', ())))
  no_decay = path_mask(params, opt_config.get('no_decay', DEFAULT_NO_DECAY))
  flat_frozen = flax.traverse_util.flatten_dict(frozen, sep='/')
  flat_no_decay = flax.traverse_util.flatten_dict(no_decay, sep='/')
  decays = opt_config.name in ('adamw', 'sgd') and opt_config.weight_decay
  rows = []
  totals = {'trained': 0, 'frozen': 0}
  for path, shape in parameter_paths(params).items():
    size = int(np.prod(shape))
    trains = not flat_frozen[path]
    totals['trained' if trains else 'frozen'] += size
    rows.append(f'  {path:<48} {str(shape):<16} {size:>10,}  '
                f'{"train" if trains else "FROZEN":<6}  '
                f'{"yes" if (decays and trains and not flat_no_decay[path]) else "no"}')
  head = f'  {"parameter":<48} {"shape":<16} {"size":>10}  {"status":<6}  wd'
  rows.insert(0, head)
  rows.append(f'  trainable {totals["trained"]:,} / frozen '
              f'{totals["frozen"]:,} parameters')
  return rows
