"""Decoding settings of a finished seq2seq run on its validation split.

  python benchmarks/seq2seq_decoding.py --workdir=/work/runs/multi30k \\
      [--beams=1,4,8] [--length_penalty=1.0] [--checkpoint=best] [--passes=1]

Loads WORKDIR/config.json, WORKDIR/tokenizer.json and the chosen
checkpoint, translates every validation source with each beam size (1 is
greedy decoding; the run's `config.decode` length limits), and prints a
markdown table: sacreBLEU BLEU and chrF (cased, detokenized) and
sentences/s. Sentences/s is that of the last of `--passes` passes (1: the
pass also compiles each source-length shape; 2: compiled already).
"""

import argparse
import json
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from tuning.config.defaults import merged_onto_defaults
from tuning.engine.run import Run
from tuning.multirun import finished_run
from tuning.tasks import seq2seq


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--beams', default='1,4,8')
  parser.add_argument('--length_penalty', type=float, default=1.0)
  parser.add_argument('--checkpoint', default='best')
  parser.add_argument('--passes', type=int, default=1)
  args = parser.parse_args()
  with open(os.path.join(args.workdir, 'config.json'), encoding='utf-8') as f:
    config = merged_onto_defaults(json.load(f))
  run = Run(config, args.workdir)
  try:
    params, step = finished_run.restore_run(
        run,
        int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint,
        setting='--checkpoint',
        where='--workdir',
    )
  finally:
    run.checkpoints.close()
  data, decode = run.data, config.decode
  table = data.validation
  sources = [
      [int(t) for t in ids[mask > 0]]
      for ids, mask in zip(table['input_ids'], table['attention_mask'])
  ]
  references = data.raw['validation']['target']
  print(
      f'{args.workdir}, {args.checkpoint} checkpoint (step {step}), '
      f'{len(sources)} validation sentences, length limit '
      f'{decode.max_length_ratio} x source + {decode.max_length_offset}, '
      f'length penalty {args.length_penalty}'
  )
  rows = []
  for beam in (int(b) for b in args.beams.split(',')):
    for _ in range(args.passes):
      start = time.time()
      out = seq2seq.translate_ids(
          run.model,
          params,
          sources,
          types.SimpleNamespace(
              **{
                  **decode.to_dict(),
                  'beam_size': beam,
                  'length_penalty': args.length_penalty,
              }
          ),
      )
      seconds = time.time() - start
    hypotheses = data.tokenizer.decode_batch(out, skip_special_tokens=True)
    bleu, chrf, signature, _ = seq2seq.corpus_scores(hypotheses, references)
    name = 'greedy (beam 1)' if beam == 1 else f'beam {beam}'
    rows.append(
        f'| {name} | {bleu.score:.2f} | {chrf.score:.2f} | '
        f'{len(sources) / seconds:.1f} | {seconds:.0f} |'
    )
    print(rows[-1], flush=True)
  print(f'\nBLEU signature: {signature}\n')
  print('| decoding | BLEU | chrF | sentences/s | seconds |')
  print('|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
