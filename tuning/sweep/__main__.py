"""`python -m tuning.sweep`: the command lives in tuning/cli/sweep.py."""

import sys

from tuning.cli import sweep

if __name__ == '__main__':
  sys.exit(sweep.main())
