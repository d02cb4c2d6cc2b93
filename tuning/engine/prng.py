"""The PRNG implementations `config.training.prng_impl` can name.

`threefry2x32` and `rbg` are JAX's own. `hash` is defined here for dropout
on CPUs: its keys are threefry keys (seeding, `split` and `fold_in` are
threefry's, so keys derived from one another stay independent), but the
bits of `random_bits(key, shape)` are a keyed hash of each element's
position in `shape`,

    h(i) = fmix32(fmix32(i ^ k0) + k1)

(`fmix32`: MurmurHash3's 32-bit finaliser; `k0, k1`: the key's two
words). Each of the four steps is a bijection of 32-bit words, so one key
gives distinct words at distinct positions. It costs about a third of
threefry's twenty rounds per word, and, like threefry and unlike `rbg`, it is
elementwise in the key: drawn under a `vmap` over keys (the train step's
per-example dropout keys, tuning/models/dropout.py), every example's bits
depend only on its own key, so results stay independent of the device
count and of gradient accumulation.

Not for cryptography, nor for statistics finer than dropout masks need:
the tests check its mean, the drop rate and that neighbouring positions
and keys are uncorrelated.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.extend.random as jax_random
import jax.numpy as jnp
import numpy as np

from tuning.config.defaults import FIELD

HASH = 'hash'
# config.training.prng_impl's names, declared in tuning/config/defaults.py.
NAMES = FIELD['training.prng_impl'].allowed.choices

_THREEFRY = 'threefry2x32'


def _fmix32(x):
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _as_threefry(key_data):
  return jax.random.wrap_key_data(key_data, impl=_THREEFRY)


def _seed(seed):
  return jax.random.key_data(jax.random.key(seed, impl=_THREEFRY))


def _split(key_data, shape):
  return jax.random.key_data(jax.random.split(_as_threefry(key_data), shape))


def _fold_in(key_data, data):
  return jax.random.key_data(jax.random.fold_in(_as_threefry(key_data), data))


def _words(key_data, count: int, salt: int):
  """`count` hashed 32-bit words at positions 0..count-1."""
  if count >= 2**32:
    raise ValueError(f'prng_impl=hash: {count} bits per key exceed 2^32')
  i = lax.iota(jnp.uint32, count)
  k0 = key_data[0] ^ np.uint32(salt)
  return _fmix32(_fmix32(i ^ k0) + key_data[1])


def _random_bits(key_data, bit_width: int, shape):
  count = int(np.prod(shape, dtype=np.int64))
  dtype = jnp.dtype(f'uint{bit_width}')
  if bit_width == 64:
    hi = _words(key_data, count, 0).astype(jnp.uint64)
    lo = _words(key_data, count, 0x9E3779B9).astype(jnp.uint64)
    return ((hi << 32) | lo).reshape(shape)
  return _words(key_data, count, 0).astype(dtype).reshape(shape)


HASH_IMPL = jax_random.define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name=HASH,
    tag='hsh',
)


def impl(name: str):
  """The `impl` argument of `jax.random.key` for a config's prng_impl
  (anything else than a name is taken to be one already)."""
  if not isinstance(name, str):
    return name
  if name == HASH:
    return HASH_IMPL
  if name not in NAMES:
    raise ValueError(
        f'config.training.prng_impl={name!r}: use one of {", ".join(NAMES)}'
    )
  return name
