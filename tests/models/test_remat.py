"""`config.model.remat` (tuning/models/remat.py) in the decoder, BERT and
the encoder-decoder: for every choice the loss and gradients equal the run
without remat, the gradient's program holds a checkpoint, the parameter
tree is the same, and a bad value is a one-line error."""

import json

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_LLAMA, TINY_MARIAN
from tuning.config import checks
from tuning.config.defaults import FIELD, base_config
from tuning.decoding import encoder_decoder as ed_decoding
from tuning.decoding import sampling
from tuning.methods import lora
from tuning.models import bert_hf
from tuning.models import decoder_hf
from tuning.models import encoder_decoder_hf
from tuning.models import remat as remat_lib

# Each choice with the names it keeps (the named policies need some).
CHOICES = {
    'none': (),
    'full': (),
    'dots_saveable': (),
    'dots_with_no_batch_dims_saveable': (),
    'nothing_saveable': (),
    'everything_saveable': (),
    'save_only_these_names': ('attention_out', 'mlp_hidden'),
    'save_anything_except_these_names': ('mlp_hidden', 'attention_context'),
}
LLAMA = dict(
    TINY_LLAMA,
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
)
GPT2 = dict(
    model_type='gpt2',
    vocab_size=40,
    n_embd=16,
    n_layer=2,
    n_head=2,
    n_positions=16,
)
BERT = dict(
    model_type='bert',
    architectures=['BertModel'],
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
)
MARIAN = dict(
    TINY_MARIAN,
    model_type='marian',
    vocab_size=40,
    d_model=16,
    encoder_ffn_dim=24,
    decoder_ffn_dim=24,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
)
T5 = dict(
    model_type='t5',
    vocab_size=40,
    d_model=16,
    d_kv=8,
    d_ff=24,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj='gated-gelu',
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
IDS = np.array([[5, 7, 9, 11, 3, 6], [0, 0, 2, 5, 3, 4]], np.int32)
MASK = (IDS > 0).astype(np.int32)
TARGET = np.array([[0, 4, 8, 2, 1], [0, 6, 3, 1, 0]], np.int32)
TARGET_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.int32)


# family -> (its builder, its Hugging Face config.json, the inputs)
FAMILIES = {
    'llama': (decoder_hf.build, LLAMA, (IDS, MASK)),
    'gpt2': (decoder_hf.build, GPT2, (IDS, MASK)),
    'bert': (bert_hf.build_bert, BERT, (IDS, MASK)),
    'marian': (
        encoder_decoder_hf.build,
        MARIAN,
        (IDS, MASK, TARGET, TARGET_MASK),
    ),
    't5': (encoder_decoder_hf.build, T5, (IDS, MASK, TARGET, TARGET_MASK)),
}


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  """family -> (builder, the config.json's folder, inputs)."""
  folders = {}
  for family, (build, hf_config, inputs) in FAMILIES.items():
    folder = tmp_path_factory.mktemp(family)
    (folder / 'config.json').write_text(json.dumps(hf_config))
    folders[family] = (build, str(folder), inputs)
  return folders


def _model(case, remat, names=(), dtype=jnp.float32):
  """The family's model, built as a run builds it from config.model."""
  build, folder, _ = case
  model_config = base_config().model
  model_config.hf_config = folder
  model_config.dropout = 0.1  # dropout on, drawn again when recomputed
  model_config.remat = remat
  model_config.remat_names = names
  num_outputs = 3 if build is bert_hf.build_bert else None
  return build(model_config, dtype, num_outputs=num_outputs)


def _loss_fn(model, inputs):
  """The mean log-probability of output 1, with dropout (train=True)."""

  def loss(params):
    logits = model.apply(
        {'params': params},
        *inputs,
        train=True,
        rngs={'dropout': jax.random.key(7)},
    )
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 1])

  return loss


def _primitives(jaxpr) -> set:
  found = set()
  for eqn in jaxpr.eqns:
    found.add(eqn.primitive.name)
    for sub in jax_core.jaxprs_in_params(eqn.params):
      found |= _primitives(sub)
  return found


