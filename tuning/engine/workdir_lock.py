"""One run at a time in a work directory: `WORKDIR/.lock`.

The lock is an exclusive `flock` on `WORKDIR/.lock`, which holds the owner's
pid, host and start time (JSON). The kernel releases a flock when its
process ends, however it ends (SIGKILL included), so a crashed run never
leaves the directory stuck: the file stays, stale, and the next run takes
it over. A second run on a held directory stops with one line naming the
lock file and the owner. Where the file system has no flock (some network
file systems), the file itself is the lock: it is stale when its pid no
longer runs on this host (a lock from another host must be removed by hand
once that run is gone; the error says so).

In a multi-process (multi-host) run only process 0 takes the lock; the
others share the directory with it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = '.lock'


class WorkdirError(RuntimeError):
  """The work directory cannot be used, worded for the user."""


def _prepare(workdir: str):
  """Creates `workdir`; one-line errors for a file or a read-only path."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(
        f'--workdir={workdir} is a file, not a directory: '
        "give a directory (a new one, or a run's to resume "
        'it)'
    )
  try:
    os.makedirs(workdir, exist_ok=True)
  except FileExistsError:  # a path component is a file
    raise WorkdirError(
        f'--workdir={workdir}: a part of the path is a file, '
        'not a directory: give another --workdir'
    ) from None
  except OSError as e:
    raise WorkdirError(
        f'cannot create --workdir={workdir}: {e.strerror} '
        '(choose a writable --workdir)'
    ) from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(
        f'--workdir={workdir} is not writable (read-only file '
        'system or permissions): choose a writable --workdir'
    )


def _owner_text(path: str) -> tuple[str, dict]:
  try:
    with open(path, encoding='utf-8') as f:
      owner = json.load(f)
  except (OSError, ValueError):
    return 'another process', {}
  started = owner.get('started')
  since = (
      time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))
      if isinstance(started, (int, float))
      else '?'
  )
  return (
      f'pid {owner.get("pid")} on {owner.get("host")}, started ' f'{since}',
      owner,
  )


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError):
    return True
  return True


class WorkdirLock:
  """Holds `WORKDIR/.lock` from `acquire()` (or `with`) until `release()`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.enabled = enabled
    self.taken_over = None  # the stale owner's description, if any
    self._fd = None
    self._plain_file = False

  def acquire(self):
    _prepare(self.workdir)
    if not self.enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      owner, _ = _owner_text(self.path)
      raise WorkdirError(
          f'--workdir={self.workdir} is in use by another run ({owner}; lock '
          f'file {self.path}): wait for that run to finish or stop it, or '
          'choose another --workdir'
      ) from None
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      return self._acquire_plain_file()
    previous, owner = _owner_text(self.path)
    if owner:
      self.taken_over = previous
    self._write_owner(fd)
    self._fd = fd
    return self

  def _acquire_plain_file(self):
    """Without flock: the file is the lock, stale when its pid is gone."""
    self._plain_file = True
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        text, owner = _owner_text(self.path)
        same_host = owner.get('host') == socket.gethostname()
        if same_host and not _pid_alive(owner.get('pid')):
          self.taken_over = text
          os.remove(self.path)
          continue
        how = (
            ''
            if same_host
            else (
                ' (a run on another host: if it is '
                f'gone, remove {self.path})'
            )
        )
        raise WorkdirError(
            f'--workdir={self.workdir} is in use by another run ({text}; '
            f'lock file {self.path}){how}: wait for that run to finish or '
            'stop it, or choose another --workdir'
        ) from None
      self._write_owner(fd)
      self._fd = fd
      return self
    raise WorkdirError(
        f'cannot take the lock {self.path}: remove it if no '
        'run uses this --workdir'
    )

  def _write_owner(self, fd: int):
    owner = {
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'started': time.time(),
        'command': sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + '\n').encode(), 0)

  def release(self):
    if self._fd is None:
      return
    if self._plain_file:
      try:
        os.remove(self.path)
      except OSError:
        pass
    else:
      try:  # an empty file: released cleanly (a killed run leaves its pid)
        os.ftruncate(self._fd, 0)
      except OSError:
        pass
    os.close(self._fd)  # releases the flock
    self._fd = None

  def __enter__(self):
    self.acquire()
    if self.taken_over:
      print(
          f'lock: took over {self.path} from a run that is gone '
          f'({self.taken_over})',
          flush=True,
      )
    return self

  def __exit__(self, *exc):
    self.release()
