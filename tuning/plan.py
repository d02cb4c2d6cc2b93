"""`python -m tuning.plan`: the command lives in tuning/cli/plan.py."""

import sys

from tuning.cli import plan

if __name__ == '__main__':
  sys.exit(plan.main())
