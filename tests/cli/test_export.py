"""`python -m tuning.export --format=hf` end to end (tuning/cli/export.py):
a tiny LoRA causal_lm run trained here, exported with its adapters merged,
loaded by transformers (the run's logits, its tokenizer's ids); and each
bad command line as one error line with its exit code."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import enable_compilation_cache
from conftest import flat
from conftest import read_json
from tasks.test_causal_lm import causal_config
from tasks.test_causal_lm import write_model_folder
from tasks.test_causal_lm import write_text_csv
from tuning.cli import export
from tuning.cli import generate
from tuning.formats import huggingface as hf_convert
from tuning.modes import experiment
import tiny_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXTS = ['the cat sat on the mat', 'a bird flew over the tree', 'dog ran to']


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """The work directory of 4 steps of a rank-4 LoRA run on a tiny random
  Llama whose folder has a tokenizer.json and a tokenizer_config.json."""
  enable_compilation_cache()
  root = tmp_path_factory.mktemp('export')
  folder = write_model_folder(root / 'model')
  with open(
      os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8'
  ) as f:
    json.dump(
        {
            'tokenizer_class': 'PreTrainedTokenizerFast',
            'bos_token': '<s>',
            'eos_token': '</s>',
            'pad_token': '<pad>',
            'unk_token': '<unk>',
        },
        f,
    )
  config = causal_config(folder, write_text_csv(root / 'text.csv', rows=64))
  config.training.total_steps = 4
  config.training.eval_every_steps = 4
  config.training.checkpoint_every_steps = 4
  config.lora.rank = 4
  config.optimizer.warmup_steps = 1
  workdir = str(root / 'run')
  experiment.run(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def exported(lora_run, tmp_path_factory):
  workdir = lora_run
  out = str(tmp_path_factory.mktemp('exported') / 'hf')
  assert (
      export.main([f'--checkpoint={workdir}', '--format=hf', f'--out={out}'])
      == 0
  )
  return out


@pytest.fixture(scope='module')
def run_model(lora_run):
  """The run's merged model, params and tokenizer, as finished_run loads
  them (generate.load: LoRA adapters merged)."""
  return generate.load(lora_run)


def _batch():
  ids = np.array([[1, 4, 5, 6, 7, 4, 8], [0, 0, 1, 10, 11, 12, 4]], np.int32)
  return ids, (ids > 0).astype(np.int32)


def test_transformers_gives_the_run_merged_model_logits(run_model, exported):
  assert read_json(os.path.join(exported, 'config.json'))['architectures'] == [
      'LlamaForCausalLM'
  ]
  ids, mask = _batch()
  ours = np.asarray(
      run_model.model.apply({'params': run_model.params}, ids, mask)
  )
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      exported, dtype=torch.float32
  ).eval()
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    theirs = hf(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    ).logits.numpy()
  assert np.abs(ours - theirs)[mask > 0].max() <= 1e-4
  assert sorted(os.listdir(exported)) == [
      'config.json',
      'generation_config.json',
      'model.safetensors',
      'tokenizer.json',
      'tokenizer_config.json',
  ]


def test_converting_the_export_back_gives_the_merged_params(
    run_model, exported, tmp_path
):
  merged = flat(run_model.params)
  out = str(tmp_path / 'converted')
  hf_convert.convert(exported, out, verbose=False)
  back = flat(hf_convert.load_converted_params(out))
  assert back.keys() == merged.keys()
  for key, value in merged.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_the_tokenizer_gives_the_run_tokenizer_ids(run_model, exported):
  ours = run_model.tokenizer
  theirs = transformers.AutoTokenizer.from_pretrained(exported)
  for text in TEXTS:
    assert theirs(text)['input_ids'] == ours.encode(text).ids, text
  assert theirs.eos_token_id == 2 and theirs.pad_token_id == 0


def one_error_line(capfd) -> str:
  """stderr: one `error:` line and nothing else."""
  err = capfd.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: '), err
  return err


def test_bad_command_lines_are_one_line_errors(lora_run, tmp_path, capfd):
  workdir = lora_run
  out = str(tmp_path / 'out')
  run = [f'--checkpoint={workdir}', f'--out={out}']
  cases = [
      (['--format=onnx'], 2, "--format='onnx': use one of hf, peft, gguf"),
      (['--format=hf', '--dtype=int8'], 2, "--dtype='int8': use one of"),
      (['--format=gguf', '--quant=q4_k'], 2, "--quant='q4_k': use one of"),
      (
          ['--format=hf', '--max_shard_size=lots'],
          2,
          "--max_shard_size='lots': give a size such as 5GB",
      ),
  ]
  for args, code, message in cases:
    assert export.main(run + args) == code, args
    assert message in one_error_line(capfd), args
  assert not os.path.exists(out)
  os.makedirs(out)
  with open(os.path.join(out, 'x.txt'), 'w', encoding='utf-8') as f:
    f.write('x')
  assert export.main(run + ['--format=hf']) == 1
  assert 'exists and is not an empty folder' in one_error_line(capfd)


def test_a_run_with_no_checkpoint(lora_run, tmp_path, capfd):
  workdir = lora_run
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  shutil.copy(os.path.join(workdir, 'config.json'), untrained)
  out = str(tmp_path / 'out')
  args = [f'--checkpoint={untrained}', '--format=hf', f'--out={out}']
  assert export.main(args) == 1
  assert 'no checkpoint in' in one_error_line(capfd)
  assert not os.path.exists(out)


def test_a_family_with_no_export(tmp_path, capfd):
  """An mlp run (tests/tiny_config.py) has no Hugging Face form: the error
  says so before reading any checkpoint."""
  run = tmp_path / 'mlp'
  run.mkdir()
  (run / 'config.json').write_text(tiny_config.get_config().to_json())
  out = str(tmp_path / 'out')
  assert (
      export.main([f'--checkpoint={run}', '--format=hf', f'--out={out}']) == 1
  )
  line = one_error_line(capfd)
  assert 'has no --format=hf export' in line and 'mlp' in line, line


def test_a_checkpoint_that_is_neither_run_nor_converted_folder(tmp_path, capfd):
  (tmp_path / 'folder').mkdir()
  (tmp_path / 'file.txt').write_text('x')
  for checkpoint in ('folder', 'file.txt', 'missing'):
    args = [
        f'--checkpoint={tmp_path / checkpoint}',
        '--format=hf',
        f'--out={tmp_path / "out"}',
    ]
    assert export.main(args) == 1, checkpoint
    line = one_error_line(capfd)
    assert 'is neither a run work directory' in line, line
