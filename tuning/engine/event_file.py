"""TensorBoard event files, written directly: scalars only.

TensorBoard reads `events.out.tfevents.<time>.<host>` files: TFRecord
framing (`uint64 length`, masked CRC-32C of the length, the payload, masked
CRC-32C of the payload) around serialised `tensorboard.Event` protocol
buffers. A run logs only scalars, so the three messages it needs are encoded
here by hand, with the field numbers of tensorboard's `event.proto` and
`summary.proto`:

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
            Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }

(tensorboardX writes the same bytes, but importing it imports PyTorch: two
seconds of every run's start-up. tests/engine/test_event_file.py compares
this module's bytes with tensorboardX's.)
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(payload: bytes) -> bytes:
  """One TFRecord around `payload`."""
  length = struct.pack('<Q', len(payload))
  return b''.join(
      (
          length,
          struct.pack('<I', masked_crc32c(length)),
          payload,
          struct.pack('<I', masked_crc32c(payload)),
      )
  )


def _varint(n: int) -> bytes:
  n &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf encodes it
  out = bytearray()
  while True:
    low = n & 0x7F
    n >>= 7
    if n:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _length_delimited(field: int, data: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(data)) + data


def event(
    wall_time: float,
    step: int = 0,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
  """A serialised `Event` holding `scalars` ({tag: value}) at `step`."""
  out = [struct.pack('<Bd', 1 << 3 | 1, wall_time)]
  if step:
    out.append(_varint(2 << 3) + _varint(step))
  if file_version is not None:
    out.append(_length_delimited(3, file_version.encode()))
  if scalars:
    values = b''.join(
        _length_delimited(
            1,
            _length_delimited(1, tag.encode())
            + struct.pack('<Bf', 2 << 3 | 5, value),
        )
        for tag, value in scalars.items()
    )
    out.append(_length_delimited(5, values))
  return b''.join(out)


class EventFileWriter:
  """Appends scalar events to a new event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(
        logdir,
        f'events.out.tfevents.{str(now)[:10]}.{socket.gethostname()}',
    )
    self._file = open(self.path, 'ab')
    self._file.write(record(event(now, file_version='brain.Event:2')))

  def add_scalars(self, step: int, scalars: dict[str, float]):
    self._file.write(record(event(time.time(), step, scalars)))

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()
