"""Preference pairs: the HH-RLHF split, explicit columns, bad rows, the
reply loss mask (raw text and chat template) and the max_length cut."""

import gzip
import json

import numpy as np
import pytest

from tuning.data import preference

SPECIAL = ['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>', '<unk>']
WORDS = 'user assistant Human Assistant : how do I steal a car no sorry cannot sure help'
TEMPLATE = (
    '{% for m in messages %}<|im_start|>{{ m["role"] }} {{ m["content"] }}'
    '<|im_end|> {% endfor %}'
    '{% if add_generation_prompt %}<|im_start|>assistant {% endif %}'
)


@pytest.fixture(scope='module')
def tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {t: i for i, t in enumerate(SPECIAL + WORDS.split())}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIAL)
  return tok


HH = {
    'chosen': '\n\nHuman: how do I steal a car\n\nAssistant: sorry I cannot',
    'rejected': '\n\nHuman: how do I steal a car\n\nAssistant: sure I help',
}


def test_hh_split_at_last_common_assistant_turn():
  two_turns = {
      k: '\n\nHuman: how\n\nAssistant: no\n\nHuman: do I\n\nAssistant:' + v
      for k, v in (('chosen', ' sorry'), ('rejected', ' sure'))
  }
  prompt, chosen, rejected = preference.split_dialogues(
      two_turns['chosen'], two_turns['rejected'], 'f:1'
  )
  assert prompt.endswith('\n\nAssistant:') and prompt.count('Assistant:') == 2
  assert two_turns['chosen'] == prompt + chosen
  assert two_turns['rejected'] == prompt + rejected
  assert chosen != rejected
  messages = preference.hh_messages(prompt)
  assert [m['role'] for m in messages] == ['user', 'assistant', 'user']
  # Replies that start alike still split at the turn, not mid-reply.
  p, c, r = preference.split_dialogues(
      '\n\nHuman: a\n\nAssistant: sure x',
      '\n\nHuman: a\n\nAssistant: sure y',
      '',
  )
  assert (p, c, r) == ('\n\nHuman: a\n\nAssistant:', ' sure x', ' sure y')


def _write(path, rows):
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')


def test_bad_rows_error_with_file_line_or_drop(tmp_path):
  path = str(tmp_path / 'pairs.jsonl.gz')
  explicit = {'prompt': 'how', 'chosen': ' no', 'rejected': ' sure'}
  bad = [
      ('{not json', 'not JSON'),
      ({'chosen': 'x'}, "'rejected' is missing"),
      (
          {'chosen': HH['chosen'], 'rejected': HH['chosen']},
          'chosen == rejected',
      ),
      ({'chosen': 'Human: a', 'rejected': 'Human: b'}, 'share no prompt'),
      ({'prompt': 'p', 'chosen': 'x', 'rejected': 'x'}, 'chosen == rejected'),
  ]
  for row, message in bad:
    _write(path, [HH, explicit, row])
    with pytest.raises(ValueError, match=rf'pairs.jsonl.gz:3: .*{message}'):
      preference.read_pairs(path)
  _write(path, [HH] + [row for row, _ in bad] + [explicit])
  pairs, dropped = preference.read_pairs(path, on_bad_rows='drop')
  assert dropped == len(bad) and len(pairs) == 2
  assert pairs[1]['where'].endswith(f':{len(bad) + 2}')
  with pytest.raises(ValueError, match='on_bad_rows'):
    preference.read_pairs(path, on_bad_rows='skip')


def _reply_words(tokenizer, columns, side, row=0):
  ids = columns[f'{side}_input_ids'][row]
  mask = columns[f'{side}_loss_mask'][row] > 0
  return tokenizer.decode(
      [int(i) for i in ids[mask]], skip_special_tokens=False
  )


def test_encode_masks_reply_tokens_and_counts_cuts(tokenizer):
  pair = {
      **dict(
          zip(
              ('prompt', 'chosen', 'rejected'),
              preference.split_dialogues(**HH, where='f:1'),
          )
      ),
      'where': 'f:1',
  }
  eos = tokenizer.token_to_id('</s>')
  raw, cut = preference.encode_pairs([pair], tokenizer, 16, eos_id=eos)
  assert cut == 0
  assert _reply_words(tokenizer, raw, 'chosen') == 'sorry I cannot </s>'
  assert _reply_words(tokenizer, raw, 'rejected') == 'sure I help </s>'
  assert raw['chosen_attention_mask'].sum() == 14
  chat, _ = preference.encode_pairs([pair], tokenizer, 24, template=TEMPLATE)
  assert _reply_words(tokenizer, chat, 'chosen') == 'sorry I cannot <|im_end|>'
  assert (
      tokenizer.decode(
          [int(i) for i in chat['chosen_input_ids'][0][:3]],
          skip_special_tokens=False,
      )
      == '<|im_start|> user how'
  )
  cut_cols, cut = preference.encode_pairs(
      [pair, pair], tokenizer, 11, eos_id=eos
  )
  # keep_end: the prompt's first 3 tokens go, the reply stays whole.
  assert cut == 2
  assert cut_cols['chosen_attention_mask'].sum(axis=1).tolist() == [11, 11]
  assert _reply_words(tokenizer, cut_cols, 'chosen') == 'sorry I cannot </s>'
  kept = cut_cols['chosen_input_ids'][0][:7]
  assert tokenizer.decode([int(i) for i in kept]) == (
      'do I steal a car Assistant :'
  )
  short, _ = preference.encode_pairs([pair], tokenizer, 3, eos_id=eos)
  assert _reply_words(tokenizer, short, 'chosen') == 'sorry I'
  with pytest.raises(ValueError, match='f:1: no chosen reply token fits'):
    preference.encode_pairs([pair], tokenizer, 1, eos_id=eos)
