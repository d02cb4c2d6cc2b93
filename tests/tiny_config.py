"""A tiny single-run config for the integration tests (seconds on a CPU).

python main.py --config=tests/tiny_config.py --workdir=/tmp/tiny
"""

from tuning.config.defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.data.source = 'digits'
  c.data.normalize = 'standard'
  c.model.name = 'mlp'
  c.model.hidden = (32, 32)
  c.model.dropout = 0.5
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.training.batch_size = 32
  c.training.total_steps = 40
  c.training.eval_every_steps = 20
  c.training.log_every_steps = 10
  if arg:  # 'k=v,k2=v2' for a few fields the tests vary
    for item in arg.split(','):
      key, value = item.split('=')
      if key == 'steps':
        c.training.total_steps = int(value)
      else:
        raise ValueError(f'unknown argument {key!r} (known: steps)')
  return c
