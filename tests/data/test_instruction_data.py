"""Instruction data for causal_lm (loss on response tokens only) and packing
without attention across documents.

A tiny word-level tokenizer with a ChatML-like template, tiny random Llama
and GPT-2 decoders, and small JSON Lines files written into tmp_path.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuning.modes import experiment
from tuning.data import instructions
from tuning.data.datasets import build_datasets
from tuning.data.preprocessing import pack
from tuning.data.tables import DataError
from tuning.models import decoder
from tuning.models import decoder_hf
from tuning.engine.run import Run
from tuning.tasks import causal_lm
from conftest import TINY_LLAMA, final_params
import tiny_config

WORDS = (
    'user assistant system the cat dog bird sat ran flew on to over mat park'
    ' tree a what did do be brief'
).split()
SPECIAL = ['<pad>', '<s>', '</s>', '<unk>', '<|im_start|>', '<|im_end|>']
TEMPLATE = (
    '{% for m in messages %}<|im_start|>{{ m["role"] }} {{ m["content"] }}'
    '<|im_end|> {% endfor %}'
    '{% if add_generation_prompt %}<|im_start|>assistant {% endif %}'
)
LLAMA = {**TINY_LLAMA, 'eos_token_id': 5}
GPT2 = dict(
    model_type='gpt2',
    vocab_size=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_positions=64,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    eos_token_id=2,
)
ANSWERS = {
    'cat': 'sat on the mat',
    'dog': 'ran to the park',
    'bird': 'flew over the tree',
}


def write_model_folder(folder, template=True):
  """tokenizer.json (special tokens first, then WORDS), config.json and a
  tokenizer_config.json with the chat template (or only an eos token)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
  assert len(vocab) <= LLAMA['vocab_size']
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.add_special_tokens(SPECIAL)
  os.makedirs(folder, exist_ok=True)
  tokenizer.save(os.path.join(folder, 'tokenizer.json'))
  with open(os.path.join(folder, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(LLAMA, f)
  tokenizer_config = (
      {'chat_template': TEMPLATE, 'eos_token': '<|im_end|>', 'bos_token': '<s>'}
      if template
      else {'eos_token': '</s>'}
  )
  with open(
      os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8'
  ) as f:
    json.dump(tokenizer_config, f)
  return str(folder)


def write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
  return str(path)


def conversations(n, seed=0):
  """Questions about an animal whose answer the animal fixes; every other
  conversation starts with a system message and has two exchanges."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    messages = [{'role': 'system', 'content': 'be brief'}] if i % 2 else []
    for _ in range(1 + i % 2):
      animal = str(rng.choice(list(ANSWERS)))
      messages.append({'role': 'user', 'content': f'what did the {animal} do'})
      messages.append({'role': 'assistant', 'content': ANSWERS[animal]})
    rows.append({'messages': messages})
  return rows


def data_config(folder, path, **fields):
  c = tiny_config.get_config()
  c.task = 'causal_lm'
  c.data.source = 'jsonl'
  c.data.path = path
  c.data.tokenizer = folder
  c.data.max_length = 48
  c.data.length_buckets = (48,)
  c.data.drop_duplicates = False
  for key, value in fields.items():
    setattr(c.data, key, value)
  return c


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('instr')
  return (
      write_model_folder(root / 'chat'),
      write_model_folder(root / 'plain', template=False),
      root,
  )


def _encoder(folder, **fields):
  c = data_config(folder, 'unused', **fields)
  return instructions.InstructionEncoder(c.data)


def _masked_words(encoder, example):
  ids, mask = encoder.tokens(example)
  vocab = {i: t for t, i in encoder.tokenizer.get_vocab().items()}
  words = [vocab[int(i)] for i in ids]
  return words, [w for w, m in zip(words, mask) if m]


def test_chat_template_masks_the_assistant_turns_and_their_end_tokens(
    folders,
):
  encoder = _encoder(folders[0], messages_column='messages')
  messages = [
      {'role': 'system', 'content': 'be brief'},
      {'role': 'user', 'content': 'what did the cat do'},
      {'role': 'assistant', 'content': 'sat on the mat'},
      {'role': 'user', 'content': 'what did the dog do'},
      {'role': 'assistant', 'content': 'ran to the park'},
  ]
  words, masked = _masked_words(encoder, {'messages': messages})
  assert ' '.join(words) == (
      '<|im_start|> system be brief <|im_end|> <|im_start|> user what did'
      ' the cat do <|im_end|> <|im_start|> assistant sat on the mat'
      ' <|im_end|> <|im_start|> user what did the dog do <|im_end|>'
      ' <|im_start|> assistant ran to the park <|im_end|>'
  )
  # Only the replies and their end-of-turn tokens; not the role header.
  assert (
      masked == 'sat on the mat <|im_end|> ran to the park <|im_end|>'.split()
  )


def test_prompt_response_through_the_template_or_concatenated(folders):
  chat, plain, _ = folders
  example = {'prompt': 'what did the cat do', 'response': 'sat on the mat'}
  cols = dict(prompt_column='p', response_column='r')
  words, masked = _masked_words(_encoder(chat, **cols), example)
  assert words[:8] == '<|im_start|> user what did the cat do <|im_end|>'.split()
  assert masked == 'sat on the mat <|im_end|>'.split()
  # No template (or use_chat_template=False): prompt + response + eos.
  for folder, fields in (
      (plain, {}),
      (chat, {'use_chat_template': False}),
  ):
    encoder = _encoder(folder, **cols, **fields)
    words, masked = _masked_words(
        encoder, {'prompt': 'what did the cat do ', 'response': 'sat'}
    )
    eos = '</s>' if folder == plain else '<|im_end|>'
    assert words == 'what did the cat do sat'.split() + [eos]
    assert masked == ['sat', eos]


def test_loss_counts_response_tokens_only():
  rng = np.random.default_rng(0)
  ids = np.array([[1, 9, 10, 11, 12, 13, 2, 0]], np.int32)
  attention = (ids > 0).astype(np.int32)
  loss_mask = np.array([[0, 0, 0, 0, 1, 1, 1, 0]], np.int32)  # response
  batch = {
      'input_ids': ids,
      'attention_mask': attention,
      'loss_mask': loss_mask,
      'weight': np.ones(1, np.float32),
  }
  logits = jnp.asarray(rng.normal(size=(1, 8, 16)), jnp.float32)
  task = causal_lm.CausalLM

  def loss(logits, batch):
    return task.loss(logits, batch)[0] / task.loss_weight(batch)

  assert float(task.loss_weight(batch)) == 3
  value = float(loss(logits, batch))
  manual = -np.mean(
      [
          jax.nn.log_softmax(logits[0, t - 1])[ids[0, t]]
          for t in np.flatnonzero(loss_mask[0])
      ]
  )
  np.testing.assert_allclose(value, manual, rtol=1e-6)
  # Only the positions that predict response tokens get a gradient.
  grads = jax.grad(loss)(logits, batch)
  moved = np.flatnonzero(np.abs(np.asarray(grads[0])).sum(-1) > 0)
  np.testing.assert_array_equal(moved, [3, 4, 5])
  # Another prompt (same response) leaves the loss as it is; another
  # response changes it.
  prompt = dict(batch, input_ids=ids.copy())
  prompt['input_ids'][0, 1:4] = [5, 6, 7]
  assert float(loss(logits, prompt)) == value
  reply = dict(batch, input_ids=ids.copy())
  reply['input_ids'][0, 5] = 3
  assert abs(float(loss(logits, reply)) - value) > 1e-3
  # The evaluation totals count the response tokens only.
  rows = task(None, None).eval_rows(logits, batch)
  assert float(rows['tokens'].sum()) == 3
  np.testing.assert_allclose(float(rows['loss_sum'].sum()) / 3, value, 1e-6)


def _documents(rng, lengths, vocab=32):
  return [rng.integers(3, vocab, size=n).astype(np.int32) for n in lengths]


def _as_table(documents, width):
  ids = np.zeros((len(documents), width), np.int32)
  for i, d in enumerate(documents):
    ids[i, : len(d)] = d
  return {'input_ids': ids, 'attention_mask': (ids > 0).astype(np.int32)}


@pytest.mark.parametrize('hf', [LLAMA, GPT2], ids=['llama', 'gpt2'])
def test_packed_rows_equal_their_documents_alone(hf):
  rng = np.random.default_rng(1)
  model = decoder_hf.from_hf_config(hf)
  apply = jax.jit(model.apply)
  documents = _documents(rng, [5, 3, 7, 2, 6, 4, 8])
  # Each document alone, right-padded (causal: padding after it changes
  # nothing before it).
  alone = _as_table(documents, 8)
  packed = pack(alone, 16)
  assert len(packed['input_ids']) == 3  # 5+3+7, 2+6+4, 8
  np.testing.assert_array_equal(
      packed['positions'],
      decoder.segment_positions(jnp.asarray(packed['segment_ids'])),
  )
  params = jax.jit(model.init)(jax.random.PRNGKey(0), packed['input_ids'])[
      'params'
  ]
  variables = {'params': params}
  logits = apply(
      variables,
      packed['input_ids'],
      packed['attention_mask'],
      packed['positions'],
      packed['segment_ids'],
  )
  # Default positions from segment_ids are the same.
  np.testing.assert_array_equal(
      logits,
      apply(
          variables,
          packed['input_ids'],
          packed['attention_mask'],
          segment_ids=packed['segment_ids'],
      ),
  )
  alone_logits = apply(variables, alone['input_ids'], alone['attention_mask'])
  found = 0
  for row, segments in enumerate(packed['segment_ids']):
    for segment in range(1, segments.max() + 1):
      where = np.flatnonzero(segments == segment)
      n = len(documents[found])
      np.testing.assert_array_equal(
          packed['input_ids'][row, where], documents[found]
      )
      np.testing.assert_allclose(
          logits[row, where], alone_logits[found, :n], atol=1e-5, rtol=0
      )
      found += 1
  assert found == len(documents)
  # Without segment_ids, attention crosses documents: different logits.
  crossing = apply(variables, packed['input_ids'], packed['attention_mask'])
  assert np.abs(np.asarray(crossing - logits)).max() > 1e-3

  # The loss of the packed batch is the token-weighted loss of the
  # documents: no target predicts a document from the one before.
  task = causal_lm.CausalLM
  count = sum(len(d) - 1 for d in documents)
  assert float(task.loss_weight(packed)) == count
  assert float(task.loss_weight(alone)) == count
  np.testing.assert_allclose(
      float(task.loss(logits, packed)[0]) / count,
      float(task.loss(alone_logits, alone)[0]) / count,
      rtol=1e-5,
  )


def test_packing_carries_the_loss_mask(folders):
  encoder = _encoder(folders[0], messages_column='messages')
  table = {'messages': np.empty(4, object), 'where': np.array(['f:1'] * 4)}
  for i, row in enumerate(conversations(4)):
    table['messages'][i] = row['messages']
  encoded, _ = encoder.encode(table, 'train')
  packed = pack(encoded, 64)
  real = encoded['attention_mask'] > 0
  np.testing.assert_array_equal(
      packed['input_ids'][packed['attention_mask'] > 0],
      encoded['input_ids'][real],
  )
  np.testing.assert_array_equal(
      packed['loss_mask'][packed['attention_mask'] > 0],
      encoded['loss_mask'][real],  # first tokens are template headers: 0
  )
  assert packed['loss_mask'].sum() == encoded['loss_mask'].sum() > 0


def test_training_on_packed_conversations_learns_the_replies(folders, tmp_path):
  chat, _, root = folders
  path = write_jsonl(root / 'chat.jsonl', conversations(160))
  plain = data_config(chat, path, messages_column='messages')
  config = data_config(
      chat, path, messages_column='messages', pack=True, max_length=96
  )
  config.data.length_buckets = (96,)
  config.model.name = 'llama'
  config.model.hf_config = chat
  config.model.dropout = 0.0
  config.optimizer.learning_rate = 1e-2
  config.training.batch_size = 8
  config.training.total_steps = 40
  config.training.eval_every_steps = 20
  config.training.checkpoint_every_steps = 40
  config.training.samples = 1
  workdir = str(tmp_path / 'run')
  results = experiment.run(config, workdir)
  history = results['validation_history']
  assert history[-1]['loss'] < history[0]['loss']
  # The totals count response tokens (reply + end-of-turn) only.
  data = build_datasets(plain.data, labels=None, append_eos=True)
  test = data.test
  assert results['test']['tokens'] == int(test['loss_mask'][:, 1:].sum())
  assert test['loss_mask'].sum() < test['attention_mask'].sum() / 2
  sample = results['samples'][0]  # the first conversation's prompt
  assert sample['prompt'].endswith('do assistant'), sample

  # Packed or not: the same figures from the same parameters.
  plain.model = config.model
  figures = []
  for c in (config, plain):
    run = Run(c, str(tmp_path / f'eval{len(figures)}'))
    figures.append(run.evaluate(final_params(workdir)[1], 'validation'))
    run.checkpoints.close()
    if c is config:  # the loss before training, for scale
      start = run.evaluate(run.init_params(), 'validation')['loss']
  packed, unpacked = figures
  assert packed['loss'] < 0.2 * start, (start, packed['loss'])
  assert packed['tokens'] == unpacked['tokens']
  assert packed['examples'] < unpacked['examples']
  for key in ('loss', 'token_accuracy'):
    np.testing.assert_allclose(packed[key], unpacked[key], rtol=1e-5)
  # The replies follow from the question: close to certain once learned
  # (about 0.73 while the animal is not yet attended to).
  assert results['test']['token_accuracy'] > 0.9


def _build(folder, rows, root, name, **fields):
  path = write_jsonl(root / name, rows)
  c = data_config(folder, path, **fields)
  return build_datasets(c.data, labels=None, append_eos=True), path


GOOD = conversations(20)


@pytest.mark.parametrize(
    'bad, words',
    [
        ({'other': []}, "row has no value for ['messages']"),
        ({'messages': 'hello'}, "'messages' must be a list of"),
        (
            {'messages': [{'role': 'user', 'content': 3}]},
            "message 0 of 'messages' has content 3, not a string",
        ),
        (
            {'messages': [{'role': 'robot', 'content': 'hi'}]},
            'unknown role "robot": use one of system, user, assistant',
        ),
        (
            {'messages': [{'role': 'user'}]},
            'message 0 of \'messages\' is {"role": "user"}, not',
        ),
        (
            {'messages': [{'role': 'user', 'content': 'the cat'}]},
            'has no assistant message',
        ),
        (
            {
                'messages': [
                    {'role': 'user', 'content': ' '.join(['the cat'] * 30)},
                    {'role': 'assistant', 'content': 'sat'},
                ]
            },
            'no response token fits in config.data.max_length=48',
        ),
    ],
)
def test_bad_conversations_are_one_line_errors_naming_file_and_line(
    folders, bad, words
):
  chat, _, root = folders
  with pytest.raises(DataError) as e:
    _build(chat, GOOD[:7] + [bad] + GOOD[7:], root, 'bad.jsonl',
           messages_column='messages')  # fmt: skip
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(str(root / 'bad.jsonl') + ':8: '), message
  assert words in message, message
  # With on_bad_rows='drop' the row is dropped and counted.
  data, _ = _build(
      chat,
      GOOD[:7] + [bad] + GOOD[7:],
      root,
      'bad.jsonl',
      messages_column='messages',
      on_bad_rows='drop',
  )
  assert any('dropped 1 rows' in line for line in data.log), data.log


def test_prompt_response_errors_and_counted_cuts(folders):
  chat, plain, root = folders
  pairs = [{'q': f'what did the {a} do', 'a': ANSWERS[a]} for a in ANSWERS] * 8
  cols = dict(prompt_column='q', response_column='a')
  with pytest.raises(DataError, match=r'bad\.jsonl:3: \'a\' is 7, not a str'):
    _build(chat, pairs[:2] + [{'q': 'the', 'a': 7}], root, 'bad.jsonl', **cols)
  # A long reply is cut at max_length: counted in the log, still trained.
  long = pairs + [{'q': 'the cat', 'a': ' '.join(['sat on the mat'] * 20)}]
  data, _ = _build(plain, long, root, 'long.jsonl', **cols)
  assert any(': cut 1 of' in line for line in data.log), data.log
  with pytest.raises(DataError, match='either config.data.text_column'):
    _build(plain, pairs, root, 'p.jsonl', text_column='q', **cols)
  with pytest.raises(DataError, match='need both config.data.prompt_column'):
    _build(plain, pairs, root, 'p.jsonl', prompt_column='q')
  with pytest.raises(DataError, match='needs a chat template'):
    _build(plain, GOOD, root, 'g.jsonl', messages_column='messages')
  # CSV rows work alike; a missing column names the settings.
  csv = root / 'pairs.csv'
  csv.write_text(
      # No separator is added: the prompt ends with its own space.
      'q,a\n' + ''.join(f'{p["q"]} ,{p["a"]}\n' for p in pairs),
      encoding='utf-8',
  )
  c = data_config(plain, str(csv), source='csv', **cols)
  data = build_datasets(c.data, labels=None, append_eos=True)
  assert int(data.train['loss_mask'].sum()) == 5 * len(data.train['loss_mask'])
  c.data.prompt_column = 'question'
  with pytest.raises(DataError, match=r"no text column 'question'.*prompt_col"):
    build_datasets(c.data, labels=None, append_eos=True)
  c = data_config(plain, 'x', source='array_record', **cols)
  with pytest.raises(DataError, match="not source 'array_record'"):
    build_datasets(c.data, labels=None, append_eos=True)
