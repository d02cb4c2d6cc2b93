"""The export round trip on a real run: transformers and PEFT on what
`python -m tuning.export` wrote give the greedy captions that
`python -m tuning.generate` gives on the run.

  W=/path/to/smollm2_multi30k_lora_workdir; R=/tmp/rt
  python main.py --config=experiments/smollm2_multi30k.py:lora --workdir=$W
  python -m tuning.generate --checkpoint=$W/lora \\
      --prompts=benchmarks/export_prompts.txt --nochat --max_new_tokens=24 --output=$R/tuning.jsonl
  python -m tuning.export --checkpoint=$W/lora --format=hf --out=$R/hf
  python -m tuning.export --checkpoint=$W/lora --format=gguf --quant=q8_0 \\
      --out=$R/gguf
  python -m tuning.export --checkpoint=$W/lora --format=peft --out=$R/peft
  python -m tuning.export --checkpoint=CONVERTED_BASE --format=hf --out=$R/base
  python benchmarks/export_round_trip.py --dir=$R

(CONVERTED_BASE: the folder the run's init.checkpoint names, the converted
GGUF file.) Prints, per prompt, whether each reader's greedy caption equals
tuning's; measured on 2026-12-03 (2-core AMD EPYC, AVX2): docs/export.md.
"""

import json
import os
import sys

from absl import app
from absl import flags

_DIR = flags.DEFINE_string('dir', None, 'The folder of the exports.')
_MAX_NEW = 24


def _greedy(model, tokenizer, prompt):
  ids = tokenizer(prompt, return_tensors='pt')
  out = model.generate(
      **ids,
      max_new_tokens=_MAX_NEW,
      do_sample=False,
      eos_token_id=tokenizer.convert_tokens_to_ids('<|im_end|>'),
      pad_token_id=0,
  )
  return tokenizer.decode(
      out[0, ids['input_ids'].shape[1] :], skip_special_tokens=True
  )


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import peft
  import torch
  import transformers
  # pylint: enable=g-import-not-at-top

  root = _DIR.value
  with open(os.path.join(root, 'tuning.jsonl'), encoding='utf-8') as f:
    ours = {r['prompt']: r['completion'] for r in map(json.loads, f)}
  auto = transformers.AutoModelForCausalLM
  readers = {
      'hf': lambda: (
          auto.from_pretrained(f'{root}/hf', dtype=torch.float32),
          transformers.AutoTokenizer.from_pretrained(f'{root}/hf'),
      ),
      'gguf q8_0': lambda: (
          auto.from_pretrained(
              f'{root}/gguf', gguf_file='model-q8_0.gguf', dtype=torch.float32
          ),
          transformers.AutoTokenizer.from_pretrained(
              f'{root}/gguf', gguf_file='model-q8_0.gguf'
          ),
      ),
      'peft': lambda: (
          peft.PeftModel.from_pretrained(
              auto.from_pretrained(f'{root}/base', dtype=torch.float32),
              f'{root}/peft',
          ),
          transformers.AutoTokenizer.from_pretrained(f'{root}/base'),
      ),
  }
  for name, read in readers.items():
    model, tokenizer = read()
    model.eval()
    same = 0
    for prompt, expected in ours.items():
      text = _greedy(model, tokenizer, prompt)
      same += text == expected
      verdict = 'same' if text == expected else f'differs: {text!r}'
      print(f'{name:10s} {prompt!r:26s} {verdict}')
    print(f'{name}: {same}/{len(ours)} greedy captions equal tuning.generate')
  return 0


if __name__ == '__main__':
  flags.mark_flag_as_required('dir')
  sys.exit(app.run(main))
