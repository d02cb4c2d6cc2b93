"""Console output of a run: one line a message, from process 0 only."""

import sys

import jax


def info(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def error(message: str):
  """A one-line error for the user (every process prints its own)."""
  print(f'error: {message}', file=sys.stderr, flush=True)
