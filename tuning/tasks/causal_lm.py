"""Causal language modelling: next-token cross-entropy on text or
instruction data.

A decoder (`config.model.name=llama|gpt2|decoder`) reads `input_ids` and
`attention_mask` (right padding) and predicts each next token; the loss is
the float32 cross-entropy summed over the target tokens, divided by their
count over the whole global batch (so rows weigh by their tokens, across
micro-batches and devices). Token t + 1 is a target of position t when
`loss_mask[t + 1] == 1` (the column, aligned with `input_ids`, that
instruction data carries: 1 on response tokens only, see
`tuning.data.instructions`), else when `attention_mask[t + 1] == 1` (plain
text: every real token but the first). Packed rows also carry
`segment_ids` and `positions`, which the decoder takes (attention within
each document); a target in another segment than its position's is never
counted. Evaluation adds up, on the device, each row's loss sum, its
predicted tokens and its correctly predicted tokens: per-token loss,
perplexity = exp(loss) and token accuracy come from those sums (over
response tokens only, for instruction data). The text is one document a
row (`data.text_column` of a CSV/JSONL file), tokenized by the pretrained
tokenizer `data.tokenizer` (each document that fits in `data.max_length`
ends with the end-of-text token the model folder names) and right-padded;
or instruction rows (`data.prompt_column`/`response_column`, or
`data.messages_column`); no label column is read.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np

from tuning.models import decoder_hf
from tuning.tasks import base

# The columns a decoder takes (others, e.g. token_type_ids, are dropped);
# the last two only where the rows are packed.
_INPUTS = ('input_ids', 'attention_mask', 'positions', 'segment_ids')


def target_mask(batch):
  """1.0 where token t + 1 is a target of position t: [rows, length - 1]."""
  mask = batch.get('loss_mask', batch['attention_mask'])[:, 1:] > 0
  if 'segment_ids' in batch:  # never across documents
    seg = batch['segment_ids']
    mask &= seg[:, 1:] == seg[:, :-1]
  return mask.astype(jnp.float32)


def _token_terms(logits, batch):
  """(per-token loss, correct, mask) [rows, length - 1], float32."""
  logits = logits[:, :-1]
  targets = batch['input_ids'][:, 1:]
  mask = target_mask(batch)
  losses, _, correct = base.token_cross_entropy(logits, targets)
  return losses * mask, correct * mask, mask


class CausalLM(base.Task):
  """Next-token prediction; the decoder's vocabulary is the output."""

  name = 'causal_lm'
  labels = None
  append_eos = True
  best_metric = 'loss'
  best_mode = 'min'
  table_columns = (
      ('ppl', 'perplexity', 10, '.3f'),
      ('tok acc', 'token_accuracy', 8, '.4f'),
      ('loss', 'loss', 8, '.4f'),
      ('tokens', 'tokens', 9, 'd'),
  )
  validation_column = ('val ppl', 'perplexity', 10, '.3f')

  def model_dims(self):
    name = self.config.model.name
    if name not in decoder_hf.FAMILY.names:
      raise ValueError(
          f'config.task=causal_lm needs a decoder, not config.model.name='
          f'{name!r}: use one of {", ".join(decoder_hf.FAMILY.names)}'
      )
    return {'num_outputs': None, 'vocab_size': None}

  @staticmethod
  def inputs(batch):
    return {k: batch[k] for k in _INPUTS if k in batch}

  @staticmethod
  def loss(outputs, batch):
    losses, correct, _ = _token_terms(outputs, batch)
    return losses.sum(), {'token_accuracy': correct.sum()}

  @staticmethod
  def loss_weight(batch):
    return target_mask(batch).sum()

  def eval_rows(self, outputs, batch):
    losses, correct, mask = _token_terms(outputs, batch)
    return base.token_rows(losses, mask, correct, batch['weight'])

  def metrics(self, totals):
    return base.token_metrics(totals)

  def scalars(self, metrics):
    return {k: metrics[k] for k in ('loss', 'perplexity', 'token_accuracy')}

  def samples(self, model, params):
    """Greedy continuations of the first `training.samples` validation
    rows (also kept for results.json): of their prompts (the tokens before
    the first response token) for instruction data, else of the first
    halves of their (first) documents."""
    from tuning.decoding import sampling as generation  # pylint: disable=g-import-not-at-top
    from tuning.data import tokenization  # pylint: disable=g-import-not-at-top

    count = self.config.training.samples
    table = self.data.split('validation')
    prompts = []
    for row in range(min(count, len(table['input_ids']))):
      keep = table['attention_mask'][row] > 0
      if 'segment_ids' in table:
        keep &= table['segment_ids'][row] == 1
      real = table['input_ids'][row][keep]
      cut = max(len(real) // 2, 1)
      if 'loss_mask' in table:
        targets = np.flatnonzero(table['loss_mask'][row][keep][1:])
        cut = int(targets[0]) + 1 if len(targets) else cut
      prompts.append(real[:cut])
    if not prompts:
      return []
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padded
      ids[row, width - len(prompt) :] = prompt
      mask[row, width - len(prompt) :] = 1
    eos = getattr(model.config, 'eos_token_ids', ()) or ()
    out = generation.generate(
        model,
        params,
        ids,
        mask,
        max_new_tokens=self.config.training.sample_tokens,
        stop_tokens=tuple(eos),
    )
    tokenizer = tokenization.load_tokenizer(self.config.data.tokenizer)
    self.last_samples = [
        {
            'prompt': tokenizer.decode([int(t) for t in prompt]),
            'continuation': tokenizer.decode(
                [int(t) for t in out.tokens[row, : out.lengths[row]]]
            ),
        }
        for row, prompt in enumerate(prompts)
    ]
    return self.last_samples

  def results(self):
    samples = getattr(self, 'last_samples', None)
    return {'task': self.name, **({'samples': samples} if samples else {})}

  def report(self, metrics, title):
    return (
        f'{title}: loss {metrics["loss"]:.4f}  perplexity '
        f'{metrics["perplexity"]:.3f}  token accuracy '
        f'{metrics["token_accuracy"]:.4f}  ({metrics["tokens"]} tokens, '
        f'{metrics["examples"]} examples)'
    )


TASK = CausalLM
