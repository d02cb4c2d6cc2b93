"""Instruction data for causal_lm: the loss on the response tokens only.

Two row shapes (CSV/TSV/JSON Lines, read by `rows`):

  * prompt/response (`config.data.prompt_column` and `response_column`):
    with `config.data.use_chat_template` (default) and a tokenizer whose
    folder's tokenizer_config.json has a `chat_template`, the pair is the
    conversation [user: prompt, assistant: response]; otherwise the text is
    prompt + response as given (no separator added), tokenized with the
    tokenizer's special tokens, and ends with its end-of-text token.
  * conversations (`config.data.messages_column`, JSON Lines): a list of
    {"role": "system"|"user"|"assistant", "content": str}, rendered by the
    chat template (`tuning.chat_template`, as `tuning.generate` renders
    prompts; the template writes the special tokens itself).

Each row becomes `input_ids`, `attention_mask` and `loss_mask` (int32,
right-padded to `config.data.max_length`): `loss_mask[t] = 1` where token
t is a response token, i.e. one of the assistant turns' text as the
template renders it, through its end-of-turn token (the text between the
conversation rendered up to that turn with the generation prompt, and
rendered through it); for plain concatenation, the response's tokens and
the end-of-text token. The causal_lm task counts token t as a target of
position t - 1 exactly where `loss_mask[t] = 1`, so prompt tokens weigh 0
in the loss and in the evaluation totals.

What is an error and what is counted (never silently dropped):
  * a malformed row (a column missing, a prompt/response/content that is
    not a string, messages that are not a list of {role, content}, an
    unknown role, no assistant turn) is an error naming file:line and the
    fix, raised while the file is read (`check_text`, `check_messages`);
    with `config.data.on_bad_rows='drop'` it is dropped and counted;
  * a row longer than max_length is cut at max_length (its last response
    tokens, maybe its end-of-turn token, are lost): counted and logged per
    split, since the tokens that remain still train;
  * a row of which no response token survives the cut (the prompt fills
    max_length) is an error naming file:line and the fix, or with
    on_bad_rows='drop' dropped and counted.

Only tables in memory (csv, tsv, jsonl sources) carry instruction data;
ArrayRecord sources are refused with a one-line error.
"""

from __future__ import annotations

import json
import os
import numpy as np

from tuning.data import chat_template
from tuning.data.tables import DataError, Table, num_rows

ROLES = ('system', 'user', 'assistant')
# The columns instruction rows have in a table before encoding ('where':
# each row's file:line).
COLUMNS = ('prompt', 'response', 'messages', 'where')


def _short(value) -> str:
  text = json.dumps(value, ensure_ascii=False, default=str)
  return text if len(text) <= 40 else text[:37] + '...'


def check_text(value, column: str, where: str, fix: str) -> str:
  """A prompt or response cell: a string, else a DataError at `where`."""
  if not isinstance(value, str):
    raise DataError(
        f'{where}: {column!r} is {_short(value)}, not a string (fix the row,'
        f' or {fix})'
    )
  return value


def check_messages(value, column: str, where: str, fix: str) -> list[dict]:
  """A conversation cell: [{role, content}] with an assistant turn."""
  shape = f'a list of {{"role": {"/".join(ROLES)}, "content": text}}'
  if not isinstance(value, list) or not value:
    raise DataError(
        f'{where}: {column!r} must be {shape} (JSON Lines), not '
        f'{_short(value)} (fix the row, or {fix})'
    )
  messages = []
  for i, message in enumerate(value):
    if not isinstance(message, dict) or not {'role', 'content'} <= set(message):
      raise DataError(
          f'{where}: message {i} of {column!r} is {_short(message)}, not '
          f'{{"role": ..., "content": ...}} (fix the row, or {fix})'
      )
    if message['role'] not in ROLES:
      raise DataError(
          f'{where}: message {i} of {column!r} has the unknown role '
          f'{_short(message["role"])}: use one of {", ".join(ROLES)} (fix '
          f'the row, or {fix})'
      )
    if not isinstance(message['content'], str):
      raise DataError(
          f'{where}: message {i} of {column!r} has content '
          f'{_short(message["content"])}, not a string (fix the row, or '
          f'{fix})'
      )
    messages.append({'role': message['role'], 'content': message['content']})
  if not any(m['role'] == 'assistant' for m in messages):
    raise DataError(
        f'{where}: {column!r} has no assistant message, so nothing to train'
        f' on (add the reply, or {fix})'
    )
  return messages


