"""GGUF export (tuning.formats.gguf_export) of tiny random Llama models (GQA,
tied and untied embeddings) with a small byte-level BPE tokenizer, checked by
tuning's own GGUF reader and by transformers' GGUF loader; and the export
command on a converted GGUF-born folder."""

# The fixtures of test_gguf_checkpoint are reused (_byte_tokens, _write_gguf).
# pylint: disable=protected-access

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from tests.formats import test_gguf_checkpoint as gguf_fixtures
from tuning.cli import export as export_cli
from tuning.decoding import sampling
from tuning.formats import gguf as gguf_checkpoint
from tuning.formats import gguf_export
from tuning.formats import huggingface as hf_convert
from tuning.models import decoder_hf

gguf = pytest.importorskip('gguf')
ml_dtypes = pytest.importorskip('ml_dtypes')
tokenizers = pytest.importorskip('tokenizers')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('accelerate')

HEADS, KV_HEADS = gguf_fixtures.HEADS, gguf_fixtures.KV_HEADS
VOCAB = 264  # the tokenizer's 262 tokens and 2 unused rows ([PAD262], ...)
TEXTS = [
    'the theme then',
    'Hello, world! It costs $12.50 -- or 1,000 yen.',
    'Grüße aus Köln',
    '<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n',
]
PROMPT = [[260, 83, 257, 258, 76, 68, 261]]


def _write_tokenizer(folder, smollm_with_bos):
  """tokenizer.json + tokenizer_config.json of the byte-level vocabulary of
  test_gguf_checkpoint: GPT-2's splitting, or SmolLM2's (digits one by one)
  with a BOS token prepended."""
  tokens, types, merges = gguf_fixtures._byte_tokens()
  plain = [t for t, kind in zip(tokens, types) if kind == 1]
  tok = tokenizers.Tokenizer(
      tokenizers.models.BPE(
          vocab={t: i for i, t in enumerate(plain)},
          merges=[tuple(m.split(' ')) for m in merges],
      )
  )
  byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.pre_tokenizer = byte_level
  if smollm_with_bos:
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(
      [
          tokenizers.AddedToken(t, special=True, normalized=False)
          for t, kind in zip(tokens, types)
          if kind == 3
      ]
  )
  if smollm_with_bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single='<|im_start|> $A', special_tokens=[('<|im_start|>', 260)]
    )
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  config = {
      'bos_token': '<|im_start|>',
      'eos_token': {'content': '<|im_end|>', 'special': True},
      'pad_token': '<|endoftext|>',
      'chat_template': gguf_fixtures.TEMPLATE,
  }
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  return tok, [
      os.path.join(folder, n)
      for n in hf_convert.TOKENIZER_FILES
      if os.path.isfile(os.path.join(folder, n))
  ]


@pytest.fixture(scope='module', params=['untied', 'tied'])
def tiny(request, tmp_path_factory):
  """A tiny Llama as tuning holds it (params, hf_config), its export tensors
  and tokenizer, and one GGUF file per quant type."""
  tied = request.param == 'tied'
  torch.manual_seed(1 + tied)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=HEADS,
      num_key_value_heads=KV_HEADS,
      max_position_embeddings=64,
      rope_theta=500.0,
      rms_norm_eps=1e-5,
      tie_word_embeddings=tied,
      initializer_range=0.2,  # peaked logits: greedy choices far from ties
      bos_token_id=260,
      eos_token_id=261,
      pad_token_id=259,
  )
  hf = transformers.LlamaForCausalLM(config)
  hf_config = json.loads(config.to_json_string())
  params, _ = decoder_hf.convert_hf(
      {k: v.numpy() for k, v in hf.state_dict().items()}, hf_config
  )
  tensors, export_config = decoder_hf.export_hf(params, hf_config)
  root = tmp_path_factory.mktemp(request.param)
  tok, files = _write_tokenizer(root / 'tokenizer', smollm_with_bos=tied)
  paths = {
      quant: gguf_export.write_gguf(
          str(root / quant), tensors, export_config, files, quant=quant
      )
      for quant in gguf_export.QUANTS
  }
  return dict(
      tied=tied,
      params=params,
      hf_config=export_config,
      tensors=tensors,
      tokenizer=tok,
      paths=paths,
  )


def _flat(params):
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def _field(path, key):
  field = gguf.GGUFReader(path).fields.get(key)
  return None if field is None else field.contents()


