"""Digits MLP: one small run (seconds on a CPU), and sweeps over it.

A single run on scikit-learn's 8x8 handwritten digits (10 classes), an MLP
with one hidden layer of 32 units, 60 steps of batch 32, validated every 20:

  python main.py --config=experiments/digits_mlp.py --workdir=/tmp/digits

prints (5-15 s, most of it JAX start-up), ending with:
  validation at step 60: loss 1.1677  accuracy 0.7361  macro-F1 0.7075
  test (best checkpoint, step 60): loss 1.1190  accuracy 0.7382  macro-F1 0.6989  (359 examples)

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

The grid sweep prints a line as each trial starts and ends, then its
report (about 35 s on 2 CPU cores; the numbers vary a little by machine):

  maximize best validation accuracy; trials: 4 complete
  | rank | trial                                        | state    | learning_rate | hidden   | dropout | best val accuracy | at step | test accuracy | steps | wall time (s) | error |
  | 1    | learning_rate=0.01,hidden=32,dropout=0       | complete | 0.01          | (32,)    | 0.0     | 0.9167            | 60      | 0.9359        | 60    | 12.1          |       |
  | 2    | learning_rate=0.01,hidden=64-64,dropout=0.2  | complete | 0.01          | (64, 64) | 0.2     | 0.9097            | 60      | 0.9387        | 60    | 17.6          |       |
  | 3    | learning_rate=0.001,hidden=64-64,dropout=0.2 | complete | 0.001         | (64, 64) | 0.2     | 0.5000            | 60      | 0.6462        | 60    | 18.1          |       |
  | 4    | learning_rate=0.001,hidden=32,dropout=0      | complete | 0.001         | (32,)    | 0.0     | 0.4028            | 60      | 0.4123        | 60    | 12.1          |       |
  best: learning_rate=0.01,hidden=32,dropout=0: .../python .../main.py ...
  wrote /tmp/digits_grid/report.md, report.csv, report.png
"""

from tuning.config.defaults import base_config

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
        'zip': {'model.hidden': ((32,), (64, 64)), 'model.dropout': (0.0, 0.2)},
        'metric': 'accuracy',
    }
  space = {
      'optimizer.learning_rate': ('loguniform', 1e-4, 3e-2),
      'model.dropout': ('uniform', 0.0, 0.5),
      'model.hidden': ('choice', ((32,), (64,), (64, 64))),
  }
  if arg == 'random':
    return {'space': space, 'trials': 8, 'sampler': 'random', 'pruner': None}
  if arg == 'tpe':
    return {
        'space': space,
        'trials': 16,
        'sampler': 'tpe',
        'pruner': 'median',
        'pruner_args': {'n_startup_trials': 4, 'n_warmup_steps': 20},
    }
  raise ValueError(f'unknown sweep {arg!r} (use: {", ".join(SWEEPS)})')
