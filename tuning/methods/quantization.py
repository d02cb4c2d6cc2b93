"""Frozen Dense kernels stored in less memory: bfloat16, int8 or NF4.

Under LoRA (`config.lora.base_dtype`, tuning/methods/lora.py) the frozen
kernels of the adapted Dense layers can be stored in one of these formats;
they are dequantized to float32 right before their matmul. Trained
parameters (adapters, head) and the optimizer state stay float32.

Formats of a kernel W [in, out] (what the parameter tree holds at
`<module>/kernel`):

* 'float32': W itself (nothing changes).
* 'bfloat16': W rounded to a bfloat16 array of the same shape (2 bytes a
  weight).
* 'int8': a dict {'int8': int8 [in, out], 'scales': float32 [in, B]}. Each
  row of W is cut into blocks of 64 consecutive output columns (B =
  ceil(out / 64), the last block of a row shorter when 64 does not divide
  out); `scales` holds each block's absmax m, and a weight is
  round(127 w / m), so w ~ code * m / 127, an error of at most m / 254 per
  weight (half a step). 1 + 4/64 bytes a weight.
* 'nf4': a dict {'nf4': uint8 [in, out / 2], 'scales': float32 [in, B]},
  blocks and scales as int8; a weight is the index (0..15) of the NF4 value
  nearest to w / m, and w ~ NF4[code] * m. Two codes a byte along the
  output axis: column 2k in the low nibble, column 2k + 1 in the high one
  (so out must be even). The 16 NF4 values are those of QLoRA (Dettmers et
  al. 2023, 'NormalFloat', as bitsandbytes' `nf4` table): quantiles of a
  standard normal scaled to [-1, 1], with an exact 0. The error is at most
  m times half the widest gap between neighbouring values (`NF4_MAX_ERROR`,
  0.152: between -1 and -0.696). 0.5 + 4/64 bytes a weight. Unlike QLoRA,
  the scales are not quantized again (no double quantization).

The formats are self-describing (the dict's code key names the format, and
the kernel's shape follows from the codes), so `dequantize` needs nothing
else. All of it is jnp, so that it runs under `jit` and `eval_shape`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ('float32', 'bfloat16', 'int8', 'nf4')
BLOCK = 64

NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# The largest |w / m - NF4[code]|: half the widest gap between neighbours.
NF4_MAX_ERROR = float(np.max(np.diff(NF4_VALUES)) / 2)
INT8_MAX_ERROR = 1.0 / 254  # half a step of m / 127


def check_format(fmt: str):
  if fmt not in FORMATS:
    raise ValueError(
        f'unknown config.lora.base_dtype {fmt!r}: use one of '
        + ', '.join(repr(f) for f in FORMATS)
        + ' (set --config.lora.base_dtype=...)'
    )


def is_stored(value) -> bool:
  """Whether `value` is a kernel in one of the smaller formats."""
  if isinstance(value, dict):
    return 'scales' in value and ('int8' in value or 'nf4' in value)
  return getattr(value, 'dtype', None) == jnp.bfloat16


def format_of(value) -> str:
  if isinstance(value, dict):
    return 'int8' if 'int8' in value else 'nf4'
  return 'bfloat16' if value.dtype == jnp.bfloat16 else 'float32'


def _block_absmax(kernel):
  """[in, out] -> the blocks [in, B, 64] (zero-padded) and their absmax."""
  rows, cols = kernel.shape
  blocks = -(-cols // BLOCK)
  padded = jnp.pad(kernel, ((0, 0), (0, blocks * BLOCK - cols)))
  padded = padded.reshape(rows, blocks, BLOCK)
  return padded, jnp.max(jnp.abs(padded), axis=-1)


def _per_weight(scales, cols: int):
  """Block scales [in, B] repeated to [in, cols]."""
  return jnp.repeat(scales, BLOCK, axis=1)[:, :cols]


def quantize(kernel, fmt: str, name: str = 'kernel'):
  """A float32 kernel [in, out] in format `fmt` (see the module docstring);
  `name` (its module path) words the error of an odd NF4 output size."""
  check_format(fmt)
  kernel = jnp.asarray(kernel, jnp.float32)
  if fmt == 'float32':
    return kernel
  if fmt == 'bfloat16':
    return kernel.astype(jnp.bfloat16)
  if kernel.ndim != 2:
    raise ValueError(f'{name}: {fmt} stores 2-D kernels, not {kernel.shape}')
  rows, cols = kernel.shape
  padded, absmax = _block_absmax(kernel)
  safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
  unit = (padded / safe).reshape(rows, -1)[:, :cols]  # in [-1, 1]
  if fmt == 'int8':
    codes = jnp.round(unit * 127).astype(jnp.int8)
    return {'int8': codes, 'scales': absmax}
  if cols % 2:
    raise ValueError(
        f"config.lora.base_dtype='nf4' packs two codes a byte along the "
        f'output axis: {name} has an odd output size {cols}; use int8 or '
        'bfloat16, or leave it out of config.lora.targets'
    )
  midpoints = jnp.asarray((NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2)
  codes = jnp.sum(unit[..., None] > midpoints, axis=-1).astype(jnp.uint8)
  codes = codes.reshape(rows, cols // 2, 2)
  packed = codes[..., 0] | (codes[..., 1] << 4)
  return {'nf4': packed.astype(jnp.uint8), 'scales': absmax}


def dequantize(stored, dtype=jnp.float32):
  """The kernel [in, out] in `dtype` from any format of `quantize`."""
  if not isinstance(stored, dict):
    return jnp.asarray(stored).astype(dtype)
  scales = stored['scales']
  if 'int8' in stored:
    codes = stored['int8']
    values = codes.astype(jnp.float32) / 127
  else:
    packed = stored['nf4']
    low, high = packed & 0xF, packed >> 4
    codes = jnp.stack([low, high], axis=-1).reshape(packed.shape[0], -1)
    values = jnp.asarray(NF4_VALUES)[codes.astype(jnp.int32)]
  cols = values.shape[1]
  return (values * _per_weight(scales, cols)).astype(dtype)


def kernel_shape(stored) -> tuple[int, int]:
  if not isinstance(stored, dict):
    return tuple(stored.shape)
  if 'int8' in stored:
    return tuple(stored['int8'].shape)
  rows, half = stored['nf4'].shape
  return rows, 2 * half


def max_error(stored):
  """The bound on |W - dequantize(stored)| per weight, [in, out] (the
  block's absmax times the format's largest rounding error)."""
  fmt = format_of(stored)
  if fmt in ('float32', 'bfloat16'):
    kernel = jnp.abs(jnp.asarray(stored, jnp.float32))
    return kernel * (0.0 if fmt == 'float32' else 2.0**-8)
  cols = kernel_shape(stored)[1]
  per = INT8_MAX_ERROR if fmt == 'int8' else NF4_MAX_ERROR
  return _per_weight(stored['scales'], cols) * per


def nbytes(tree) -> int:
  """Bytes of the arrays of a (parameter) tree."""
  return sum(
      int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
  )
