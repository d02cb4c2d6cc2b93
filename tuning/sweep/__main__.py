"""`python -m tuning.sweep`: the command lives in tuning/sweep/runner.py."""

import sys

from tuning.sweep import runner

if __name__ == '__main__':
  sys.exit(runner.main(sys.argv[1:]))
