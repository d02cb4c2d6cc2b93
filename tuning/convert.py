"""`python -m tuning.convert`: the command lives in tuning/cli/convert.py."""

import sys

from tuning.cli import convert

if __name__ == '__main__':
  sys.exit(convert.main())
