"""`python -m tuning.data.to_records`: the command lives in
tuning/cli/to_records.py."""

import sys

from tuning.cli import to_records

if __name__ == '__main__':
  sys.exit(to_records.main())
