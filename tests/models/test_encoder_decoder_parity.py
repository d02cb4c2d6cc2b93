"""Encoder-decoder family: parity with transformers' MarianMTModel and T5
(logits, greedy and beam-search `generate`), cached decoding, conversion."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from conftest import TINY_MARIAN
from tuning.decoding import encoder_decoder as ed_decoding
from tuning.models import encoder_decoder as ed
from tuning.models import encoder_decoder_hf as ed_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 16
PAD, EOS = 0, 1
MARIAN = {
    **TINY_MARIAN,
    'vocab_size': VOCAB,
    'pad_token_id': PAD,
    'decoder_start_token_id': PAD,
    'eos_token_id': EOS,
}
T5 = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    pad_token_id=PAD,
    eos_token_id=EOS,
    decoder_start_token_id=PAD,
)
MODELS = {
    # Helsinki-NLP's opus-mt shape: one tied table.
    'marian': ('marian', MARIAN),
    # Untied (transformers 5 then unties all four tables).
    'marian_untied': (
        'marian',
        dict(MARIAN, init_std=0.1, tie_word_embeddings=False),
    ),
    # Separate source and target vocabularies (output tied to the target).
    'marian_unshared': (
        'marian',
        dict(
            MARIAN,
            decoder_vocab_size=20,
            share_encoder_decoder_embeddings=False,
        ),
    ),
    't5': ('t5', T5),
    # t5 v1.1: gated-GELU, untied output layer, no output rescale.
    't5_v1_1': (
        't5',
        dict(T5, feed_forward_proj='gated-gelu', tie_word_embeddings=False),
    ),
}

# Sources: right-padded, left-padded, unpadded. Targets: right-padded.
SOURCE = np.array(
    [
        [5, 9, 3, 15, 8, 12, EOS, PAD, PAD, PAD],
        [PAD, PAD, PAD, 7, 4, 13, 11, 6, 2, EOS],
        [13, 2, 14, 9, 9, 5, 10, 3, 10, EOS],
    ],
    np.int64,
)
TARGET = np.array(
    [
        [PAD, 4, 8, 15, 3, PAD, PAD],
        [PAD, 11, 2, 7, 11, 5, 14],
        [PAD, 6, 6, 12, PAD, PAD, PAD],
    ],
    np.int64,
)


def _masks():
  target_mask = (TARGET != PAD).astype(np.int64)
  target_mask[:, 0] = 1  # the start token is the pad id
  return (SOURCE != PAD).astype(np.int64), target_mask


def _cycle_head(embedding, noise):
  """An output layer that favours a fixed successor of the last token, so
  that tiny random models write varied sequences instead of one token."""
  order = torch.randperm(VOCAB)
  unit = embedding / embedding.norm(dim=1, keepdim=True).clamp(min=1e-3)
  head = torch.empty_like(embedding)
  for i in range(VOCAB):
    head[order[(i + 1) % VOCAB]] = unit[order[i]]
  return torch.nn.Parameter(4.0 * head + noise * torch.randn_like(head))


def _hf_model(name, folder):
  """A random HF model, saved as config.json + model.safetensors."""
  kind, overrides = MODELS[name]
  torch.manual_seed(0)
  if kind == 'marian':
    model = transformers.MarianMTModel(transformers.MarianConfig(**overrides))
    if name == 'marian_untied':
      with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(5.0)
      model.lm_head.weight = _cycle_head(
          model.model.decoder.embed_tokens.weight.detach(), 0.5
      )
  else:
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**overrides)
    )
  model.eval()
  if name != 't5_v1_1':
    model.save_pretrained(folder)
    return model
  # transformers 5 always ties T5's output layer; write the t5 v1.1 files
  # as they are published (untied lm_head, tie_word_embeddings=false).
  model.lm_head.weight = _cycle_head(model.shared.weight.detach(), 1.0)
  config = model.config.to_dict()
  config.pop('scale_decoder_outputs', None)
  config['tie_word_embeddings'] = False
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  tensors = {
      k: v.detach().numpy().copy() for k, v in model.state_dict().items()
  }
  safetensors.numpy.save_file(
      tensors, os.path.join(folder, 'model.safetensors')
  )
  return model


def _convert(folder, dtype=jnp.float32):
  with open(os.path.join(folder, 'config.json')) as f:
    hf_config = json.load(f)
  tensors = safetensors.numpy.load_file(
      os.path.join(folder, 'model.safetensors')
  )
  params, report = ed_hf.convert_hf(tensors, hf_config)
  model = ed_hf.build(
      ml_collections.ConfigDict({'hf_config': str(folder)}), dtype
  )
  return model, params, report


_CACHE = {}


def _pair(name, tmp_path_factory):
  if name not in _CACHE:
    folder = str(tmp_path_factory.mktemp(name))
    hf = _hf_model(name, folder)
    _CACHE[name] = (name, hf) + _convert(folder)
  return _CACHE[name]


@pytest.fixture(params=list(MODELS))
def pair(request, tmp_path_factory):
  return _pair(request.param, tmp_path_factory)


def _hf_logits(hf):
  source_mask, target_mask = _masks()
  with torch.no_grad():
    out = hf(
        input_ids=torch.tensor(SOURCE),
        attention_mask=torch.tensor(source_mask),
        decoder_input_ids=torch.tensor(TARGET),
        decoder_attention_mask=torch.tensor(target_mask),
    )
  return out.logits.numpy()


def _logits(name, tmp_path_factory):
  """Our teacher-forced logits of model `name`, computed once."""
  key = ('logits', name)
  if key not in _CACHE:
    _, _, model, params, _ = _pair(name, tmp_path_factory)
    source_mask, target_mask = _masks()
    _CACHE[key] = jax.jit(model.apply)(
        {'params': params}, SOURCE, source_mask, TARGET, target_mask
    )
  return _CACHE[key]


def test_logits_match_transformers(pair, tmp_path_factory):
  kind, hf, _, params, report = pair
  logits = _logits(kind, tmp_path_factory)
  assert logits.dtype == jnp.float32
  expected = _hf_logits(hf)
  diff = float(np.max(np.abs(np.asarray(logits) - expected)))
  print(f'{kind}: max |logits - transformers| = {diff:.2e}')
  assert diff <= 1e-4
  assert report['converted'] == len(jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize('name', ['marian', 't5_v1_1'])
def test_cached_decoding_matches_full_sequence(name, tmp_path_factory):
  _, _, model, params, _ = _pair(name, tmp_path_factory)
  source_mask, target_mask = _masks()
  variables = {'params': params}
  full = _logits(name, tmp_path_factory)
  cross = jax.jit(
      lambda: model.apply(
          variables,
          model.apply(
              variables, SOURCE, source_mask, method=ed.EncoderDecoder.encode
          ),
          method=ed.EncoderDecoder.cross_keys_values,
      )
  )()
  cache = ed_decoding.init_cache(model, SOURCE.shape[0], 12)
  step = jax.jit(
      lambda tokens, cache: model.apply(
          variables,
          tokens,
          cross,
          source_mask,
          cache=cache,
          method=ed.EncoderDecoder.decode,
      )
  )
  steps = []
  for t in range(TARGET.shape[1]):
    logits, cache = step(TARGET[:, t : t + 1], cache)
    steps.append(logits)
  assert int(cache['index']) == TARGET.shape[1]
  # The cache has no target padding: compare the unpadded positions.
  valid = target_mask.astype(bool)
  np.testing.assert_allclose(
      np.concatenate(steps, axis=1)[valid], np.asarray(full)[valid], atol=2e-5
  )


def _after_eos_to_pad(tokens):
  ended = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) > 0
  return np.where(ended, PAD, tokens)


def _hf_generate(
    hf, beams, length_penalty, max_new_tokens, early_stopping=False
):
  source_mask, _ = _masks()
  with torch.no_grad():
    out = hf.generate(
        input_ids=torch.tensor(SOURCE),
        attention_mask=torch.tensor(source_mask),
        num_beams=beams,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        min_length=0,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
        bad_words_ids=None,
        repetition_penalty=1.0,
        num_return_sequences=1,
        return_dict_in_generate=True,
        output_scores=True,
    )
  tokens = out.sequences.numpy()[:, 1:]  # drop the start token
  tokens = np.pad(
      tokens,
      ((0, 0), (0, max_new_tokens - tokens.shape[1])),
      constant_values=PAD,
  )
  scores = None if beams == 1 else out.sequences_scores.numpy()
  # transformers fills finished beams with EOS when pad_token_id is 0.
  return _after_eos_to_pad(tokens), scores


@pytest.mark.parametrize('name', ['marian_untied', 't5_v1_1'])
@pytest.mark.parametrize(
    'beams,length_penalty,early_stopping',
    [
        (1, 1.0, False),
        (4, 1.0, False),
        (4, 0.6, False),
        (4, 2.0, True),
        (4, 1.5, 'never'),
    ],
)
def test_generate_matches_transformers(
    name, beams, length_penalty, early_stopping, tmp_path_factory
):
  _, hf, model, params, _ = _pair(name, tmp_path_factory)
  source_mask, _ = _masks()
  max_new_tokens = 9
  expected, expected_scores = _hf_generate(
      hf, beams, length_penalty, max_new_tokens, early_stopping
  )
  result = ed_decoding.generate(
      model,
      params,
      SOURCE,
      source_mask,
      beam_size=beams,
      max_new_tokens=max_new_tokens,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
  )
  ours = np.asarray(result.tokens[:, 0])
  print(name, beams, length_penalty, early_stopping, '\n', ours, '\n', expected)
  np.testing.assert_array_equal(ours, expected)
  if expected_scores is not None:
    np.testing.assert_allclose(result.scores[:, 0], expected_scores, atol=1e-4)


def test_relative_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention
  offsets = np.arange(-300, 301)
  for bidirectional in (True, False):
    expected = bucket._relative_position_bucket(
        torch.tensor(offsets),
        bidirectional=bidirectional,
        num_buckets=32,
        max_distance=128,
    ).numpy()
    ours = ed.relative_buckets(jnp.asarray(offsets), bidirectional, 32, 128)
    np.testing.assert_array_equal(ours, expected)
