"""Multi30k German -> English: a small Transformer trained from scratch.

    python main.py --config=experiments/multi30k_de_en.py \\
        --workdir=/work/runs/multi30k

Reads ../shared/data/multi30k/{train,val}.{de,en}.gz (29,000 training and
1,014 validation pairs; no test split there, so the final "test" report is
the validation split), trains a joint BPE tokenizer (8,000 tokens) on the
training pairs (WORKDIR/tokenizer.json), and trains a 3+3-layer, 256-wide
post-norm Transformer (Marian shape, shared embeddings tied with the
output layer) with label smoothing 0.1 and an inverse-square-root
schedule (peak 1e-3, warm-up 500 steps), batches of 64 pairs of similar
lengths, 2,400 steps (5.3 epochs). Each evaluation prints the validation loss, perplexity, token
accuracy and the sacreBLEU BLEU and chrF (cased, detokenized; greedy
decoding) of the validation translations, written to
WORKDIR/translations/validation-<step>.txt; the best checkpoint is the one
with the highest BLEU.

Measured (2-core CPU, the test suite running beside it for most of the
run; 7.6M parameters): validation BLEU 10.99 / 21.34 / 30.28 / 33.79 /
34.57 / 35.22 at steps 400 / 800 / 1200 / 1600 / 2000 / 2400 (chrF 56.78
at 2400; greedy decoding), the whole command in 46 min 25 s. An earlier
run on a more loaded machine gave the same figures bitwise (79 min). Peak
resident memory 3.4 GiB; 28,998 of the 29,000 training pairs kept (2
dropped by the length-ratio filter); perplexity 7.11 at step 2400; sacreBLEU
signature nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0
(measured 2026-11-29, float32, before the dropout masks were drawn per
example in the batched model, so a run today differs slightly).

Decoding settings on the final checkpoint (`python
benchmarks/seq2seq_decoding.py --workdir=/work/runs/multi30k --beams=1,4,8`, times include
compilation):

  decoding          BLEU   chrF   sentences/s
  greedy (beam 1)   35.22  56.78  50.0
  beam 4            37.68  58.29  25.0
  beam 8            38.30  58.28  15.5

`python -m tuning.translate --checkpoint=/work/runs/multi30k --beam_size=1`
on val.de gives the same BLEU (35.2, chrF 56.8 by the `sacrebleu` command).

`get_config('quick')`: 150 steps, for a look at the loss and throughput.
"""

from tuning.config.defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.task = 'seq2seq'
  c.dtype = 'float32'

  c.data.source = 'parallel'
  c.data.path = '../shared/data/multi30k/train.{lang}.gz'
  c.data.validation_path = '../shared/data/multi30k/val.{lang}.gz'
  c.data.source_lang = 'de'
  c.data.target_lang = 'en'
  c.data.tokenizer = 'train'
  c.data.subword = 'bpe'
  c.data.vocab_size = 8000
  c.data.max_length = 64
  c.data.max_length_ratio = 3.0
  c.data.length_buckets = (16, 24, 32, 48, 64)
  # Batches of similar lengths: about 3x the examples/s of random batches.
  c.data.group_by_length = 32

  c.model.name = 'encoder_decoder'
  c.model.shape = 'marian'
  c.model.encoder_layers = 3
  c.model.decoder_layers = 3
  c.model.layers = 3
  c.model.width = 256
  c.model.heads = 4
  c.model.ffn_width = 1024
  c.model.positions = 'sinusoidal'
  c.model.max_positions = 128
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.0
  c.model.tie_embeddings = True

  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 1e-4
  c.optimizer.clip_norm = 1.0
  c.optimizer.schedule = 'rsqrt'
  c.optimizer.warmup_steps = 500

  c.training.batch_size = 64
  c.training.eval_batch_size = 256
  c.training.label_smoothing = 0.1
  c.training.total_steps = 2400
  c.training.eval_every_steps = 400
  c.training.log_every_steps = 50
  c.training.prng_impl = 'rbg'

  c.decode.beam_size = 1
  c.decode.max_length_ratio = 1.5
  c.decode.max_length_offset = 10
  c.decode.batch_size = 128

  if arg == 'quick':
    c.training.total_steps = 150
    c.training.eval_every_steps = 150
    c.optimizer.warmup_steps = 100
  return c
