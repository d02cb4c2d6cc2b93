"""Activation rematerialisation of the Transformer blocks (`config.model.remat`).

A family with blocks (the decoder, BERT, the encoder-decoder) wraps its
block class with `wrap(...)` where it builds its layers: `flax.linen.remat`
around the class, with the `jax.checkpoint` policy `config.model.remat`
names, so that the backward pass recomputes what the policy does not keep.
The model code stays plain Flax and the parameter paths stay the same
(`.../layer_<i>/...`: the wrapped class keeps the name it is given).

`config.model.remat` (`CHOICES`):

    none        every activation is kept (no remat; the default)
    full        nothing inside a block is kept: each block is recomputed
                in the backward pass from its input
    dots_saveable, dots_with_no_batch_dims_saveable, nothing_saveable,
    everything_saveable
                the `jax.checkpoint_policies` of that name (e.g. keep every
                matmul's output, or only those without batch dimensions:
                the Dense layers', not attention's einsums)
    save_only_these_names, save_anything_except_these_names
                keep only (or all but) the activations tagged with the
                names in `config.model.remat_names`

The names the blocks tag (`jax.ad_checkpoint.checkpoint_name`; `NAMES`):

    query, key, value     the attention's projections [B * L, heads * dim]
                          (before the rotary embedding)
    attention_context     softmax(q k) v, before the output projection
    attention_out         the attention's output projection
    mlp_hidden            the feed-forward hidden units after the
                          activation (and gate) [B * L, intermediate]
    mlp_out               the feed-forward output projection

The encoder-decoder's self- and cross-attention tag the same names (its
cross-attention keys and values are computed outside the blocks, once, and
kept). A tag is an identity: with `remat='none'` the program is the same.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax import ad_checkpoint

CHOICES = (
    'none',
    'full',
    'dots_saveable',
    'dots_with_no_batch_dims_saveable',
    'nothing_saveable',
    'everything_saveable',
    'save_only_these_names',
    'save_anything_except_these_names',
)
NAMED = ('save_only_these_names', 'save_anything_except_these_names')
NAMES = (
    'query',
    'key',
    'value',
    'attention_context',
    'attention_out',
    'mlp_hidden',
    'mlp_out',
)


def tag(x, name: str):
  """`x`, tagged `name` for the named policies (one of `NAMES`)."""
  return ad_checkpoint.checkpoint_name(x, name)


def check(remat: str, names) -> None:
  """Raises a one-line ValueError for a remat choice or names not known."""
  if remat not in CHOICES:
    raise ValueError(
        f'unknown config.model.remat {remat!r}: use one of '
        + ', '.join(repr(c) for c in CHOICES)
        + ' (set --config.model.remat=...)'
    )
  names = tuple(names or ())
  unknown = [n for n in names if n not in NAMES]
  if unknown:
    raise ValueError(
        f'config.model.remat_names has {", ".join(map(repr, unknown))}, '
        f'which no block tags: use some of {", ".join(NAMES)}'
    )
  if remat in NAMED and not names:
    raise ValueError(
        f'config.model.remat={remat!r} needs config.model.remat_names: '
        f'some of {", ".join(NAMES)}'
    )
  if names and remat not in NAMED:
    raise ValueError(
        f'config.model.remat_names is read only by remat '
        f'{" or ".join(map(repr, NAMED))}, not {remat!r}: drop the names '
        'or change model.remat'
    )


def policy(remat: str, names=()):
  """The `jax.checkpoint` policy of a choice other than 'none' (None for
  'full': nothing saved)."""
  check(remat, names)
  if remat in ('none', 'full'):
    return None
  chosen = getattr(jax.checkpoint_policies, remat)
  if remat in NAMED:
    return chosen(*names)
  return chosen


def wrap(block_cls, remat: str, names=(), static_argnums=()):
  """`block_cls` itself for 'none', else `nn.remat(block_cls)` with the
  choice's policy; `static_argnums`: the positions of `__call__`'s Python
  arguments (booleans such as `train`), counting `self` as 0."""
  if remat == 'none':
    check(remat, names)
    return block_cls
  return nn.remat(
      block_cls,
      policy=policy(remat, names),
      static_argnums=static_argnums,
  )


def from_model_config(model_config) -> dict:
  """{'remat': ..., 'remat_names': ...} from a `config.model` (the fields
  may be missing: a model config holding only `hf_config`), checked."""
  remat = model_config.get('remat', None) or 'none'
  names = tuple(model_config.get('remat_names', None) or ())
  check(remat, names)
  return {'remat': remat, 'remat_names': names}
