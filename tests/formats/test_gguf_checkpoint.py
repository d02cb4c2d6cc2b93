"""GGUF reading on a tiny Llama written the way llama.cpp's converter does
(Q/K rows permuted, some tensors Q8_0), its conversion into a folder, the
generate command on that folder, and the one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tuning.cli import generate as generate_cli
from tuning.formats import gguf as gguf_checkpoint
from tuning.formats import huggingface as hf_convert
from tuning.models import decoder_hf

gguf = pytest.importorskip('gguf')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
slow_tokenizers = pytest.importorskip('transformers.convert_slow_tokenizer')

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
HEADS, KV_HEADS = 4, 2
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)


def _byte_tokens():
  """A byte-level BPE vocabulary: 256 bytes, 3 merges, 3 control tokens."""
  spelling = slow_tokenizers.bytes_to_unicode()
  tokens = list(spelling.values())
  merges = ['Ġ t', 'h e', 'Ġt he']
  tokens += ['Ġt', 'he', 'Ġthe', '<|endoftext|>', '<|im_start|>', '<|im_end|>']
  types = [1] * (len(tokens) - 3) + [3, 3, 3]
  return tokens, types, merges


def _permute(w, heads):
  """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows."""
  return (
      w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
      .swapaxes(1, 2)
      .reshape(w.shape)
  )


def _write_gguf(path, hf, config, arch='llama', extra=None):
  tokens, types, merges = _byte_tokens()
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_freq_base(500.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('default')
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(tokens.index('<|im_start|>'))
  writer.add_eos_token_id(tokens.index('<|im_end|>'))
  writer.add_add_bos_token(False)
  writer.add_chat_template(TEMPLATE)
  names = {v: k for k, v in gguf_checkpoint._GLOBAL_NAMES.items()}
  for name, value in hf.state_dict().items():
    if name == 'lm_head.weight' and config.tie_word_embeddings:
      continue  # llama.cpp writes no output.weight for tied embeddings
    value = value.numpy()
    base, suffix = name.rsplit('.', 1)
    if base.startswith('model.layers.'):
      _, _, i, *rest = base.split('.')
      block = {v: k for k, v in gguf_checkpoint._BLOCK_NAMES.items()}
      gguf_name = f'blk.{i}.{block[".".join(rest)]}.{suffix}'
    else:
      gguf_name = f'{names[base]}.{suffix}'
    if '.attn_q.' in gguf_name:
      value = _permute(value, HEADS)
    elif '.attn_k.' in gguf_name:
      value = _permute(value, KV_HEADS)
    if '.ffn_' in gguf_name and value.ndim == 2:
      q8 = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(
          gguf_name, gguf.quants.quantize(value, q8), raw_dtype=q8
      )
    else:
      writer.add_tensor(gguf_name, np.ascontiguousarray(value))
  for name, value in (extra or {}).items():
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  config = transformers.LlamaConfig(
      vocab_size=len(_byte_tokens()[0]),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=HEADS,
      num_key_value_heads=KV_HEADS,
      max_position_embeddings=64,
      rope_theta=500.0,
      rms_norm_eps=1e-5,
      tie_word_embeddings=True,
  )
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(config).eval()
  path = _write_gguf(tmp_path_factory.mktemp('gguf') / 'tiny.gguf', hf, config)
  return hf, config, path


def test_read_unpermutes_dequantises_and_matches_transformers(tiny):
  hf, _, path = tiny
  read = gguf_checkpoint.read(path)
  assert read.tensor_types == {'F32': 14, 'Q8_0': 6}
  state = hf.state_dict()
  for name in (
      'model.layers.0.self_attn.q_proj.weight',
      'model.layers.1.self_attn.k_proj.weight',
  ):
    np.testing.assert_array_equal(read.tensors[name], state[name].numpy())
  up = 'model.layers.0.mlp.up_proj.weight'
  np.testing.assert_allclose(read.tensors[up], state[up].numpy(), atol=2e-3)
  assert read.hf_config['tie_word_embeddings']
  assert read.hf_config['num_key_value_heads'] == KV_HEADS
  # Logits against transformers with the same (dequantised) weights.
  hf.load_state_dict(
      {k: torch.from_numpy(v.copy()) for k, v in read.tensors.items()},
      strict=False,
  )
  params, _ = decoder_hf.convert_hf(read.tensors, read.hf_config)
  model = decoder_hf.from_hf_config(read.hf_config)
  ids = np.array([read.tokenizer.encode('the theme then').ids], np.int32)
  assert 258 in ids  # the 'Ġthe' merge applied
  ours = np.asarray(jax.jit(model.apply)({'params': params}, ids))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids).long()).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4


def test_convert_folder_and_generate_command(tiny, tmp_path):
  _, _, path = tiny
  out = gguf_checkpoint.ensure_converted(path, str(tmp_path), verbose=False)
  assert gguf_checkpoint.ensure_converted(path, str(tmp_path)) == out
  with open(os.path.join(out, 'conversion.json')) as f:
    assert json.load(f)['gguf_tensor_types'] == {'F32': 14, 'Q8_0': 6}
  out = tmp_path / os.path.basename(out)
  for name in (
      'params',
      'config.json',
      'tokenizer.json',
      'tokenizer_config.json',
      'conversion.json',
  ):
    assert os.path.exists(out / name), name
  loaded = generate_cli.load(str(out))
  assert loaded.stop_tokens == (len(_byte_tokens()[0]) - 1,)
  chat_ids = generate_cli.prompt_ids(loaded, 'hi', chat=True)
  assert loaded.tokenizer.decode(chat_ids, skip_special_tokens=False) == (
      '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  )
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('the cat\nhello there, the dog\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'tuning.cli.generate',
          f'--checkpoint={out}',
          f'--prompts={prompts}',
          f'--output={tmp_path / "out.jsonl"}',
          '--max_new_tokens=5',
          '--temperature=0.8',
          '--top_k=50',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [
      json.loads(line)
      for line in (tmp_path / 'out.jsonl').read_text().splitlines()
  ]
  assert [r['prompt'] for r in rows] == ['the cat', 'hello there, the dog']
  assert all(1 <= r['new_tokens'] <= 5 for r in rows)
  missing = subprocess.run(
      [
          sys.executable,
          '-m',
          'tuning.cli.generate',
          f'--checkpoint={tmp_path / "nowhere"}',
          '--prompt=x',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert missing.returncode == 1
  assert 'must be a converted model folder' in missing.stderr
  assert 'Traceback' not in missing.stderr


def test_convert_command_and_init_checkpoint_take_a_gguf_file(tiny, tmp_path):
  _, _, path = tiny
  from tuning.engine import checkpoints  # pylint: disable=g-import-not-at-top
  from tuning.cli import convert  # pylint: disable=g-import-not-at-top

  assert convert.main([f'--source={path}', f'--out={tmp_path / "out"}']) == 0
  converted = checkpoints.resolve_init_source(str(path), str(tmp_path / 'c'))
  assert checkpoints.resolve_init_source(str(path), str(tmp_path / 'c')) == (
      converted
  )
  for folder in (str(tmp_path / 'out'), converted):
    with open(os.path.join(folder, 'conversion.json')) as f:
      assert json.load(f)['source'] == os.path.abspath(path)
  expected = gguf_checkpoint.read(path).tensors
  params = hf_convert.load_converted_params(converted)
  np.testing.assert_array_equal(
      params['decoder']['embed']['embedding'],
      expected['model.embed_tokens.weight'],
  )


def test_one_line_errors(tiny, tmp_path):
  hf, config, _ = tiny
  with pytest.raises(ValueError, match='GGUF file not found'):
    gguf_checkpoint.read(str(tmp_path / 'absent.gguf'))
  mamba = _write_gguf(tmp_path / 'mamba.gguf', hf, config, arch='mamba')
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'"):
    gguf_checkpoint.read(mamba)
  odd = _write_gguf(
      tmp_path / 'odd.gguf',
      hf,
      config,
      extra={'blk.0.attn_q.bias': np.zeros(32, np.int32)},
  )
  with pytest.raises(ValueError, match='unknown GGUF tensor type I32'):
    gguf_checkpoint.read(odd)
  extra = _write_gguf(
      tmp_path / 'extra.gguf',
      hf,
      config,
      extra={'blk.0.ssm_a.weight': np.zeros(4, np.float32)},
  )
  with pytest.raises(ValueError, match="unknown GGUF tensor 'blk.0.ssm_a"):
    gguf_checkpoint.read(extra)
