"""TensorBoard event files written without tensorboardX: the same bytes
as tensorboardX's (framing, CRCs and protocol buffers)."""

from tensorboardX import crc32c as tbx_crc32c
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

from tuning.engine import event_file


def test_crc32c_is_castagnoli():
  assert event_file.crc32c(b'123456789') == 0xE3069283  # the check value
  for data in (b'', b'a', bytes(range(256)) * 3):
    assert event_file.crc32c(data) == tbx_crc32c.crc32c(data)


def test_records_are_framed_as_tensorboardx_frames_them(tmp_path):
  payloads = [b'', b'x', bytes(range(200))]
  path = str(tmp_path / 'tbx')
  writer = record_writer.RecordWriter(path)
  for payload in payloads:
    writer.write(payload)
  writer.close()
  with open(path, 'rb') as f:
    assert f.read() == b''.join(event_file.record(p) for p in payloads)


def test_events_are_the_protocol_buffers_tensorboard_reads():
  scalars = {'train/loss': 0.6931, 'validation/accuracy': 0.875}
  for step in (0, 1, 40, 2**40):
    expected = event_pb2.Event(
        wall_time=1764700000.25,
        step=step,
        summary=summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=k, simple_value=v)
                for k, v in scalars.items()
            ]
        ),
    ).SerializeToString()
    assert event_file.event(1764700000.25, step, scalars) == expected
  header = event_pb2.Event(wall_time=3.5, file_version='brain.Event:2')
  assert event_file.event(3.5, file_version='brain.Event:2') == (
      header.SerializeToString()
  )


def test_the_writer_appends_readable_events(tmp_path):
  writer = event_file.EventFileWriter(str(tmp_path / 'tb'))
  writer.add_scalars(10, {'train/loss': 1.5})
  writer.add_scalars(20, {'train/loss': 0.5, 'train/learning_rate': 1e-3})
  writer.close()
  data = open(writer.path, 'rb').read()
  events, pos = [], 0
  while pos < len(data):
    length = int.from_bytes(data[pos : pos + 8], 'little')
    events.append(
        event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    )
    pos += 16 + length
  assert events[0].file_version == 'brain.Event:2'
  got = [
      (e.step, {v.tag: v.simple_value for v in e.summary.value})
      for e in events[1:]
  ]
  assert got == [
      (10, {'train/loss': 1.5}),
      (20, {'train/loss': 0.5, 'train/learning_rate': 0.0010000000474974513}),
  ]