def test_f32_reads_back_bitwise_with_its_tokenizer(tiny):
  path = tiny['paths']['f32']
  assert os.path.basename(path) == 'model-f32.gguf'
  read = gguf_checkpoint.read(path)
  assert read.tensor_types == {'F32': 20 + (not tiny['tied'])}
  assert ('lm_head.weight' in read.tensors) != tiny['tied']
  params, report = decoder_hf.convert_hf(read.tensors, read.hf_config)
  assert report['tied_embeddings'] == tiny['tied']
  ours, theirs = _flat(params), _flat(tiny['params'])
  assert ours.keys() == theirs.keys()
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  written = decoder_hf.config_from_hf(read.hf_config)
  expected = decoder_hf.config_from_hf(tiny['hf_config'])
  # GGUF stores the norm's epsilon as a float32, no initializer range.
  assert written.norm_eps == np.float32(expected.norm_eps)
  assert expected == dataclasses.replace(
      written,
      norm_eps=expected.norm_eps,
      initializer_range=expected.initializer_range,
  )

  source = tiny['tokenizer']
  for text in TEXTS:
    ids = source.encode(text).ids
    assert read.tokenizer.encode(text).ids == ids, text
  assert read.tokenizer_config['add_bos_token'] == tiny['tied']
  assert read.tokenizer_config['chat_template'] == gguf_fixtures.TEMPLATE
  assert (
      read.tokenizer_config['eos_token'],
      read.tokenizer_config['pad_token'],
  ) == ('<|im_end|>', '<|endoftext|>')
  assert _field(path, 'tokenizer.ggml.pre') == (
      'smollm' if tiny['tied'] else 'gpt-2'
  )
  types = _field(path, 'tokenizer.ggml.token_type')
  assert types[259:] == [3, 3, 3, 5, 5]  # control, then unused padding rows


def test_transformers_gguf_loader_gives_tunings_logits_and_ids(tiny):
  path = tiny['paths']['f32']
  folder, name = os.path.split(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name
  ).eval()
  assert hf.config.tie_word_embeddings == tiny['tied']
  model = decoder_hf.from_hf_config(tiny['hf_config'])
  ids = np.array(PROMPT, np.int32)
  ours = np.asarray(model.apply({'params': tiny['params']}, ids))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids).long()).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4

  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  for text in TEXTS:
    assert tokenizer(text)['input_ids'] == (
        tiny['tokenizer'].encode(text).ids
    ), text


def _q8_0_bound(w):
  """Q8_0's per-value error bound, per block of 32 along the rows: d/2 for
  the rounding to int8 at scale d = max|w| / 127, plus 127 |d - fp16(d)|
  (the scale is stored as float16), plus float32 rounding."""
  blocks = w.reshape(-1, 32)
  d = np.abs(blocks).max(axis=1, keepdims=True) / 127
  d16 = d.astype(np.float16).astype(np.float32)
  bound = d / 2 + 127 * np.abs(d - d16) + 1e-6 * np.abs(blocks).max()
  return np.broadcast_to(bound, blocks.shape).reshape(w.shape)


def test_q8_0_within_its_error_and_greedy_tokens_in_transformers(tiny):
  path = tiny['paths']['q8_0']
  read = gguf_checkpoint.read(path)
  assert read.tensor_types == {'F32': 5, 'Q8_0': 16 - tiny['tied']}
  for name, value in tiny['tensors'].items():
    if tiny['tied'] and name == 'lm_head.weight':
      continue
    back = read.tensors[name]
    if value.ndim == 1:
      np.testing.assert_array_equal(back, value, err_msg=name)
      continue
    err = np.abs(back - value)
    assert (err <= _q8_0_bound(value)).all(), name
    # About max|w| / 254 per block: the float16 scale adds < 13%.
    assert err.max() <= 1.13 * np.abs(value).max() / 254, name
    assert err.max() > 0, name  # it was quantised

  model = decoder_hf.from_hf_config(tiny['hf_config'])
  ids = np.array(PROMPT, np.int32)
  steps = 12
  ours = sampling.generate(
      model, tiny['params'], ids, max_new_tokens=steps
  ).tokens
  folder, name = os.path.split(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name
  ).eval()
  with torch.no_grad():
    theirs = hf.generate(
        input_ids=torch.tensor(ids).long(),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    ).numpy()[:, ids.shape[1] :]
  np.testing.assert_array_equal(ours, theirs)


def test_f16_and_bf16_read_back_as_the_cast(tiny):
  casts = {'f16': np.float16, 'bf16': ml_dtypes.bfloat16}
  for quant, dtype in casts.items():
    read = gguf_checkpoint.read(tiny['paths'][quant])
    assert read.tensor_types == {'F32': 5, quant.upper(): 16 - tiny['tied']}
    for name, value in tiny['tensors'].items():
      if tiny['tied'] and name == 'lm_head.weight':
        continue
      cast = value if value.ndim == 1 else value.astype(dtype)
      np.testing.assert_array_equal(
          read.tensors[name], cast.astype(np.float32), err_msg=name
      )


