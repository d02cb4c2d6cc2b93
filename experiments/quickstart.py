"""Quickstart: pretrain -> fine-tune with few labels -> compare with scratch.

On scikit-learn's handwritten digits (1,797 real 8x8 images, offline):
  pretrain  the MLP on the source task: which digit (10 classes, all labels);
  finetune  it on the target task: is the digit even or odd, from only
            5 labelled images per class, with the head re-initialised;
  scratch   the same model on the same 10 labels, from random init.
Each stage runs in WORKDIR/<stage>; one table compares them on the test
split (the same held-out images for every stage).

  python main.py                       # this config, ./workdirs/quickstart
  python main.py --config=experiments/quickstart.py --workdir=/tmp/qs \\
      --config.seed=1 --config.stage_overrides.finetune.data.examples_per_class=10

Prints at the end (one run, seed 0, about a minute on 2 CPU cores):
  test split by stage:
    stage         accuracy  macro-F1     loss  examples  val acc  parameters  eval ex/s
    pretrain        0.9721    0.9710   0.1477       359   0.9306      26,122  ...
    finetune        0.8412    0.8405   0.3783       359   0.8681      25,090  ...
    scratch         0.7354    0.7327   0.7867       359   0.7847      25,090  ...
"""

from ml_collections import config_dict

from tuning.config.defaults import base_config

EVEN_ODD = ((0, 2, 4, 6, 8), (1, 3, 5, 7, 9))


def get_config(arg=None):
  del arg
  c = base_config()
  c.data.source = 'digits'
  c.model.name = 'mlp'
  c.model.hidden = (128, 128)
  c.model.dropout = 0.5
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  c.training.batch_size = 32
  c.training.log_every_steps = 100

  c.stages = ('pretrain', 'finetune', 'scratch')
  target = dict(
      data=dict(
          classes=EVEN_ODD, class_names=('even', 'odd'), examples_per_class=5
      ),
      optimizer=dict(learning_rate=3e-4),
      training=dict(batch_size=10, total_steps=300, eval_every_steps=50),
  )
  c.stage_overrides = config_dict.ConfigDict(
      {
          'pretrain': dict(
              training=dict(total_steps=600, eval_every_steps=100)
          ),
          'finetune': dict(
              target, init=dict(checkpoint='@pretrain', reinit=('head/.*',))
          ),
          'scratch': target,
      }
  )
  return c
