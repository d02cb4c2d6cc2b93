"""Shared test helpers: running main.py as a subprocess, reading run outputs
(checkpoints, parameters, logged losses), and a tiny random BERT with
optimizer/LoRA configs for in-process tests."""

import json
import os
import subprocess
import sys
import tempfile

from tuning.platform import xla_cpu

# Before JAX starts, as main.py does for float32 runs: Eigen's dots.
xla_cpu.choose()

import flax  # pylint: disable=g-bad-import-order,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tuning.config.defaults import base_config
from tuning.models.bert import BertClassifier, BertConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny_config.py')


# Markers (registered in pytest.ini): `cpu_kernels` for tests/platform/,
# `e2e` for these files (path) and tests (path::name: every parametrised
# case), `unit` for every other test. An entry that names no file or no
# collected test is an error, so that a rename cannot drop it silently.
CPU_KERNELS = 'tests/platform/'
E2E = (
    'tests/test_quickstart.py',
    'tests/test_bad_inputs.py',
    'tests/modes/test_main.py',
    'tests/modes/test_finetuning_runs.py',
    'tests/modes/test_lora_ema_runs.py',
    'tests/engine/test_mesh.py',
    'tests/engine/test_multihost.py',
    'tests/engine/test_faults.py',
    'tests/engine/test_preemption.py',
    'tests/multirun/test_ensembles.py',
    'tests/multirun/test_distillation.py',
    'tests/multirun/test_checkpoint_averaging.py',
    'tests/sweep/test_sweep.py',
    'tests/tasks/test_causal_lm.py::test_training_lowers_validation_perplexity',
    'tests/tasks/test_causal_lm.py::test_causal_lm_resumes_exactly',
    'tests/tasks/test_causal_lm.py::'
    'test_lora_on_the_decoder_trains_adapters_and_head_only',
    'tests/tasks/test_causal_lm.py::test_causal_lm_under_the_mesh_equals_pmap',
    'tests/tasks/test_causal_lm.py::'
    'test_eval_at_start_is_the_initial_parameters_validation',
    'tests/tasks/test_causal_lm.py::'
    'test_generate_from_a_run_workdir_uses_its_merged_final_params',
    'tests/tasks/test_causal_lm.py::'
    'test_freezing_layer_decay_ema_accumulation_and_bf16_together',
    'tests/tasks/test_seq2seq.py::test_tiny_transformer_learns_to_copy',
    'tests/tasks/test_seq2seq.py::test_seq2seq_resumes_exactly',
    'tests/tasks/test_tasks.py::'
    'test_regression_learns_and_reports_its_own_metrics',
    'tests/tasks/test_tasks.py::test_regression_resumes_exactly',
    'tests/tasks/test_tasks.py::test_regression_under_the_mesh_equals_pmap',
    'tests/data/test_instruction_data.py::'
    'test_training_on_packed_conversations_learns_the_replies',
    'tests/data/test_records.py::'
    'test_main_trains_from_records_like_from_the_files',
    'tests/models/test_models_and_sources.py::test_cnn_on_digit_images',
    'tests/models/test_models_and_sources.py::'
    'test_recurrent_text_classifier_on_sst2',
    'tests/cli/test_translate.py::test_cli_matches_transformers_in_input_order',
    'tests/formats/test_gguf_checkpoint.py::'
    'test_convert_folder_and_generate_command',
    'tests/cli/test_export.py',
    'tests/cli/test_plan.py',
    'tests/methods/test_quantization.py::'
    'test_nf4_run_loads_float32_weights_and_resumes_exactly',
)


def pytest_configure(config):
  """Every in-process compilation uses the subprocesses' compilation cache:
  tests that train the same tiny model compile it once."""
  del config
  enable_compilation_cache()


def pytest_collection_modifyitems(config, items):
  """Marks each test cpu_kernels, e2e or unit (see E2E above)."""
  del config
  modules = {}
  for item in items:
    path = os.path.relpath(str(item.path), ROOT).replace(os.sep, '/')
    name = getattr(item, 'originalname', item.name)
    modules[path] = getattr(item, 'module', None)
    entries = {path, f'{path}::{name}'} & set(E2E)
    if path.startswith(CPU_KERNELS):
      item.add_marker(pytest.mark.cpu_kernels)
    elif entries:
      item.add_marker(pytest.mark.e2e)
    else:
      item.add_marker(pytest.mark.unit)
  for entry in E2E:
    path, _, name = entry.partition('::')
    if not os.path.exists(os.path.join(ROOT, path)):
      raise pytest.UsageError(f'tests/conftest.py E2E: no file {path}')
    if name and modules.get(path) and not hasattr(modules[path], name):
      raise pytest.UsageError(
          f'tests/conftest.py E2E: no test {entry} (renamed? update E2E)'
      )