def test_export_command_on_a_converted_gguf_folder(tmp_path):
  """A GGUF-born converted folder (its tokenizer.json rebuilt from the
  file) exported again reads back as the same parameters and tokenizer."""
  config = transformers.LlamaConfig(
      vocab_size=len(gguf_fixtures._byte_tokens()[0]),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=HEADS,
      num_key_value_heads=KV_HEADS,
      max_position_embeddings=64,
      tie_word_embeddings=True,
  )
  torch.manual_seed(0)
  source = gguf_fixtures._write_gguf(
      tmp_path / 'source.gguf', transformers.LlamaForCausalLM(config), config
  )
  gguf_checkpoint.convert(source, str(tmp_path / 'converted'), verbose=False)
  out = tmp_path / 'export'
  assert (
      export_cli.main(
          [
              f'--checkpoint={tmp_path / "converted"}',
              '--format=gguf',
              '--quant=f32',
              f'--out={out}',
          ]
      )
      == 0
  )
  assert os.listdir(out) == ['model-f32.gguf']
  before = gguf_checkpoint.read(source)
  after = gguf_checkpoint.read(str(out / 'model-f32.gguf'))
  assert before.tensors.keys() == after.tensors.keys()
  for name, value in before.tensors.items():
    np.testing.assert_array_equal(after.tensors[name], value, err_msg=name)
  for text in TEXTS:
    assert after.tokenizer.encode(text).ids == (
        before.tokenizer.encode(text).ids
    )
  assert after.tokenizer_config == before.tokenizer_config


def test_one_line_errors(tiny, tmp_path):
  tensors, hf_config = tiny['tensors'], tiny['hf_config']
  _, files = _write_tokenizer(tmp_path / 'tok', smollm_with_bos=False)
  with pytest.raises(ValueError, match=r"--quant='q4_0': use one of f32"):
    gguf_export.write_gguf(tmp_path / 'a', tensors, hf_config, files, 'q4_0')
  gpt2 = dict(hf_config, model_type='gpt2')
  with pytest.raises(ValueError, match="Llama-family.*'gpt2'.*--format=hf"):
    gguf_export.write_gguf(tmp_path / 'a', tensors, gpt2, files)
  scaled = dict(hf_config, rope_parameters={'rope_type': 'yarn'})
  with pytest.raises(ValueError, match="rope_type='yarn'.*--format=hf"):
    gguf_export.write_gguf(tmp_path / 'a', tensors, scaled, files)
  with pytest.raises(ValueError, match='needs the model.s tokenizer.json'):
    gguf_export.write_gguf(tmp_path / 'a', tensors, hf_config, files[1:])
  wordpiece = tokenizers.Tokenizer(
      tokenizers.models.WordPiece({'[UNK]': 0, 'a': 1}, unk_token='[UNK]')
  )
  wordpiece.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  os.makedirs(tmp_path / 'wp')
  wordpiece.save(str(tmp_path / 'wp' / 'tokenizer.json'))
  with pytest.raises(
      ValueError, match='byte-level BPE.*WordPiece.*--format=hf'
  ):
    gguf_export.write_gguf(
        tmp_path / 'a',
        tensors,
        hf_config,
        [str(tmp_path / 'wp/tokenizer.json')],
    )
  with open(files[0]) as f:
    llama3 = json.load(f)
  llama3['pre_tokenizer'] = {
      'type': 'Sequence',
      'pretokenizers': [
          {
              'type': 'Split',
              'pattern': {'Regex': r'\p{N}{1,3}'},
              'behavior': 'Isolated',
              'invert': False,
          },
          {
              'type': 'ByteLevel',
              'add_prefix_space': False,
              'trim_offsets': True,
              'use_regex': False,
          },
      ],
  }
  os.makedirs(tmp_path / 'llama3')
  with open(tmp_path / 'llama3' / 'tokenizer.json', 'w') as f:
    json.dump(llama3, f)
  with pytest.raises(
      ValueError,
      match='split text like GPT-2.*Split.ByteLevel with no GPT-2 regex: '
      'export it with --format=hf',
  ):
    gguf_export.write_gguf(
        tmp_path / 'a',
        tensors,
        hf_config,
        [str(tmp_path / 'llama3' / 'tokenizer.json')],
    )
  small = dict(hf_config, vocab_size=200)
  with pytest.raises(ValueError, match='262 tokens .* only 200 rows'):
    gguf_export.write_gguf(tmp_path / 'a', tensors, small, files)
  extra = dict(tensors, **{'model.layers.0.mlp.extra.weight': np.zeros(2)})
  with pytest.raises(ValueError, match="unknown Llama tensor 'model.layers.0"):
    gguf_export.write_gguf(tmp_path / 'a', extra, hf_config, files)
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('x')
  with pytest.raises(ValueError, match='exists and is not empty'):
    gguf_export.write_gguf(tmp_path / 'full', tensors, hf_config, files)
  assert not os.path.exists(tmp_path / 'a')  # nothing written on bad input
