"""`python -m tuning.data.to_records`: the command lives in
tuning/cli/to_records.py."""

from absl import app

from tuning.cli import to_records

if __name__ == '__main__':
  app.run(to_records.main)
