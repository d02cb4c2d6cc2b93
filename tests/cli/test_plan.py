"""`python -m tuning.plan` (tuning/cli/plan.py): the train step of a tiny
random Llama compiled for 8 virtual devices, its per-device parameter and
optimizer bytes against the float32 sizes computed by hand, and each bad
command line as one error line. The planner runs in a subprocess: it sets
XLA_FLAGS before JAX starts."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import TINY_LLAMA
from conftest import subprocess_env

# Every dimension divisible by 8 (hidden 32, MLP 48, key/value 2 x 8 = 16,
# vocab 96): every parameter array shards over fsdp=8.
LLAMA = {**TINY_LLAMA, 'vocab_size': 96}
EXPERIMENT = os.path.join(ROOT, 'experiments', 'plan_llama.py')


def llama_parameters(c: dict) -> int:
  """A Llama's parameter count from its config.json, by hand."""
  hidden, mlp = c['hidden_size'], c['intermediate_size']
  head_dim = hidden // c['num_attention_heads']
  kv = c['num_key_value_heads'] * head_dim
  layer = (
      hidden * hidden * 2  # query, out
      + hidden * kv * 2  # key, value
      + hidden * mlp * 3  # gate, up, down
      + hidden * 2  # the two norms
  )
  embed = c['vocab_size'] * hidden
  head = 0 if c['tie_word_embeddings'] else embed
  return embed + head + c['num_hidden_layers'] * layer + hidden


def plan(*args, devices=8):
  env = subprocess_env(1)
  env.pop('XLA_FLAGS')  # the planner sets the device count itself
  return subprocess.run(
      [sys.executable, '-m', 'tuning.plan', f'--devices={devices}', *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.fixture(scope='module')
def model_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('plan')
  with open(folder / 'config.json', 'w', encoding='utf-8') as f:
    json.dump(LLAMA, f)
  return str(folder)


def per_device(stdout: str, row: str) -> int:
  match = re.search(rf'^  {re.escape(row)}\s+([\d,]+) B', stdout, re.M)
  assert match, stdout
  return int(match.group(1).replace(',', ''))


def tiny(model_folder, method='full'):
  return (
      f'--config={EXPERIMENT}:llama-3.2-1b,{method}',
      f'--config.model.hf_config={model_folder}',
      '--config.data.max_length=16',
      '--config.dtype=float32',
  )


def test_full_fine_tuning_plan_on_8_devices(model_folder):
  result = plan(*tiny(model_folder), '--device_memory=16GiB')
  assert result.returncode == 0, result.stderr
  out = result.stdout
  count = llama_parameters(LLAMA)
  assert f'{count:,} parameters ({count:,} trained)' in out
  assert 'mesh data=1 x fsdp=8' in out
  params = per_device(out, 'parameters')
  assert params == count * 4 // 8  # float32, every array over 8 devices
  # AdamW: two moments like the parameters, and int32 step counts.
  optimizer = per_device(out, 'optimizer state')
  assert 2 * params <= optimizer <= 2 * params + 64
  rows = re.findall(r'^  (?!total)[a-z].*?\s+([\d,]+) B', out, re.M)
  total = per_device(out, 'total')
  assert total == sum(int(r.replace(',', '')) for r in rows)
  assert per_device(out, 'gradients, activations (temporaries)') > 0
  assert 'fits 16GiB (16.00 GiB per device): yes' in out
  assert 'params/lm_head/kernel  float32[32, 96]' in out


def test_lora_plan_on_a_data_by_fsdp_mesh(model_folder):
  result = plan(
      *tiny(model_folder, 'lora'),
      '--config.lora.rank=4',
      '--mesh=data=2,fsdp=4',
      '--device_memory=1KiB',
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout
  base = llama_parameters(LLAMA)
  # Rank-4 adapters on 7 projections of each of the 2 layers:
  # A [in, 4] and B [4, out].
  hidden, mlp, kv = 32, 48, 16
  shapes = [(hidden, hidden)] * 2 + [(hidden, kv)] * 2 + [(hidden, mlp)] * 2
  shapes += [(mlp, hidden)]
  adapters = 2 * sum(4 * (i + o) for i, o in shapes)
  # The head trains too (the family's head rule): the untied output
  # layer and the final norm.
  trained = adapters + hidden * LLAMA['vocab_size'] + hidden
  assert f'{base + adapters:,} parameters ({trained:,} trained)' in out
  assert 'mesh data=2 x fsdp=4' in out
  assert per_device(out, 'parameters') == (base + adapters) * 4 // 4
  assert 'fits 1KiB (0.00 GiB per device): no' in out


@pytest.mark.parametrize(
    'args, message',
    [
        (('--mesh=data=3,fsdp=2',), 'data=3 x fsdp=2 = 6 devices, but there'),
        (('--device_memory=tpu9',), "--device_memory='tpu9': unknown device"),
        (
            ('--config.training.batch_size=4',),
            'batch_size=4 must be divisible by 8 devices',
        ),
        (
            ('--config.model.hf_config=/no/such/model',),
            'does not build or compile: ValueError: Hugging Face config not '
            'found',
        ),
    ],
)
def test_bad_input_is_one_line(model_folder, args, message):
  result = plan(*tiny(model_folder), *args)
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert message in lines[0]
