"""`python -m tuning.export`: the command lives in tuning/cli/export.py."""

import sys

from tuning.cli import export

if __name__ == '__main__':
  sys.exit(export.main())
