"""`tuning` as a model backend of lm-evaluation-harness (`model='tuning'`).

    lm_eval.simple_evaluate(model='tuning',
                            model_args='checkpoint=DIR,batch_size=8', ...)

The model is whatever `python -m tuning.generate` loads (a converted
folder, a .gguf file or a causal_lm run's work directory,
tuning/cli/generate.py's `load`). Requests are scored on the device in
batches: `loglikelihood` runs each (context, continuation) once, right
padded to a multiple of 16 tokens, and sums the float32 log-softmax of the
continuation tokens inside one jitted function; `generate_until` decodes
with the KV-cache sampler (tuning/decoding/sampling.py), greedy unless the
task asks for sampling, and cuts the text at the task's stop strings as
lm-eval's `hf` backend does (its tokenization rules are mirrored too, so
the two backends score the same token ids).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as lm_utils
from lm_eval import utils as lm_eval_utils
import numpy as np

from tuning.cli import generate as generate_cli
from tuning.data import chat_template as chat_template_lib
from tuning.decoding import sampling

_BUCKET = 16


@functools.lru_cache(maxsize=None)
def _scorer(model):
  """Jitted (params, ids, mask, targets, target_mask) -> (sums, greedy)."""

  def score(params, ids, mask, targets, target_mask):
    logits = model.apply(
        {'params': params}, input_ids=ids, attention_mask=mask, train=False
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    sums = jnp.sum(jnp.where(target_mask, picked, 0.0), axis=-1)
    greedy = jnp.argmax(logp, axis=-1) == targets
    all_greedy = jnp.all(greedy | ~target_mask, axis=-1)
    return sums, all_greedy

  return jax.jit(score)


@register_model('tuning')
class TuningLM(TemplateLM):
  """lm-eval's `LM` on a tuning model; see the module docstring."""

  def __init__(
      self,
      checkpoint: str | None = None,
      batch_size: int | str = 8,
      max_length: int | None = None,
      max_gen_toks: int = 256,
      dtype: str = 'float32',
      step: str = 'best',
      loaded: Any = None,
      **unused,
  ):
    super().__init__()
    if loaded is None:
      if not checkpoint:
        raise ValueError(
            'the tuning backend needs checkpoint=: a converted model '
            "folder, a .gguf file or a causal_lm run's work directory"
        )
      loaded = generate_cli.load(checkpoint, dtype, str(step))
    self.loaded = loaded
    self.tokenizer = loaded.tokenizer
    self.checkpoint = checkpoint
    self.batch_size = 8 if batch_size in ('auto', None) else int(batch_size)
    cfg = loaded.model.config
    self._max_length = int(
        max_length or getattr(cfg, 'max_positions', None) or 2048
    )
    self.max_gen_toks = int(max_gen_toks)
    tc = loaded.tokenizer_config
    self._bos_id = self._special_id(tc.get('bos_token'))
    eos = self._special_id(tc.get('eos_token'))
    if eos is None:
      eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else loaded.pad_id
    self._eot_id = int(eos)

  def _special_id(self, token):
    if isinstance(token, dict):
      token = token.get('content')
    if not token:
      return None
    return self.tokenizer.token_to_id(token)

  # ---- what TemplateLM asks for

  @property
  def eot_token_id(self) -> int:
    return self._eot_id

  @property
  def prefix_token_id(self) -> int:
    return self._bos_id if self._bos_id is not None else self._eot_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return str(self.checkpoint).replace('/', '__')

  def chat_template(self, chat_template=False):
    return self.loaded.tokenizer_config.get('chat_template')

  def apply_chat_template(self, chat_history, add_generation_prompt=True):
    template = self.loaded.tokenizer_config.get('chat_template')
    if not template:
      raise ValueError(
          f'{self.checkpoint} has no chat template: drop '
          '--apply_chat_template'
      )
    special = {
        k: v
        for k, v in self.loaded.tokenizer_config.items()
        if k.endswith('_token') and isinstance(v, str)
    }
    return chat_template_lib.render(
        template,
        chat_history,
        add_generation_prompt=add_generation_prompt,
        **special,
    )

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    # As lm-eval's hf backend: the tokenizer's own special tokens unless
    # the text already starts with the BOS token.
    if add_special_tokens is None:
      add_special_tokens = True
      if self._bos_id is not None:
        bos = self.tokenizer.decode([self._bos_id], skip_special_tokens=False)
        if bos and string.startswith(bos):
          add_special_tokens = False
    return self.tokenizer.encode(
        string, add_special_tokens=bool(add_special_tokens)
    ).ids

  def tok_decode(self, tokens, skip_special_tokens=True):
    if isinstance(tokens, int):
      tokens = [tokens]
    return self.tokenizer.decode(
        list(tokens), skip_special_tokens=skip_special_tokens
    )

  # ---- scoring

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    """(sum of log-probabilities, greedy) per (key, context, continuation)."""
    rows = []
    for _, context, continuation in requests:
      if not continuation:
        raise ValueError('a loglikelihood request has an empty continuation')
      whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    score = _scorer(self.loaded.model)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      longest = max(len(rows[i][0]) for i in chunk)
      length = -(-longest // _BUCKET) * _BUCKET
      size = self.batch_size  # fixed batch: one compilation a length
      ids = np.full((size, length), self.loaded.pad_id, np.int32)
      targets = np.zeros((size, length), np.int32)
      mask = np.zeros((size, length), np.int32)
      target_mask = np.zeros((size, length), bool)
      for row, i in enumerate(chunk):
        inp, tgt, n = rows[i]
        ids[row, : len(inp)] = inp
        targets[row, : len(tgt)] = tgt
        mask[row, : len(inp)] = 1
        target_mask[row, len(tgt) - n : len(tgt)] = True
      mask[len(chunk) :, 0] = 1  # padding rows: no empty attention
      sums, greedy = score(self.loaded.params, ids, mask, targets, target_mask)
      sums, greedy = np.asarray(sums), np.asarray(greedy)
      for row, i in enumerate(chunk):
        out[i] = (float(sums[row]), bool(greedy[row]))
        if requests[i][0] is not None:
          self.cache_hook.add_partial('loglikelihood', requests[i][0], out[i])
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """The whole text's log-likelihood, in windows of `max_length`."""
    results = []
    for (text,) in [r.args for r in requests]:
      windows = [
          (None,) + lm_eval_utils.make_disjoint_window(w)
          for w in lm_eval_utils.get_rolling_token_windows(
              token_list=self.tok_encode(text),
              prefix_token=self.prefix_token_id,
              max_seq_len=self.max_length,
              context_len=1,
          )
      ]
      scores = self._loglikelihood_tokens(windows)
      total = sum(s for s, _ in scores)
      results.append(total)
      self.cache_hook.add_partial('loglikelihood_rolling', (text,), total)
    return results

  # ---- generation

  def generate_until(self, requests, disable_tqdm=False):
    """Continuations cut at the stop strings, in request order."""
    args = [r.args for r in requests]
    eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    out = [None] * len(args)
    groups: dict[str, list[int]] = {}
    for i, (_, gen_kwargs) in enumerate(args):
      groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
    stops = tuple(sorted(set(self.loaded.stop_tokens) | {self.eot_token_id}))
    for indices in groups.values():
      kwargs = lm_utils.normalize_gen_kwargs(
          dict(args[indices[0]][1]), self.max_gen_toks
      )
      until = lm_utils.handle_stop_sequences(kwargs.pop('until', None), eos)
      max_gen_toks = int(kwargs.pop('max_gen_toks'))
      temperature = float(kwargs.get('temperature') or 0.0)
      if not kwargs.get('do_sample'):
        temperature = 0.0
      max_ctx = self.max_length - max_gen_toks
      if max_ctx <= 0:
        raise ValueError(
            f'max_gen_toks={max_gen_toks} leaves no room for the context '
            f'in max_length={self.max_length}: lower max_gen_toks'
        )
      encoded = {i: self.tok_encode(args[i][0])[-max_ctx:] for i in indices}
      indices = sorted(indices, key=lambda i: -len(encoded[i]))
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start : start + self.batch_size]
        longest = max(len(encoded[i]) for i in chunk)
        length = -(-longest // _BUCKET) * _BUCKET
        ids = np.full((self.batch_size, length), self.loaded.pad_id, np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        mask[:, -1] = 1  # padding rows: one token
        for row, i in enumerate(chunk):
          ids[row, length - len(encoded[i]) :] = encoded[i]
          mask[row, length - len(encoded[i]) :] = 1
        result = sampling.generate(
            self.loaded.model,
            self.loaded.params,
            ids,
            mask,
            max_new_tokens=max_gen_toks,
            temperature=temperature,
            top_k=int(kwargs.get('top_k') or 0),
            top_p=float(kwargs.get('top_p') or 1.0),
            stop_tokens=stops,
            pad_id=self.loaded.pad_id,
        )
        for row, i in enumerate(chunk):
          new = result.tokens[row, : result.lengths[row]].tolist()
          text = lm_utils.postprocess_generated_text(
              self.tok_decode(new), until, None
          )
          out[i] = text
          self.cache_hook.add_partial('generate_until', args[i], text)
    return out
