"""PEFT adapter export (tuning.formats.peft_export, `--format=peft`): a tiny
random Llama (GQA) and BERT with tuning's LoRA adapters (random, non-zero
lora_b), their base models exported as Hugging Face folders and the adapters
as PEFT folders: `peft.PeftModel.from_pretrained(base, DIR)` adapts exactly
the adapted layers and gives tuning's logits; a trained head goes to
`modules_to_save`; GPT-2's fused Conv1D layers are a one-line error."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import TINY_LLAMA, lora_config
from models.test_bert_parity import SMALL_CONFIG, _init_small, _inputs
from tuning.cli import export as export_lib
from tuning.formats import huggingface_export, peft_export
from tuning.methods import lora
from tuning.methods import naming as naming_lib
from tuning.models import bert_hf, decoder_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

IDS = np.array([[5, 17, 3, 9, 30, 21, 12], [7, 8, 9, 20, 3, 22, 31]], np.int32)
MASK = np.ones_like(IDS)
RANK, ALPHA = 4, 8.0


def _randomised(params, seed=0):
  """`params` as float32 numpy, 1-D ones (norms, biases) moved randomly so
  that a swapped or missing one shows."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: np.asarray(p, np.float32)
      + (
          0.1 * rng.normal(size=p.shape).astype(np.float32)
          if p.ndim == 1
          else 0
      ),
      params,
  )


def _with_adapters(family, base, targets=None, seed=1):
  """(LoRA config, params): `base` with adapters on `targets` (None: the
  family's) whose lora_b are random, not zero, so that they matter."""
  config = lora_config(rank=RANK, alpha=ALPHA, targets=targets)
  naming = naming_lib.resolve(family, lora_config=config)
  params = lora.add_adapters(base, config, jax.random.key(seed), naming)
  plain, adapters = lora.split(params)
  rng = np.random.default_rng(seed)
  adapters = {
      m: (a, 0.3 * rng.normal(size=b.shape).astype(np.float32))
      for m, (a, b) in adapters.items()
  }
  return config, naming, lora.join(plain, adapters)


def _tuning_logits(model, config, naming, params, *inputs):
  out = lora.LoraModel(model, config, naming).apply({'params': params}, *inputs)
  return np.asarray(out)


def _peft_model(auto_class, base_folder, adapter_folder):
  base = auto_class.from_pretrained(base_folder)
  return peft.PeftModel.from_pretrained(base, adapter_folder).eval()


def _adapted_modules(peft_model):
  """The transformers module names that PEFT put LoRA adapters on."""
  return {
      name.removeprefix('base_model.model.')
      for name, module in peft_model.named_modules()
      if isinstance(module, peft.tuners.lora.LoraLayer)
  }


def _torch_logits(peft_model, **inputs):
  with torch.no_grad():
    return peft_model(
        **{k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}
    ).logits.numpy()


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """(model, base params, base folder): a tiny random Llama (GQA, untied),
  its base exported by decoder_hf.export_hf + write_folder."""
  model = decoder_hf.from_hf_config(TINY_LLAMA)
  base = _randomised(model.init(jax.random.key(0), IDS, MASK)['params'])
  tensors, hf_config = decoder_hf.export_hf(base, TINY_LLAMA)
  folder = str(tmp_path_factory.mktemp('llama') / 'base')
  huggingface_export.write_folder(folder, tensors, hf_config, generative=True)
  return model, base, folder


# targets (None: the family's), the expected target_modules and
# layers_to_transform in adapter_config.json, the expected adapted modules.
LLAMA_CASES = {
    'every_linear_of_the_family_targets': (
        None,
        [
            'down_proj',
            'gate_proj',
            'k_proj',
            'o_proj',
            'q_proj',
            'up_proj',
            'v_proj',
        ],
        None,
        {
            f'model.layers.{i}.{m}'
            for i in range(2)
            for m in (
                'self_attn.q_proj',
                'self_attn.k_proj',
                'self_attn.v_proj',
                'self_attn.o_proj',
                'mlp.gate_proj',
                'mlp.up_proj',
                'mlp.down_proj',
            )
        },
    ),
    'query_value_of_layer_1': (
        (r'decoder/layer_1/attention/(query|value)',),
        ['q_proj', 'v_proj'],
        [1],
        {'model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.v_proj'},
    ),
    'mixed_modules_and_layers': (
        (r'decoder/layer_1/attention/query', r'decoder/layer_0/mlp/down'),
        r'model\.layers\.0\.mlp\.down_proj|model\.layers\.1\.self_attn\.q_proj',
        None,
        {'model.layers.0.mlp.down_proj', 'model.layers.1.self_attn.q_proj'},
    ),
}


@pytest.mark.parametrize('case', sorted(LLAMA_CASES))
def test_llama_adapter_in_peft_equals_tuning(case, llama, tmp_path):
  model, base, base_folder = llama
  targets, modules, layers, adapted = LLAMA_CASES[case]
  config, naming, params = _with_adapters(decoder_hf.FAMILY, base, targets)
  out = str(tmp_path / 'adapter')
  written = peft_export.write_adapter(
      out,
      lora.split(params)[1],
      decoder_hf.hf_linear_names(TINY_LLAMA),
      rank=RANK,
      alpha=ALPHA,
      dropout=0.0,
      task='causal_lm',
      base_model_name_or_path=base_folder,
  )
  assert sorted(written) == sorted(os.listdir(out))
  with open(os.path.join(out, 'adapter_config.json')) as f:
    adapter_config = json.load(f)
  assert adapter_config['target_modules'] == modules
  assert adapter_config['layers_to_transform'] == layers
  assert adapter_config['task_type'] == 'CAUSAL_LM'
  assert adapter_config['base_model_name_or_path'] == base_folder
  model_with_adapter = _peft_model(
      transformers.AutoModelForCausalLM, base_folder, out
  )
  assert _adapted_modules(model_with_adapter) == adapted
  ours = _tuning_logits(model, config, naming, params, IDS, MASK)
  plain = np.asarray(model.apply({'params': base}, IDS, MASK))
  assert np.abs(ours - plain).max() > 1e-2  # the adapters matter
  theirs = _torch_logits(model_with_adapter, input_ids=IDS, attention_mask=MASK)
  diff = np.abs(ours - theirs).max()
  print(f'{case}: max |logits diff| {diff:.2e}')
  assert diff <= 1e-4, case


