"""Preference pairs (DPO and friends): reading, the HH-RLHF split and
tokenization with a loss mask on the reply tokens.

Rows (JSON Lines, optionally gzipped) come in two shapes:

  * whole dialogues, as HH-RLHF ships them: `chosen` and `rejected` are
    "\\n\\nHuman: ... \\n\\nAssistant: ..." texts sharing every turn but the
    last reply; `split_dialogues` cuts them at the last common
    "\\n\\nAssistant:": prompt = the shared prefix through it, chosen and
    rejected = the two replies;
  * explicit `prompt`, `chosen` and `rejected` columns.

A malformed row (not JSON, a column missing or not a string), a pair whose
chosen == rejected, or a dialogue pair with no common prompt is a one-line
`file:line` error; with on_bad_rows='drop' it is dropped and counted.
`encode_pairs` tokenizes prompt + reply (through the chat template where
one is given, else the raw text followed by end-of-text), masks the reply
tokens (`*_loss_mask`), cuts each sequence longer than max_length (the
prompt's first tokens first, as TRL's keep_end, then the reply's end) and
counts the pairs cut. `build_preference_datasets` reads config.data's
files into the three splits.
"""

from __future__ import annotations

import gzip
import json
import re

import numpy as np

from tuning.data import chat_template
from tuning.data import instructions
from tuning.data.datasets import Datasets
from tuning.data.tables import DataError

ASSISTANT = '\n\nAssistant:'
HUMAN = '\n\nHuman:'


def split_dialogues(chosen: str, rejected: str, where: str):
  """(prompt, chosen reply, rejected reply) of two HH-RLHF dialogues."""
  common = 0
  for a, b in zip(chosen, rejected):
    if a != b:
      break
    common += 1
  cut = chosen.rfind(ASSISTANT, 0, common + 1)
  # The cut must lie inside the shared prefix (the marker itself shared).
  while cut >= 0 and cut + len(ASSISTANT) > common:
    cut = chosen.rfind(ASSISTANT, 0, cut)
  if cut < 0:
    raise ValueError(
        f'{where}: chosen and rejected share no prompt (no common '
        f'"\\n\\nAssistant:" turn); give explicit prompt/chosen/rejected '
        'columns or fix the row'
    )
  end = cut + len(ASSISTANT)
  return chosen[:end], chosen[end:], rejected[end:]


def _check_pair(row, where: str) -> dict:
  if not isinstance(row, dict):
    raise ValueError(f'{where}: a row must be a JSON object, not {row!r:.40}')
  for column in ('chosen', 'rejected'):
    if not isinstance(row.get(column), str):
      raise ValueError(
          f'{where}: column {column!r} is missing or not a string; each row '
          'needs chosen and rejected texts (and optionally prompt)'
      )
  if 'prompt' in row:
    if not isinstance(row['prompt'], str):
      raise ValueError(f'{where}: column "prompt" must be a string')
    prompt, chosen, rejected = row['prompt'], row['chosen'], row['rejected']
  else:
    if row['chosen'] == row['rejected']:
      raise ValueError(
          f'{where}: chosen == rejected: the pair prefers nothing; drop it'
      )
    prompt, chosen, rejected = split_dialogues(
        row['chosen'], row['rejected'], where
    )
  if chosen == rejected:
    raise ValueError(
        f'{where}: chosen == rejected: the pair prefers nothing; drop it'
    )
  return {'prompt': prompt, 'chosen': chosen, 'rejected': rejected}


