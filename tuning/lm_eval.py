"""`python -m tuning.lm_eval`: the command lives in tuning/cli/lm_eval.py."""

import sys

from tuning.cli import lm_eval

if __name__ == '__main__':
  sys.exit(lm_eval.main())