def _count(jaxpr, primitive: str) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == primitive
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += _count(sub, primitive)
  return total


def _params(model, inputs):
  """Random float32 parameters of the model's tree (no compiled init)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)['params']
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
      shapes,
  )


def _check_choices(case, choices):
  """Loss and gradients of each choice equal 'none''s (one compilation);
  the gradient's program holds a checkpoint exactly when remat is on.
  Returns {choice: dot_general count of the gradient's program}."""
  inputs = case[2]
  models = {remat: _model(case, remat, CHOICES[remat]) for remat in choices}
  params = _params(models['none'], inputs)
  tree = jax.tree_util.tree_structure(params)
  for remat, model in models.items():  # the same parameter paths
    other = jax.eval_shape(model.init, jax.random.key(0), *inputs)['params']
    assert jax.tree_util.tree_structure(other) == tree, remat
  programs = {
      remat: jax.make_jaxpr(jax.value_and_grad(_loss_fn(model, inputs)))(params)
      for remat, model in models.items()
  }
  leaves = jax.tree_util.tree_leaves(params)
  results = jax.jit(
      lambda ls: {
          remat: jax_core.jaxpr_as_fun(program)(*ls)
          for remat, program in programs.items()
      }
  )(leaves)
  assert np.isfinite(results['none'][0])
  dots = {}
  for remat, program in programs.items():
    for got, want in zip(results[remat], results['none']):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=remat)
    held = {
        p
        for p in _primitives(program.jaxpr)
        if 'remat' in p or 'checkpoint' in p
    }
    assert bool(held) == (remat != 'none'), (remat, held)
    dots[remat] = _count(program.jaxpr, 'dot_general')
  return dots


def test_every_choice_gives_the_gradients_of_no_remat(cases):
  dots = _check_choices(cases['llama'], CHOICES)
  # What each policy keeps: 'full' recomputes every matmul of the forward
  # pass, saving all dots recomputes none, saving names sits between.
  assert dots['everything_saveable'] == dots['none']
  assert dots['dots_saveable'] == dots['none']
  assert dots['full'] == dots['nothing_saveable'] > dots['none']
  assert dots['none'] < dots['save_only_these_names'] < dots['full']
  # (all but mlp_hidden and attention_context kept: no matmul recomputed)
  assert dots['save_anything_except_these_names'] == dots['none']
  assert dots['none'] < dots['dots_with_no_batch_dims_saveable'] < dots['full']


@pytest.mark.parametrize('family', ['gpt2', 'bert', 'marian', 't5'])
def test_each_family_gives_the_gradients_of_no_remat(cases, family):
  dots = _check_choices(
      cases[family], ('none', 'full', 'save_only_these_names')
  )
  # The family tags the names: saving them recomputes fewer matmuls.
  assert dots['none'] < dots['save_only_these_names'] < dots['full']