def columns_set(data_config) -> dict[str, str]:
  """{example key: column} of the instruction columns `config.data` sets."""
  return {
      key: data_config.get(f'{key}_column')
      for key in ('prompt', 'response', 'messages')
      if data_config.get(f'{key}_column')
  }


def check_config(data_config, labels: str | None):
  """The instruction columns make sense together (one-line errors)."""
  named = columns_set(data_config)
  if not named:
    return
  if data_config.source not in ('csv', 'tsv', 'jsonl'):
    raise DataError(
        'instruction columns (config.data.prompt_column/response_column/'
        'messages_column) are read from csv, tsv or jsonl files into memory,'
        f' not source {data_config.source!r}: use one of those'
    )
  if labels is not None:
    raise DataError(
        'instruction columns (config.data.prompt_column/response_column/'
        'messages_column) are for config.task=causal_lm: unset them'
    )
  if data_config.get('text_column'):
    raise DataError(
        'set either config.data.text_column (plain text) or the instruction'
        ' columns (prompt_column/response_column or messages_column), not '
        'both'
    )
  if 'messages' in named and ({'prompt', 'response'} & set(named)):
    raise DataError(
        'set either config.data.messages_column (conversations) or '
        'prompt_column/response_column, not both'
    )
  if ('prompt' in named) != ('response' in named):
    raise DataError(
        'prompt/response rows need both config.data.prompt_column and '
        'config.data.response_column'
    )
  if data_config.tokenizer == 'whitespace':
    raise DataError(
        "instruction data is tokenized by the model's tokenizer: set "
        'config.data.tokenizer to its folder or tokenizer.json'
    )


def _tokenizer_config(path: str) -> dict:
  path = os.fspath(path)
  folder = os.path.dirname(path) if os.path.isfile(path) else path
  file = os.path.join(folder, 'tokenizer_config.json')
  if not os.path.isfile(file):
    return {}
  with open(file, encoding='utf-8') as f:
    return json.load(f)


