"""`python -m tuning.translate`: the command lives in tuning/cli/translate.py."""

import sys

from tuning.cli import translate

if __name__ == '__main__':
  sys.exit(translate.main())