def test_lora_targets_and_adapter_gradients_under_remat(cases):
  case = cases['llama']
  config = base_config().lora
  config.rank = 2
  config.targets = decoder_hf.FAMILY.lora_targets
  base = _model(case, 'none')
  rematted = _model(case, 'full')
  params = _params(base, case[2])
  assert lora.target_modules(params, config) == lora.target_modules(
      jax.eval_shape(rematted.init, jax.random.key(0), *case[2])['params'],
      config,
  )
  adapted = lora.add_adapters(params, config, jax.random.key(1))
  # Nonzero B, so that the adapters change the output.
  adapted = jax.tree_util.tree_map_with_path(
      lambda path, x: (
          x + 0.1 if 'lora_b' in jax.tree_util.keystr(path) else x
      ),
      adapted,
  )
  results = []
  for model in (base, rematted):
    wrapped = lora.LoraModel(model, config)
    loss = lambda p, m=wrapped: -jnp.mean(  # pylint: disable=g-long-lambda
        jax.nn.log_softmax(
            m.apply(
                {'params': p},
                *case[2],
                train=True,
                rngs={'dropout': jax.random.key(3)},
            )
        )[..., 1]
    )
    results.append(jax.jit(jax.value_and_grad(loss))(adapted))
  for a, b in zip(*map(jax.tree_util.tree_leaves, results)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  plain = jax.jit(lambda p: base.apply({'params': p}, *case[2]))(params)
  with_adapters = jax.jit(
      lambda p: lora.LoraModel(rematted, config).apply({'params': p}, *case[2])
  )(adapted)
  assert not np.allclose(plain, with_adapters)


def test_cached_decoding_under_remat(cases):
  """The KV cache (a mutable collection) and the encoder-decoder's cross
  keys/values, read through a rematted layer, decode as without remat."""
  llama = cases['llama']
  outputs = []
  for remat in ('none', 'full'):
    model = _model(llama, remat)
    params = _params(model, (IDS,))
    cache = sampling.init_cache(model, 2, 8)
    step = jax.jit(
        lambda p, c, m=model: m.apply(
            {'params': p, 'cache': c},
            IDS[:, :3],
            jnp.pad(MASK[:, :3], ((0, 0), (0, 5))),
            sampling_positions(MASK[:, :3]),
            decode=True,
            mutable=['cache'],
        )
    )
    outputs.append(step(params, cache))
  np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
  marian = cases['marian']
  outputs = []
  for remat in ('none', 'full'):
    model = _model(marian, remat)
    params = _params(model, marian[2])

    def decode(p, m=model):
      encoded = m.apply({'params': p}, IDS, MASK, method='encode')
      cross = m.apply({'params': p}, encoded, method='cross_keys_values')
      return m.apply(
          {'params': p},
          TARGET[:, :1],
          cross,
          MASK,
          cache=ed_decoding.init_cache(m, 2, 4),
          method='decode',
      )

    outputs.append(jax.jit(decode)(params))
  np.testing.assert_array_equal(outputs[0][0], outputs[1][0])


def sampling_positions(mask):
  return np.maximum(np.cumsum(mask, -1) - 1, 0) * mask


def test_bfloat16_on_cpu_keeps_its_dense_layers_under_remat(cases):
  """The platform's bfloat16 Dense (a custom VJP on CPU) under remat."""
  case = cases['llama']
  results = []
  for remat in ('none', 'dots_with_no_batch_dims_saveable'):
    model = _model(case, remat, dtype=jnp.bfloat16)
    params = _params(model, case[2])
    results.append(
        jax.jit(jax.value_and_grad(_loss_fn(model, case[2])))(params)
    )
  for a, b in zip(*map(jax.tree_util.tree_leaves, results)):
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_the_declared_choices_are_the_implemented_ones():
  assert FIELD['model.remat'].allowed.choices == remat_lib.CHOICES
  assert FIELD['model.remat'].default == 'none'
  assert FIELD['model.remat_names'].default == ()


def test_build_reads_the_run_config(cases):
  for family, case in cases.items():
    model = _model(case, 'save_only_these_names', ['attention_out'])
    assert model.config.remat == 'save_only_these_names', family
    assert model.config.remat_names == ('attention_out',), family
    assert _model(case, 'none').config.remat == 'none'


def test_bad_values_are_one_line_errors(cases):
  config = base_config()
  config.training.total_steps = 10
  config.model.remat = 'selective'
  with pytest.raises(checks.ConfigValueError) as error:
    checks.check(config)
  message = str(error.value)
  assert '\n' not in message
  assert "'none'" in message and "'save_only_these_names'" in message
  for remat, names, words in (
      ('full', ('attention_out',), 'read only by remat'),
      ('save_only_these_names', (), 'needs config.model.remat_names'),
      ('save_only_these_names', ('mlp_in',), "'mlp_in', which no block"),
  ):
    with pytest.raises(ValueError, match=words) as error:
      _model(cases['llama'], remat, names)
    assert '\n' not in str(error.value)
