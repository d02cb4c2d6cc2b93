"""`python -m tuning.generate`: the command lives in tuning/cli/generate.py."""

import sys

from tuning.cli import generate

if __name__ == '__main__':
  sys.exit(generate.main())