def main_command(*args):
  return [sys.executable, os.path.join(ROOT, 'main.py'), *args]


# Subprocesses share a persistent compilation cache: the same tiny models
# are compiled by many tests.
_CACHE = os.path.join(tempfile.gettempdir(), 'tuning-tests-jax-cache')


def subprocess_env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  return env


def run_main(*args, devices=1, check=True, timeout=300, cwd=ROOT):
  """Runs main.py; returns the CompletedProcess (text output)."""
  env = subprocess_env(devices)
  result = subprocess.run(
      main_command(*args),
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  if check and result.returncode != 0:
    raise AssertionError(
        f'main.py failed ({result.returncode}):\n'
        f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    )
  return result


def run_main_in_process(*args, check=True, cwd=ROOT):
  """main.py's run (`main.cli`, what main.py runs after parsing its
  flags) with `args` in this process; returns a CompletedProcess as
  `run_main` does (returncode, stdout, stderr), without a fresh process's
  ~10 s of importing JAX and compiling.

  For float32 runs on one device only: this process has one CPU device and
  chose Eigen's dots when it started. Tests whose point is the process
  (devices, kills, the dot-kernel choice, malloc, absl flags) use
  `run_main`."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  from absl import logging  # pylint: disable=g-import-not-at-top

  import main  # pylint: disable=g-import-not-at-top

  for arg in args:
    if arg.startswith(('--config.dtype=bfloat16', '--xla_cpu_dots=')):
      raise ValueError(
          f'run_main_in_process({arg!r}): this process runs float32 dots '
          'only; use run_main for bfloat16 or a dot-kernel choice'
      )
  enable_compilation_cache()
  out, err = io.StringIO(), io.StringIO()
  verbosity, here = logging.get_verbosity(), os.getcwd()
  logging.set_verbosity(logging.ERROR)  # as main.py: orbax logs every file
  try:
    os.chdir(cwd)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = main.cli(['main.py', *args])
  finally:
    os.chdir(here)
    logging.set_verbosity(verbosity)
  result = subprocess.CompletedProcess(
      ['main.py', *args], code, out.getvalue(), err.getvalue()
  )
  if check and code != 0:
    raise AssertionError(
        f'main.cli failed ({code}):\n{result.stdout[-3000:]}\n'
        f'{result.stderr[-3000:]}'
    )
  return result


def run_main_processes(*args, processes=2, devices=1, timeout=300):
  """Runs main.py as `processes` JAX processes on 127.0.0.1 (gloo), each
  with `devices` devices; returns their outputs (stdout + stderr)."""
  import portpicker  # pylint: disable=g-import-not-at-top

  port = portpicker.pick_unused_port()
  procs = [
      subprocess.Popen(
          main_command(
              *args,
              f'--coordinator_address=127.0.0.1:{port}',
              f'--num_processes={processes}',
              f'--process_id={i}',
          ),
          cwd=ROOT,
          env=subprocess_env(devices),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(processes)
  ]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert [p.returncode for p in procs] == [0] * processes, ''.join(
      o[-2000:] for o in outputs
  )
  return outputs


def fresh_python_stdout(code: str, *args) -> str:
  """stdout of `python -c code *args` in a fresh CPU process without the
  caller's XLA_FLAGS (for what XLA decides when it starts: dot kernels)."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-c', code, *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout


def read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


@pytest.fixture
def tiny_config():
  return TINY


def tree_digest(
    workdir, names=('checkpoints', 'results.json', 'metrics.jsonl')
):
  """{relative path: sha256} of a run's checkpoints and results (to check
  that a failed rerun left them untouched)."""
  import hashlib  # pylint: disable=g-import-not-at-top

  digests = {}
  for name in names:
    top = os.path.join(workdir, name)
    paths = (
        [top]
        if os.path.isfile(top)
        else [
            os.path.join(root, f)
            for root, _, files in os.walk(top)
            for f in files
        ]
    )
    for path in paths:
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, workdir)] = hashlib.sha256(
            f.read()
        ).hexdigest()
  return digests


