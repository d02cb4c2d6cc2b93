"""Data augmentation on SST-2: a BiLSTM from scratch, with and without.

Stages, each the same BiLSTM (whitespace vocabulary of the training
sentences, 128-d embeddings, 128 units each way) trained from scratch on
a fixed random `arg` (default 10,000) rows of ../shared/data/sst2/train.tsv
for the same steps, checkpointed by accuracy on dev.tsv (phrases of
training sentences), tested on GLUE's SST-2 dev set (glue_dev.tsv: full
sentences, the published figures' set):
  none     no augmentation;
  tang     Tang et al. (2019)'s rules: mask:0.1,ngram:0.25;
  eda      EDA's random deletion and swap: delete:0.1,swap:0.1;
  replace  words replaced from the training word frequencies: replace:0.1.

  python main.py --config=experiments/sst2_augment.py --workdir=workdirs/sst2_augment

Measured (2-core AMD EPYC, AVX2, shared with other jobs, 2026-12-04; 17
min for the four stages), GLUE dev accuracy (872 sentences) at the best
dev.tsv checkpoint, seeds 0 and 1 (`--config.seed=1`):

  stage     seed 0  seed 1   mean   dev.tsv (seed 0)
  none      0.7901  0.7890  0.7896  0.8426
  tang      0.7752  0.7878  0.7815  0.8450
  eda       0.7752  0.7890  0.7821  0.8408
  replace   0.7798  0.7695  0.7747  0.8460

None of the text ops helps this BiLSTM on GLUE's full sentences: each is
0.7 to 1.5 points below no augmentation on average (one standard error on
872 sentences is 1.4 points, so "no effect" is as far as two seeds go).
They do regularise: the final dev.tsv loss falls from 0.745 (none) to
0.46-0.57, and dev.tsv accuracy rises by up to 0.3 points, but dev.tsv
holds phrases of the training sentences. Tang et al. use these rules to
make a transfer set that a teacher labels (experiments/sst2_distill.py),
not as label-preserving noise, which is what this measures.
"""

import os

from ml_collections import config_dict

from experiments import minilm_sst2
from tuning.config.defaults import base_config

STAGES = {
    'none': '',
    'tang': 'mask:0.1,ngram:0.25',
    'eda': 'delete:0.1,swap:0.1',
    'replace': 'replace:0.1',
}


def get_config(arg=None):
  """`arg`: how many training sentences (default 10000)."""
  c = base_config()
  minilm_sst2.sst2_data(c.data)
  c.data.test_path = os.path.join(minilm_sst2.SST2, 'glue_dev.tsv')
  c.data.max_train_examples = int(arg or 10000)
  c.data.tokenizer = 'whitespace'
  c.data.vocab_size = 20000

  c.model.name = 'lstm'
  c.model.embed_dim = 128
  c.model.hidden = (128,)
  c.model.bidirectional = True
  c.model.dropout = 0.3

  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = 'cosine'
  c.training.batch_size = 64
  c.training.eval_batch_size = 256
  c.training.total_steps = 1500
  c.training.eval_every_steps = 300
  c.training.log_every_steps = 100
  c.checkpoint.best_metric = 'accuracy'
  c.checkpoint.best_mode = 'max'

  c.stages = tuple(STAGES)
  c.stage_overrides = config_dict.ConfigDict(
      {name: {'data': {'augment': ops}} for name, ops in STAGES.items()}
  )
  return c
