"""GPT-2 and Llama decoders: parity with transformers (PyTorch), cached
generation against uncached decoding and against transformers' `generate`."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import TINY_LLAMA
from tuning.decoding import sampling as generation
from tuning.formats import huggingface as hf_convert
from tuning.methods import lora
from tuning.models import decoder_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

GPT2 = dict(
    model_type='gpt2',
    vocab_size=96,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_positions=64,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA = {**TINY_LLAMA, 'vocab_size': 96}
CONFIGS = {
    'gpt2': GPT2,
    'llama': LLAMA,
    'llama_tied': dict(LLAMA, tie_word_embeddings=True, attention_bias=True),
}


def _hf_model(config):
  cls = {'gpt2': transformers.GPT2Config, 'llama': transformers.LlamaConfig}[
      config['model_type']
  ]
  hf_config = cls(**{k: v for k, v in config.items() if k != 'model_type'})
  torch.manual_seed(0)
  model_cls = {
      'gpt2': transformers.GPT2LMHeadModel,
      'llama': transformers.LlamaForCausalLM,
  }[config['model_type']]
  model = model_cls(hf_config).eval()
  with torch.no_grad():  # random norms and biases, so that the map shows
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
  """(name, hf model, flax model, params): saved by transformers as
  safetensors + config.json, converted by `tuning.hf_convert` (the registry
  picks the decoder family by model_type) and read back from orbax."""
  folder = tmp_path_factory.mktemp(request.param)
  hf = _hf_model(CONFIGS[request.param])
  hf.save_pretrained(folder / 'hf')
  out = str(folder / 'converted')
  summary = hf_convert.convert(str(folder / 'hf'), out, verbose=False)
  assert summary['converted'] > 0
  if CONFIGS[request.param].get('tie_word_embeddings', True):
    assert summary['tied_embeddings']
  params = hf_convert.load_converted_params(out)
  model = decoder_hf.build(
      ml_collections.ConfigDict({'hf_config': out}), jnp.float32
  )
  return request.param, hf, model, params


def _batch():
  """Three prompts of different lengths, left padded with id 0."""
  rows = [[5, 17, 33, 9, 40, 41, 12], [7, 8, 9], [60, 3, 22, 91, 4]]
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, length - len(row) :] = row
    mask[i, length - len(row) :] = 1
  return ids, mask


def _hf_logits(hf, ids, mask):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = hf(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    )
  return out.logits.numpy()


def test_logits_match_transformers(converted):
  name, hf, model, params = converted
  ids, mask = _batch()
  apply = jax.jit(model.apply)
  ours = np.asarray(apply({'params': params}, ids, mask))
  theirs = _hf_logits(hf, ids, mask)
  diff = np.abs(ours - theirs)[mask > 0].max()
  print(f'{name}: max |logits diff| {diff:.2e}')
  assert diff <= 1e-4, name
  # Right padding gives the same logits on the real tokens.
  right = np.array([[7, 8, 9, 0, 0]]), np.array([[1, 1, 1, 0, 0]])
  ours_right = np.asarray(apply({'params': params}, *right))
  np.testing.assert_allclose(ours_right[0, :3], ours[1, -3:], atol=1e-5)


def _uncached_greedy(model, params, ids, mask, steps):
  """Greedy decoding by re-running the whole sequence at every step.

  The sequence lives in a fixed buffer (one compilation): the slots after
  the current token cannot change its logits in a causal model.
  """
  apply = jax.jit(model.apply)
  length = ids.shape[1]
  ids = np.pad(ids, ((0, 0), (0, steps)))
  mask = np.pad(mask, ((0, 0), (0, steps)), constant_values=1)
  for t in range(steps):
    logits = apply({'params': params}, ids, mask)
    ids[:, length + t] = np.argmax(logits[:, length + t - 1], -1)
  return ids[:, length:]


def test_cached_equals_uncached_and_transformers(converted):
  name, hf, model, params = converted
  ids, mask = _batch()
  steps = 8
  result = generation.generate(model, params, ids, mask, max_new_tokens=steps)
  uncached = _uncached_greedy(model, params, ids, mask, steps)
  np.testing.assert_array_equal(result.tokens, uncached, err_msg=name)
  with torch.no_grad():
    theirs = hf.generate(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    ).numpy()[:, ids.shape[1] :]
  np.testing.assert_array_equal(result.tokens, theirs, err_msg=name)


# One family is enough for the sampling paths.
@pytest.mark.parametrize('converted', ['llama'], indirect=True)
def test_stop_tokens_and_sampling(converted):
  _, _, model, params = converted
  ids, mask = _batch()
  # 8 new tokens greedily: the compilation of the test above is reused.
  greedy = generation.generate(model, params, ids, mask, max_new_tokens=8)
  stop = int(greedy.tokens[0, 2])
  stopped = generation.generate(
      model, params, ids, mask, max_new_tokens=8, stop_tokens=(stop,), pad_id=0
  )
  assert stopped.lengths[0] == 3
  assert stopped.tokens[0, 2] == stop and not stopped.tokens[0, 3:].any()
  for row in range(1, 3):
    n = stopped.lengths[row]
    np.testing.assert_array_equal(
        stopped.tokens[row, :n], greedy.tokens[row, :n]
    )
  # top_k=1 is greedy at any temperature; sampling is reproducible by seed.
  top1 = generation.generate(
      model,
      params,
      ids,
      mask,
      max_new_tokens=8,
      temperature=2.0,
      top_k=1,
      seed=3,
  )
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  tiny_p = generation.generate(
      model,
      params,
      ids,
      mask,
      max_new_tokens=8,
      temperature=1.0,
      top_p=1e-6,
      seed=3,
  )
  np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)
  a = generation.generate(
      model,
      params,
      ids,
      mask,
      max_new_tokens=8,
      temperature=1.0,
      top_k=20,
      top_p=0.9,
      seed=4,
  )
  b = generation.generate(
      model,
      params,
      ids,
      mask,
      max_new_tokens=8,
      temperature=1.0,
      top_k=20,
      top_p=0.9,
      seed=4,
  )
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.tokens.max() < 96


def test_bad_configs_and_checkpoints():
  with pytest.raises(ValueError, match='unknown decoder model_type'):
    decoder_hf.config_from_hf({'model_type': 'mamba', 'vocab_size': 3})
  params = {'model.embed_tokens.weight': np.zeros((96, 32), np.float32)}
  with pytest.raises(ValueError, match='missing tensors: .*lm_head.weight'):
    decoder_hf.convert_hf(params, LLAMA)
  with pytest.raises(ValueError, match='hf_config is not set'):
    decoder_hf.build(ml_collections.ConfigDict({'hf_config': ''}), jnp.float32)


def test_param_names_and_bfloat16():
  model = decoder_hf.from_hf_config(LLAMA, jnp.bfloat16)
  ids, mask = _batch()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask)
  flat = {
      '/'.join(k.key for k in p): v
      for p, v in jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  }
  assert 'decoder/layer_1/attention/query/kernel' in flat
  assert 'decoder/layer_0/mlp/gate/kernel' in flat
  assert 'lm_head/kernel' in flat
  assert all(v.dtype == jnp.float32 for v in flat.values())
  family = decoder_hf.FAMILY
  adapted = lora.target_modules(
      variables['params'],
      ml_collections.ConfigDict({'targets': family.lora_targets}),
  )
  assert len(adapted) == 2 * 7 and 'lm_head' not in adapted
  assert re.fullmatch(family.layer_regex, 'decoder/layer_1/mlp/up/kernel')
  assert all(
      any(re.fullmatch(r, p) for r in family.head_regex)
      == p.startswith(('lm_head', 'decoder/final_norm'))
      for p in flat
  )
  logits = jax.jit(model.apply)(variables, ids, mask)
  assert logits.dtype == jnp.float32 and logits.shape == (3, 7, 96)
  cache = generation.init_cache(model, 3, 12)
  assert cache['decoder']['layer_0']['attention']['cached_key'].dtype == (
      jnp.bfloat16
  )
  out = generation.generate(
      model, variables['params'], ids, mask, max_new_tokens=3
  )
  assert out.tokens.shape == (3, 3) and (out.lengths == 3).all()