def error_lines(text):
  return [l for l in text.splitlines() if l.startswith('error:')]


def corrupt_largest_file(step_dir):
  """Flips bytes in the largest data file of an orbax checkpoint step."""
  files = [
      os.path.join(root, f)
      for root, _, names in os.walk(step_dir)
      for f in names
      if os.sep + 'd' + os.sep in os.path.join(root, f)
  ]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    for i in range(len(data) // 3, len(data) // 3 + 64):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)
  return path


def enable_compilation_cache():
  """In-process runs (main.cli) use the subprocesses' compilation cache."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_compilation_cache_dir', _CACHE)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


# Run outputs: checkpoints, parameters and logged losses.


def final_params(workdir):
  """The parameters of a run's latest checkpoint, as numpy arrays."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  step = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(ckpt_dir, str(step), 'state')
  )
  return step, state['params']


def flat(tree):
  """{'a/b/kernel': numpy array} of a nested parameter tree."""
  return {
      k: np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(
          flax.core.unfreeze(tree), sep='/'
      ).items()
  }


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [eval(l.replace('NaN', 'float("nan")')) for l in f]  # pylint: disable=eval-used
  return {l['step']: l['loss'] for l in lines if l['split'] == 'train'}


def assert_same_training(workdir, reference):
  """Same train losses and final parameters, to float tolerance."""
  losses, expected = train_losses(workdir), train_losses(reference)
  assert losses.keys() == expected.keys()
  np.testing.assert_allclose(
      list(losses.values()), list(expected.values()), rtol=1e-5, atol=1e-6
  )
  params, expected = flat(final_params(workdir)[1]), flat(
      final_params(reference)[1]
  )
  for k in expected:
    np.testing.assert_allclose(params[k], expected[k], rtol=1e-4, atol=1e-5)


# A tiny random BERT and optimizer/LoRA configs for in-process tests.

TINY_BERT = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
)
IDS = np.array([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)


def tiny_bert(dtype=jnp.float32, dropout=0.0):
  cfg = TINY_BERT.__class__(
      **{
          **TINY_BERT.__dict__,
          'hidden_dropout_prob': dropout,
          'attention_probs_dropout_prob': dropout,
      }
  )
  return BertClassifier(cfg, num_outputs=2, dtype=dtype)


def bert_params(model=None):
  model = model or tiny_bert()
  return model.init({'params': jax.random.key(0)}, IDS[:1], MASK[:1])['params']


def opt_config(**overrides):
  c = base_config().optimizer
  c.weight_decay = 0.01
  c.update(overrides)
  return c


def step_config(**training):
  """A run config for train_step_fn / make_train_step: base_config() with
  these config.training fields set (e.g. on_nonfinite='skip')."""
  c = base_config()
  c.training.update(training)
  return c


def lora_config(**overrides):
  c = base_config().lora
  c.rank = 4
  c.update(overrides)
  return c


def preempted_then_resumed(config, workdir, monkeypatch, step=20):
  """Runs `config` in-process, sends SIGTERM right after the checkpoint of
  `step` is saved, checks that the run stopped there, and returns the
  results of the rerun (which resumes)."""
  import signal  # pylint: disable=g-import-not-at-top

  from tuning.modes import experiment  # pylint: disable=g-import-not-at-top
  from tuning.engine.checkpoints import RunCheckpoints  # pylint: disable=g-import-not-at-top

  save = RunCheckpoints.save

  def save_then_preempt(self, saved_step, *args, **kwargs):
    save(self, saved_step, *args, **kwargs)
    if saved_step == step:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(RunCheckpoints, 'save', save_then_preempt)
  assert experiment.run(config, workdir) == {'preempted_at_step': step}
  monkeypatch.setattr(RunCheckpoints, 'save', save)
  return experiment.run(config, workdir)


# Tiny random Hugging Face configs (transformers' field names) for the
# decoder and encoder-decoder tests; each test overrides what it needs.
TINY_LLAMA = dict(
    model_type='llama',
    vocab_size=32,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=500.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_MARIAN = dict(
    vocab_size=16,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=64,
    pad_token_id=0,
    decoder_start_token_id=0,
    eos_token_id=1,
    forced_eos_token_id=None,
    scale_embedding=True,
    activation_function='swish',
    init_std=0.3,
)
