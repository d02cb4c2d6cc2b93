"""`python -m tuning.generate`: the command lives in tuning/cli/generate.py."""

from absl import app

from tuning.cli import generate

if __name__ == '__main__':
  app.run(generate.main)
