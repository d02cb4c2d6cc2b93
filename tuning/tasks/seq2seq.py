"""Sequence-to-sequence (translation): teacher-forced cross-entropy, BLEU.

An encoder-decoder (`config.model.name=encoder_decoder|marian|t5`, built
from `config.model` fields and the tokenizer's vocabulary size, or from
`model.hf_config`) reads a source and, teacher-forced, the target shifted
right behind the decoder start token (the pad token), and predicts each
target token and the end-of-sentence token. The training loss is the
float32 cross-entropy against targets smoothed by
`config.training.label_smoothing` (eps: (1 - eps) on the target, eps
spread uniformly over the vocabulary), summed over the real target tokens
and divided by their count in the whole global batch (like causal_lm).
Validation adds up on the device each row's plain (unsmoothed) loss,
target tokens and correctly predicted tokens: loss, perplexity and token
accuracy. At every evaluation the split's sources are also translated on
the device (`translate_ids`: greedy or beam search, `config.decode`,
batched by length), detokenized and scored with sacreBLEU (cased,
detokenized `corpus_bleu` and `corpus_chrf`; the signature is printed
once): `bleu` and `chrf` are validation scalars, `bleu` (max) is the
default best checkpoint metric, and the translations are written, one line
per source line in file order, to WORKDIR/translations/<split>-<step>.txt.

Data: tuning/data/parallel.py (line-aligned files, TSV/JSONL columns,
training-only length and ratio filters, the tokenizer).

Contract of a finished seq2seq work directory (for `python -m
tuning.translate` and other tools):
- WORKDIR/config.json is the run's config; `data.tokenizer` is a
  tokenizer.json path (or its folder), or 'train'/unset, which means
  WORKDIR/tokenizer.json (`parallel.resolve_tokenizer_path(config.data,
  workdir)` resolves both); results.json records the path as `tokenizer`.
- WORKDIR/tokenizer.json has the specials <pad>=0, </s>=1, <unk>=2, <s>=3
  when trained here; sources end with </s>; the decoder starts from <pad>.
- The model is `build_model(config.model, config.dtype, vocab_size=
  tokenizer.get_vocab_size())` (tuning/models/registry.py), its
  parameters in WORKDIR/checkpoints as for every task.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from tuning.terminal import console
from tuning.decoding import translation
from tuning.data import parallel
from tuning.models import encoder_decoder_hf
from tuning.tasks import base

_INPUTS = ('input_ids', 'attention_mask', 'decoder_input_ids')


def token_losses(logits, targets, mask, label_smoothing: float = 0.0):
  """(per-token smoothed loss, plain loss, correct) [rows, length] float32,
  zero where `mask` is 0.

  With eps = label_smoothing the smoothed loss is the cross-entropy
  against (1 - eps) * onehot(target) + eps / vocab: (1 - eps) * nll +
  eps * (logsumexp - mean of the logits).
  """
  mask = mask.astype(jnp.float32)
  nll, lse, correct = base.token_cross_entropy(logits, targets)
  smoothed = nll
  if label_smoothing:
    eps = float(label_smoothing)
    mean = logits.astype(jnp.float32).mean(axis=-1)
    smoothed = (1.0 - eps) * nll + eps * (lse - mean)
  return smoothed * mask, nll * mask, correct * mask


def translate_ids(model, params, sources: list, decode) -> list[list[int]]:
  """Translations (token ids before EOS) of token-id `sources` (each ending
  with EOS), in their order, decoded with `config.decode`'s settings by the
  shared `tuning.translation.translate_ids` (sorted by length, batched,
  greedy for beam size 1, beam search otherwise, on the device)."""
  options = translation.DecodeOptions(
      beam_size=int(decode.beam_size),
      length_penalty=float(decode.length_penalty),
      max_length_ratio=float(decode.max_length_ratio),
      max_length_offset=int(decode.max_length_offset),
      batch_size=int(decode.batch_size),
  )
  return translation.translate_ids(model, params, sources, options).tokens


def corpus_scores(hypotheses: list[str], references: list[str]):
  """(BLEU, chrF) sacreBLEU metric objects' corpus scores and signatures:
  cased, detokenized (13a tokenization inside BLEU)."""
  from sacrebleu.metrics import BLEU  # pylint: disable=g-import-not-at-top
  from sacrebleu.metrics import CHRF  # pylint: disable=g-import-not-at-top

  bleu, chrf = BLEU(), CHRF()
  return (
      bleu.corpus_score(hypotheses, [references]),
      chrf.corpus_score(hypotheses, [references]),
      str(bleu.get_signature()),
      str(chrf.get_signature()),
  )


class Seq2Seq(base.Task):
  """Teacher-forced translation; the target vocabulary is the output."""

  name = 'seq2seq'
  labels = None
  best_metric = 'bleu'
  best_mode = 'max'
  table_columns = (
      ('BLEU', 'bleu', 7, '.2f'),
      ('chrF', 'chrf', 7, '.2f'),
      ('ppl', 'perplexity', 9, '.3f'),
      ('tok acc', 'token_accuracy', 8, '.4f'),
  )
  validation_column = ('val BLEU', 'bleu', 8, '.2f')

  def __init__(self, config, data):
    super().__init__(config, data)
    self._signature_shown = False
    self.signatures = {}
    self.label_smoothing = float(config.training.label_smoothing)
    if jax.process_count() > 1:
      raise ValueError(
          'config.task=seq2seq translates the validation split on one host '
          '(BLEU): run it as one process (any number of local devices)'
      )
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(
          f'config.training.label_smoothing={self.label_smoothing}: use a '
          'value in [0, 1)'
      )

  @staticmethod
  def build_data(config, workdir):
    """The parallel datasets (tuning/data/parallel.py)."""
    return parallel.build_parallel_datasets(config.data, workdir)

  def model_dims(self):
    model = self.config.model
    if model.name not in encoder_decoder_hf.FAMILY.names:
      raise ValueError(
          f'config.task=seq2seq needs an encoder-decoder, not '
          f'config.model.name={model.name!r}: use one of '
          f'{", ".join(encoder_decoder_hf.FAMILY.names)}'
      )
    specials = self.data.specials
    if not model.hf_config:
      # pad_id, eos_id, decoder_start_id: not base_config() fields, but an
      # experiment's own model fields (absent: these defaults).
      wanted = {
          'pad_id': specials.pad,
          'eos_id': specials.eos,
          'decoder_start_id': parallel.decoder_start(specials),
      }
      defaults = {'pad_id': 0, 'eos_id': 1}
      defaults['decoder_start_id'] = model.get('pad_id', 0) or 0
      for field, value in wanted.items():
        got = model.get(field, None)
        got = defaults[field] if got is None else got
        if got != value:
          raise ValueError(
              f'config.model.{field}={got} differs from the tokenizer '
              f'({self.data.tokenizer_path}: {value}); set it to {value}'
          )
    return {'num_outputs': None, 'vocab_size': self.data.streamed_vocab_size}

  @staticmethod
  def inputs(batch):
    return {
        **{k: batch[k] for k in _INPUTS},
        'decoder_attention_mask': batch['target_mask'],
    }

  def loss(self, outputs, batch):
    smoothed, _, correct = token_losses(
        outputs, batch['target_ids'], batch['target_mask'], self.label_smoothing
    )
    return smoothed.sum(), {'token_accuracy': correct.sum()}

  @staticmethod
  def loss_weight(batch):
    return batch['target_mask'].astype(jnp.float32).sum()

  def eval_rows(self, outputs, batch):
    _, nll, correct = token_losses(
        outputs, batch['target_ids'], batch['target_mask']
    )
    return base.token_rows(nll, batch['target_mask'], correct, batch['weight'])

  def metrics(self, totals):
    return base.token_metrics(totals)

  def scalars(self, metrics):
    keys = ('bleu', 'chrf', 'loss', 'perplexity', 'token_accuracy')
    return {k: metrics[k] for k in keys if k in metrics}

  def host_metrics(self, model, params, split: str, step=None):
    """Translates the split's sources; sacreBLEU BLEU and chrF; writes
    WORKDIR/translations/<split>-<step>.txt (see the module docstring)."""
    decode = self.config.decode
    tokenizer, specials = self.data.tokenizer, self.data.specials
    raw = self.data.raw[split]
    table = self.data.split(split)
    sources = [
        [int(t) for t in ids[mask > 0]]
        for ids, mask in zip(table['input_ids'], table['attention_mask'])
    ]
    start = time.time()
    out = translate_ids(model, params, sources, decode)
    hypotheses = tokenizer.decode_batch(out, skip_special_tokens=True)
    seconds = time.time() - start
    bleu, chrf, bleu_sig, chrf_sig = corpus_scores(hypotheses, raw['target'])
    self.signatures = {'bleu': bleu_sig, 'chrf': chrf_sig}
    if not self._signature_shown:
      console.info(f'sacreBLEU signatures: BLEU {bleu_sig}; chrF {chrf_sig}')
      self._signature_shown = True
    workdir = getattr(self, 'workdir', None)
    if workdir and jax.process_index() == 0:
      folder = os.path.join(workdir, 'translations')
      os.makedirs(folder, exist_ok=True)
      name = f'{split}-{step}.txt' if step is not None else f'{split}.txt'
      with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
        for line in hypotheses:
          f.write(line.replace('\n', ' ') + '\n')
    return {
        'bleu': float(bleu.score),
        'chrf': float(chrf.score),
        'decode_sentences_per_s': len(sources) / max(seconds, 1e-9),
    }

  def results(self):
    decode = self.config.decode
    return {
        'task': self.name,
        'tokenizer': getattr(self.data, 'tokenizer_path', None),
        'sacrebleu_signatures': self.signatures,
        'decode': {
            'beam_size': decode.beam_size,
            'length_penalty': decode.length_penalty,
            'max_length_ratio': decode.max_length_ratio,
            'max_length_offset': decode.max_length_offset,
        },
    }

  def report(self, metrics, title):
    bleu = (
        f'BLEU {metrics["bleu"]:.2f}  chrF {metrics["chrf"]:.2f}  '
        if 'bleu' in metrics
        else ''
    )
    return (
        f'{title}: {bleu}loss {metrics["loss"]:.4f}  perplexity '
        f'{metrics["perplexity"]:.3f}  token accuracy '
        f'{metrics["token_accuracy"]:.4f}  ({metrics["tokens"]} tokens, '
        f'{metrics["examples"]} examples)'
    )


TASK = Seq2Seq