def test_export_peft_saves_a_trained_head_as_modules_to_save(llama, tmp_path):
  """The export command's path (cli/export.export_peft) on a LoRA run that
  trained its head (lm_head and the final norm, lora.train_head)."""
  model, base, base_folder = llama
  config, naming, params = _with_adapters(decoder_hf.FAMILY, base)
  rng = np.random.default_rng(2)
  params['lm_head']['kernel'] = params['lm_head']['kernel'] + 0.3 * rng.normal(
      size=params['lm_head']['kernel'].shape
  ).astype(np.float32)
  params['decoder']['final_norm']['scale'] = params['decoder']['final_norm'][
      'scale'
  ] * np.float32(1.5)
  item = export_lib.Exportable(
      family=decoder_hf.FAMILY,
      params=params,
      hf_config=TINY_LLAMA,
      tokenizer_files=[],
      description='a test LoRA run',
      task='causal_lm',
      lora=config,
  )
  out = str(tmp_path / 'adapter')
  export_lib.export_peft(item, out, 'float32')
  with open(os.path.join(out, 'adapter_config.json')) as f:
    assert json.load(f)['modules_to_save'] == ['lm_head', 'model.norm']
  model_with_adapter = _peft_model(
      transformers.AutoModelForCausalLM, base_folder, out
  )
  ours = _tuning_logits(model, config, naming, params, IDS, MASK)
  theirs = _torch_logits(model_with_adapter, input_ids=IDS, attention_mask=MASK)
  assert np.abs(ours - theirs).max() <= 1e-4


def test_gpt2_adapters_are_a_one_line_error(tmp_path):
  gpt2 = dict(
      model_type='gpt2',
      vocab_size=32,
      n_embd=16,
      n_layer=2,
      n_head=2,
      n_positions=16,
  )
  model = decoder_hf.from_hf_config(gpt2)
  # Shapes are enough: add_adapters reads the kernels' shapes.
  base = jax.eval_shape(model.init, jax.random.key(0), IDS, MASK)['params']
  _, _, params = _with_adapters(decoder_hf.FAMILY, base)
  with pytest.raises(ValueError) as error:
    peft_export.write_adapter(
        str(tmp_path / 'adapter'),
        lora.split(params)[1],
        decoder_hf.hf_linear_names(gpt2),
        rank=RANK,
        alpha=ALPHA,
        dropout=0.0,
        task='causal_lm',
    )
  message = str(error.value)
  assert '\n' not in message
  assert 'decoder/layer_0/attention/key' in message and '--format=hf' in message
  assert not os.path.exists(tmp_path / 'adapter')


def test_bert_classification_adapter_and_head_in_peft_equal_tuning(tmp_path):
  """A BERT classification LoRA run (query/value adapters, its trained
  classifier as modules_to_save) on a BertForSequenceClassification base."""
  classes = ['a', 'b', 'c']
  model, base = _init_small(len(classes))
  base = _randomised(base)
  item_config = dict(SMALL_CONFIG)
  base_item = export_lib.Exportable(
      family=bert_hf.FAMILY,
      params=base,
      hf_config=item_config,
      tokenizer_files=[],
      description='the base',
      task='classification',
      class_names=classes,
  )
  base_folder = str(tmp_path / 'base')
  export_lib.export_hf(base_item, base_folder, 'float32', '5GB')
  config, naming, params = _with_adapters(bert_hf.FAMILY, base)
  rng = np.random.default_rng(3)
  params['classifier'] = jax.tree.map(
      lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32),
      params['classifier'],
  )
  item = export_lib.Exportable(
      family=bert_hf.FAMILY,
      params=params,
      hf_config=item_config,
      tokenizer_files=[],
      description='a test LoRA run',
      task='classification',
      lora=config,
      class_names=classes,
  )
  out = str(tmp_path / 'adapter')
  export_lib.export_peft(item, out, 'float32')
  with open(os.path.join(out, 'adapter_config.json')) as f:
    adapter_config = json.load(f)
  assert adapter_config['target_modules'] == ['query', 'value']
  assert adapter_config['task_type'] == 'SEQ_CLS'
  assert adapter_config['modules_to_save'] == ['classifier']
  model_with_adapter = _peft_model(
      transformers.AutoModelForSequenceClassification, base_folder, out
  )
  assert _adapted_modules(model_with_adapter) == {
      f'bert.encoder.layer.{i}.attention.self.{m}'
      for i in range(2)
      for m in ('query', 'value')
  }
  ids, mask, types = _inputs()
  ours = _tuning_logits(model, config, naming, params, ids, mask, types)
  plain = np.asarray(model.apply({'params': base}, ids, mask, types))
  assert np.abs(ours - plain).max() > 1e-2
  theirs = _torch_logits(
      model_with_adapter,
      input_ids=ids,
      attention_mask=mask,
      token_type_ids=types,
  )
  diff = np.abs(ours - theirs).max()
  print(f'BERT: max |logits diff| {diff:.2e}')
  assert diff <= 1e-4
