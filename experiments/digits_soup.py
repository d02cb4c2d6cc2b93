"""Ensembles and model soups of fine-tuned runs (digits, offline, ~2 min).

Stages, each in WORKDIR/<stage>, compared in one table at the end:
  pretrain      the MLP on which-digit (10 classes);
  lr1, lr2, lr3 three fine-tunes of it on even/odd (all labels, head
                re-initialised with the same seed) at learning rates
                1e-4, 3e-4 and 1e-3;
  ensemble      the three evaluated together (mean probabilities, mean
                logits, majority vote; the table shows mean probabilities);
  soup          their weight average: greedy (members by validation
                accuracy, each kept if the soup does not get worse), written
                to WORKDIR/soup/checkpoints as an ordinary run checkpoint.

  python main.py --config=experiments/digits_soup.py --workdir=/tmp/soup

Prints the members' and ensembles' tables, then (seed 0, 2 CPU cores):
  test split by stage:
    stage         accuracy  macro-F1     loss  examples  val acc ...
    pretrain        0.9694    0.9670   0.1355       359   0.9514 ...
    lr1             0.9304    0.9300   0.2819       359   0.9167 ...
    lr2             0.9359    0.9356   0.1987       359   0.9236 ...
    lr3             0.9749    0.9749   0.0819       359   0.9375 ...
    ensemble        0.9554    0.9553   0.1730       359   0.9236
    soup            0.9749    0.9749   0.0819       359   0.9375
(the greedy soup kept lr3 alone; the uniform soup of all three: 0.9554.)
"""

from ml_collections import config_dict

from experiments.quickstart import EVEN_ODD
from tuning.config.defaults import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.data.source = 'digits'
  c.data.normalize = 'standard'
  c.model.name = 'mlp'
  c.model.hidden = (128, 128)
  c.model.dropout = 0.5
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  c.training.batch_size = 32
  c.training.total_steps = 600
  c.training.eval_every_steps = 100
  c.training.log_every_steps = 200

  finetunes = ('lr1', 'lr2', 'lr3')
  c.stages = ('pretrain',) + finetunes + ('ensemble', 'soup')
  target = dict(
      data=dict(classes=EVEN_ODD, class_names=('even', 'odd')),
      init=dict(checkpoint='@pretrain', reinit=('head/.*',)),
      training=dict(total_steps=300, eval_every_steps=50),
  )
  overrides = {'pretrain': {}}
  for name, lr in zip(finetunes, (1e-4, 3e-4, 1e-3)):
    overrides[name] = dict(target, optimizer=dict(learning_rate=lr))
  members = tuple('@' + name for name in finetunes)
  overrides['ensemble'] = dict(mode='ensemble', ensemble=dict(members=members))
  overrides['soup'] = dict(
      mode='soup', soup=dict(members=members, method='greedy')
  )
  c.stage_overrides = config_dict.ConfigDict(overrides)
  return c
