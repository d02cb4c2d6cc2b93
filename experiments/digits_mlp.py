"""Digits MLP: one small run (seconds on a CPU), and sweeps over it.

A single run on scikit-learn's 8x8 handwritten digits (10 classes), an MLP
with one hidden layer of 32 units, 60 steps of batch 32, validated every 20:

  python main.py --config=experiments/digits_mlp.py --workdir=/tmp/digits

Its sweeps, from `get_sweep(arg)` below (`:grid` is the default):

  python -m tuning.sweep --config=experiments/digits_mlp.py \\
      --workdir=/tmp/digits_grid --parallel=2
      grid: learning rate 1e-3, 1e-2 x (hidden, dropout) zipped
      ((32,), 0.0), ((64, 64), 0.2): 4 trials;
  python -m tuning.sweep --config=experiments/digits_mlp.py:random \\
      --workdir=/tmp/digits_random --parallel=2
      8 trials with random learning rate, dropout and width;
  python -m tuning.sweep --config=experiments/digits_mlp.py:tpe ...
      the same space, 16 trials chosen by TPE, median pruning.

The grid sweep prints one line per trial as it starts and ends, then its
report (about 30 s on 2 CPU cores; numbers vary with the machine):

  maximize best validation accuracy; trials: 4 complete
  | rank | trial                                     | state    | ...
  | 1    | learning_rate=0.01,hidden=64-64,dropout=0.2 | complete | ...
  ...
  best: learning_rate=0.01,...: /usr/bin/python .../main.py --config=...
  wrote /tmp/digits_grid/report.md, report.csv, report.png
"""

from tuning.defaults import base_config

SWEEPS = ('grid', 'random', 'tpe')


def get_config(arg=None):
  if arg not in (None, *SWEEPS):  # the arg names a sweep; the run is the same
    raise ValueError(f'unknown argument {arg!r} (use: {", ".join(SWEEPS)})')
  c = base_config()
  c.data.source = 'digits'
  c.data.normalize = 'standard'
  c.model.name = 'mlp'
  c.model.hidden = (32,)
  c.model.dropout = 0.0
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.training.batch_size = 32
  c.training.total_steps = 60
  c.training.eval_every_steps = 20
  c.training.log_every_steps = 20
  return c


def get_sweep(arg=None):
  if arg in (None, 'grid'):
    return {
        'grid': {'optimizer.learning_rate': (1e-3, 1e-2)},
        'zip': {'model.hidden': ((32,), (64, 64)),
                'model.dropout': (0.0, 0.2)},
        'metric': 'accuracy',
    }
  space = {
      'optimizer.learning_rate': ('loguniform', 1e-4, 3e-2),
      'model.dropout': ('uniform', 0.0, 0.5),
      'model.hidden': ('choice', ((32,), (64,), (64, 64))),
  }
  if arg == 'random':
    return {'space': space, 'trials': 8, 'sampler': 'random',
            'pruner': None}
  if arg == 'tpe':
    return {'space': space, 'trials': 16, 'sampler': 'tpe',
            'pruner': 'median',
            'pruner_args': {'n_startup_trials': 4, 'n_warmup_steps': 20}}
  raise ValueError(f'unknown sweep {arg!r} (use: {", ".join(SWEEPS)})')