class InstructionEncoder:
  """Renders, tokenizes and masks instruction rows (see the module doc)."""

  def __init__(self, data_config):
    from tuning.data import tokenization  # pylint: disable=g-import-not-at-top

    self.path = data_config.tokenizer
    self.max_length = int(data_config.max_length)
    self.drop = data_config.on_bad_rows == 'drop'
    self.tokenizer = tokenization.load_tokenizer(self.path)
    self.pad_id = tokenization.pad_token_id(self.tokenizer)
    self.eos_id = tokenization.eos_token_id(self.path, self.tokenizer)
    config = _tokenizer_config(self.path)
    self.template = config.get('chat_template')
    if isinstance(self.template, list):  # named templates: the default one
      named = {t.get('name'): t.get('template') for t in self.template}
      self.template = named.get('default')
    self.special = {
        k: (v.get('content') if isinstance(v, dict) else v)
        for k, v in config.items()
        if k.endswith('_token') and isinstance(v, (str, dict))
    }
    self.columns = columns_set(data_config)
    self.chat = 'messages' in self.columns or bool(
        data_config.use_chat_template and self.template
    )
    if self.chat and not self.template:
      raise DataError(
          f'config.data.messages_column needs a chat template, and '
          f'{self.path} has none (no chat_template in its '
          'tokenizer_config.json): use prompt/response columns, or a '
          'tokenizer with a chat template'
      )
    if not self.chat and self.eos_id is None:
      raise DataError(
          f'{self.path} names no end-of-text token (tokenizer_config.json '
          'eos_token or config.json eos_token_id), which ends each '
          'response: add one'
      )

  def describe(self) -> str:
    how = (
        'rendered by the chat template'
        if self.chat
        else 'prompt + response + end-of-text'
    )
    kind = 'conversations' if 'messages' in self.columns else 'prompt/response'
    return (
        f'instructions: {kind}, {how}, loss on the response tokens only; '
        f'tokenizer {self.path!r}, max_length {self.max_length}'
    )

  def _render(self, messages, where: str, **kwargs) -> str:
    try:
      return chat_template.render(
          self.template, messages, **kwargs, **self.special
      )
    except Exception as e:  # pylint: disable=broad-except
      # A template may raise anything (jinja2 errors, raise_exception).
      raise DataError(
          f'{where}: the chat template cannot render this conversation '
          f'({type(e).__name__}: {str(e).splitlines()[0][:120]}); fix the '
          'row (e.g. the order of roles the template expects)'
      ) from None

  def text_and_spans(self, example: dict) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the response."""
    where = example.get('where', 'a row')
    if not self.chat:
      prompt, response = example['prompt'], example['response']
      return prompt + response, [(len(prompt), len(prompt) + len(response))]
    messages = example.get('messages') or [
        {'role': 'user', 'content': example['prompt']},
        {'role': 'assistant', 'content': example['response']},
    ]
    full = self._render(messages, where, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
      if message['role'] != 'assistant':
        continue
      before = self._render(messages[:i], where, add_generation_prompt=True)
      through = self._render(
          messages[: i + 1], where, add_generation_prompt=False
      )
      if not (through.startswith(before) and full.startswith(through)):
        raise DataError(
            f'{where}: the chat template does not render this conversation'
            f' turn by turn (message {i} changes the text before it), so '
            "the assistant's tokens cannot be found; use a template that "
            'renders each turn after the previous ones'
        )
      spans.append((len(before), len(through)))
    return full, spans

  def tokens(self, example: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss_mask) of one example, not yet cut to max_length."""
    text, spans = self.text_and_spans(example)
    enc = self.tokenizer.encode(text, add_special_tokens=not self.chat)
    ids = list(enc.ids)
    loss = [
        int(any(a <= start < b for a, b in spans) and end > start)
        for start, end in enc.offsets
    ]
    if not self.chat:
      if ids and ids[-1] == self.eos_id:
        loss[-1] = 1
      else:
        ids.append(self.eos_id)
        loss.append(1)
    return np.asarray(ids, np.int32), np.asarray(loss, np.int32)

  def encode(self, table: Table, split: str) -> tuple[Table, list[str]]:
    """The token columns of a table's instruction rows, and log lines.

    Consumes the instruction columns (`COLUMNS`); keeps any others.
    """
    n, length = num_rows(table), self.max_length
    ids = np.full((n, length), self.pad_id, np.int32)
    attention = np.zeros((n, length), np.int32)
    loss = np.zeros((n, length), np.int32)
    keep = np.ones(n, bool)
    cut = 0
    for row in range(n):
      example = {k: table[k][row] for k in COLUMNS if k in table}
      tokens, mask = self.tokens(example)
      mask[0] = 0  # the first token is never a target
      if len(tokens) > length:
        cut += 1
        tokens, mask = tokens[:length], mask[:length]
      if not mask.any():
        if self.drop:
          keep[row] = False
          continue
        raise DataError(
            f'{example.get("where", f"{split} row {row}")}: no response '
            f'token fits in config.data.max_length={length} (the prompt '
            'takes them all): raise max_length, shorten the prompt, or set '
            "config.data.on_bad_rows='drop' to drop and count such rows"
        )
      ids[row, : len(tokens)] = tokens
      attention[row, : len(tokens)] = 1
      loss[row, : len(tokens)] = mask
    out = {k: v for k, v in table.items() if k not in COLUMNS}
    out.update(input_ids=ids, attention_mask=attention, loss_mask=loss)
    out = {k: v[keep] for k, v in out.items()}
    log = []
    if cut:
      log.append(
          f'{split}: cut {cut} of {n} rows at max_length={length} (their '
          'last response tokens are not trained on)'
      )
    if not keep.all():
      log.append(
          f'{split}: dropped {int((~keep).sum())} rows (no response token '
          f'within max_length={length})'
      )
    return out, log
