"""One line for the user per error: what went wrong and what to do.

main.py prints `error: <describe(e)>` for any exception that ends a run
(`TUNING_TRACEBACK=1` shows the traceback instead). Errors raised for the
user (ValueError and friends) carry their own explanation; operating-system
errors get the fix for their errno (a full disk, a read-only directory);
anything else is named as unexpected, with the way to see its traceback.
"""

from __future__ import annotations

import errno
import os

# Raised with a message written for the user (bad config, data, files).
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    RuntimeError,
    KeyError,
    NotADirectoryError,
    IsADirectoryError,
)

_MAX_CHARS = 600

_OS_HINTS = {
    errno.ENOSPC: 'the disk is full: free some space (or choose a --workdir '
    'on another disk) and rerun the same command; it resumes '
    'from the last complete checkpoint',
    errno.EDQUOT: 'the disk quota is exceeded: free some space and rerun '
    'the same command; it resumes from the last complete '
    'checkpoint',
    errno.EROFS: 'the file system is read-only: choose a writable --workdir',
    errno.EACCES: 'permission denied: choose a --workdir you can write to, '
    'or fix the permissions',
    errno.EPERM: 'operation not permitted: choose a --workdir you can write '
    'to, or fix the permissions',
}


def _flatten(text: str) -> str:
  """One line: the message's lines joined, long ones cut in the middle."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  text = ' | '.join(lines)
  if len(text) > _MAX_CHARS:
    half = _MAX_CHARS // 2
    text = f'{text[:half]} ... {text[-half:]}'
  return text


# OS errors that reach Python inside other exceptions' text (tensorstore).
_OS_TEXT = (
    ('No space left on device', errno.ENOSPC),
    ("os_error_code='28'", errno.ENOSPC),
    ('Disk quota exceeded', errno.EDQUOT),
    ('Read-only file system', errno.EROFS),
    ('Permission denied', errno.EACCES),
)


def describe(e: BaseException) -> str:
  """The one-line explanation of `e` (without the 'error: ' prefix)."""
  name = type(e).__name__
  if isinstance(e, OSError) and e.errno in _OS_HINTS:
    where = f': {e.filename}' if e.filename else ''
    return _flatten(f'{name}: {e.strerror or e}{where} ({_OS_HINTS[e.errno]})')
  for text, code in _OS_TEXT:
    if text in str(e):
      message = ' '.join(str(e).split())
      if len(message) > 240:
        message = message[:240] + '...'
      return _flatten(
          f'{name}: {os.strerror(code)} ({_OS_HINTS[code]}); '
          f'details: {message}'
      )
  if isinstance(e, USER_ERRORS) or type(e) in OSError.__subclasses__():
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    return _flatten(f'{name}: {message}')
  if isinstance(e, OSError):
    return _flatten(
        f'{name}: {e} (a file system error: check the path and '
        'the disk, then rerun the same command to resume)'
    )
  return _flatten(
      f'unexpected {name}: {e} (rerun with TUNING_TRACEBACK=1 '
      'to see the traceback, and please report it)'
  )


class _NoTracebacks:
  """A logging filter: library log records keep their line, lose their
  traceback (the run's own error line says what happened)."""

  def filter(self, record) -> bool:
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None
    return True


def quiet_library_tracebacks():
  """Library errors logged with a traceback (orbax's save threads) log one
  line instead; TUNING_TRACEBACK=1 keeps them."""
  import logging  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  if os.environ.get('TUNING_TRACEBACK'):
    return
  for handler in logging.getLogger().handlers:
    handler.addFilter(_NoTracebacks())

  def thread_hook(args):  # a library's helper thread failing (orbax)
    if args.exc_type is not SystemExit:
      name = args.thread.name if args.thread else '?'
      print(
          f'warning: thread {name}: {args.exc_type.__name__}: '
          f'{_flatten(args.exc_value)}',
          file=sys.stderr,
          flush=True,
      )

  def unraisable_hook(unraisable):
    print(
        f'warning: ignored {type(unraisable.exc_value).__name__}: '
        f'{_flatten(unraisable.exc_value)}',
        file=sys.stderr,
        flush=True,
    )

  threading.excepthook = thread_hook
  sys.unraisablehook = unraisable_hook