def read_pairs(path: str, on_bad_rows: str = 'error'):
  """([{prompt, chosen, rejected, where}], dropped count) of a JSON Lines
  file (.gz read as gzip). on_bad_rows: 'error' or 'drop'."""
  if on_bad_rows not in ('error', 'drop'):
    raise ValueError(f'on_bad_rows={on_bad_rows!r}: use one of error, drop')
  opener = gzip.open if path.endswith('.gz') else open
  pairs, dropped = [], 0
  with opener(path, 'rt', encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{where}: not JSON ({e.msg})') from None
        pairs.append({**_check_pair(row, where), 'where': where})
      except ValueError:
        if on_bad_rows == 'error':
          raise
        dropped += 1
  return pairs, dropped


def hh_messages(prompt: str) -> list[dict]:
  """An HH prompt ("\\n\\nHuman: ...\\n\\nAssistant:") as chat messages;
  text without the markers is one user message."""
  parts = re.split(r'\n\n(Human|Assistant):', prompt)
  if len(parts) == 1:
    return [{'role': 'user', 'content': prompt.strip()}]
  messages = []
  for speaker, text in zip(parts[1::2], parts[2::2]):
    text = text.strip()
    if speaker == 'Assistant' and not text:
      continue  # the generation prompt
    messages.append(
        {'role': 'user' if speaker == 'Human' else 'assistant', 'content': text}
    )
  return messages


def _texts(pair: dict, reply: str, template: str | None, special: dict):
  """(full text, index where the reply starts)."""
  if template is None:
    return pair['prompt'] + reply, len(pair['prompt'])
  messages = hh_messages(pair['prompt'])
  before = chat_template.render(
      template, messages, add_generation_prompt=True, **special
  )
  full = chat_template.render(
      template,
      messages + [{'role': 'assistant', 'content': reply.strip()}],
      add_generation_prompt=False,
      **special,
  )
  if not full.startswith(before):
    raise ValueError(
        f"{pair['where']}: the chat template does not render the reply "
        'after the prompt; use a template that renders each turn after '
        'the previous ones'
    )
  return full, len(before)


def encode_pairs(
    pairs,
    tokenizer,
    max_length: int,
    *,
    eos_id: int | None = None,
    template: str | None = None,
    special_tokens: dict | None = None,
):
  """Token columns of preference pairs and the number of pairs cut.

  `tokenizer.encode(text, add_special_tokens=...)` gives `.ids` and
  `.offsets` (a `tokenizers` tokenizer). Columns, [pairs, max_length]
  int32, right-padded: chosen_/rejected_ input_ids, attention_mask and
  loss_mask (1 on reply tokens, and on end-of-text without a template).
  A sequence longer than max_length loses its prompt's first tokens (all
  but one), then its reply's last ones; a pair of which a reply keeps no
  token is an error.
  """
  special = special_tokens or {}
  out = {
      f'{side}_{name}': np.zeros((len(pairs), max_length), np.int32)
      for side in ('chosen', 'rejected')
      for name in ('input_ids', 'attention_mask', 'loss_mask')
  }
  cut = 0
  for row, pair in enumerate(pairs):
    was_cut = False
    for side in ('chosen', 'rejected'):
      text, start = _texts(pair, pair[side], template, special)
      enc = tokenizer.encode(text, add_special_tokens=template is None)
      ids = list(enc.ids)
      mask = [int(a >= start and b > a) for a, b in enc.offsets]
      if template is None and eos_id is not None:
        ids.append(eos_id)
        mask.append(1)
      if len(ids) > max_length:
        # As TRL's truncation_mode='keep_end': the prompt loses its first
        # tokens (keeping one before the reply), then the reply its last.
        was_cut = True
        first = mask.index(1) if 1 in mask else len(mask)
        drop = min(len(ids) - max_length, max(first - 1, 0))
        ids, mask = ids[drop:][:max_length], mask[drop:][:max_length]
      if not any(mask):
        raise ValueError(
            f"{pair['where']}: no {side} reply token fits in "
            f'max_length={max_length}; raise data.max_length or drop the row'
        )
      n = len(ids)
      out[f'{side}_input_ids'][row, :n] = ids
      out[f'{side}_attention_mask'][row, :n] = 1
      out[f'{side}_loss_mask'][row, :n] = mask
    cut += was_cut
  return out, cut


_SPLIT_SEED = 20240601  # the carve of tuning/data/datasets.py


def _carve(pairs, fraction: float, name: str, log):
  """(carved, rest): a seeded `fraction` of `pairs`, both in file order."""
  n = len(pairs)
  count = int(round(n * fraction))
  if not 0 < count < n:
    raise DataError(
        f'cannot carve a {name} split of fraction {fraction} from {n} '
        f'training pairs (config.data.{name}_fraction, or set '
        f'config.data.{name}_path)'
    )
  order = np.random.default_rng(_SPLIT_SEED).permutation(n)
  carved, rest = np.sort(order[:count]), np.sort(order[count:])
  log.append(f'{name}: carved {count} of {n} training pairs')
  return [pairs[i] for i in carved], [pairs[i] for i in rest]


def build_preference_datasets(data_config) -> Datasets:
  """Train/validation/test pair tables of config.data: `path` (and
  `validation_path`, `test_path`; missing ones are carved from train,
  test first, by `test_fraction`/`validation_fraction`), tokenized by
  `tokenizer` (through its chat template when it has one and
  `use_chat_template`), `max_length` tokens a sequence;
  `max_train_examples`/`max_validation_examples` keep the first pairs."""
  if not data_config.path:
    raise DataError(
        'config.task=preference reads pairs from config.data.path (JSON '
        'Lines with chosen and rejected, optionally prompt): set it'
    )
  if data_config.tokenizer == 'whitespace':
    raise DataError(
        "preference pairs are tokenized by the model's tokenizer: set "
        'config.data.tokenizer to its folder or tokenizer.json'
    )
  log = []
  splits = {}
  for name, path in (
      ('train', data_config.path),
      ('validation', data_config.validation_path),
      ('test', data_config.test_path),
  ):
    if path:
      splits[name], dropped = read_pairs(path, data_config.on_bad_rows)
      if dropped:
        log.append(f'{name}: dropped {dropped} bad rows of {path}')
  for name in ('test', 'validation'):
    if name not in splits:
      fraction = data_config[f'{name}_fraction']
      splits[name], splits['train'] = _carve(
          splits['train'], fraction, name, log
      )
  for name in ('train', 'validation'):
    limit = data_config.get(f'max_{name}_examples')
    if limit and limit < len(splits[name]):
      log.append(f'{name}: kept the first {limit} of {len(splits[name])}')
      splits[name] = splits[name][:limit]
  encoder = instructions.InstructionEncoder(data_config)
  template = encoder.template if encoder.chat else None
  tables = {}
  for name, pairs in splits.items():
    if not pairs:
      raise DataError(f'the {name} split holds no preference pairs')
    tables[name], cut = encode_pairs(
        pairs,
        encoder.tokenizer,
        int(data_config.max_length),
        eos_id=encoder.eos_id,
        template=template,
        special_tokens=encoder.special,
    )
    if cut:
      log.append(
          f'{name}: {cut} of {len(pairs)} pairs longer than max_length='
          f'{data_config.max_length} (prompt start, then reply end, cut)'
      )
  how = 'chat template' if template else 'prompt + reply + end-of-text'
  log.append(
      'pairs: '
      + ', '.join(
          f'{k} {len(splits[k])}' for k in ('train', 'validation', 'test')
      )
      + f'; {how}, tokenizer {data_config.tokenizer!r}, loss on the replies'
  )
  return Datasets(
      train=tables['train'],
      validation=tables['validation'],
      test=tables['test'],
      num_classes=None,
      class_names=None,
      log=log,
      labels=None,
  )
