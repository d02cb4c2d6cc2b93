"""One style for every Python file: pyink with the repository's settings
(pyproject.toml: 2-space indents, 80 columns). Run `pyink .` to fix a
failure."""

import subprocess
import sys

from conftest import ROOT


def test_every_python_file_is_formatted_by_pyink():
  result = subprocess.run(
      [sys.executable, '-m', 'pyink', '--check', '.'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, (
      'files that `pyink .` would reformat:\n' + result.stderr[-3000:]
  )
