"""Every bad input is one `error:` line naming the problem and the fix.

Table-driven, in this process (`main.cli`, what main.py runs): each case
reruns main.py on a copy of a finished run's work directory with one bad
value, file or folder, and checks the exit code, exactly one `error:` line
with the expected words, no traceback, and that the run's checkpoints,
results and metrics are untouched.
"""

import json
import os
import shutil

import numpy as np
import pytest

import main
from conftest import (
    TINY,
    corrupt_largest_file,
    enable_compilation_cache,
    error_lines,
    tree_digest,
)

CSV_HEADER = 'a,b,c,label\n'


def _csv_rows(n=60, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return ''.join(
      f'{rng.normal():.3f},{rng.normal():.3f},{rng.normal():.3f},'
      f'{i % classes}\n'
      for i in range(n)
  )


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """The bad (and a few good) inputs the cases point at."""
  d = tmp_path_factory.mktemp('inputs')
  f = {}

  def write(name, text, mode='w'):
    path = str(d / name)
    with open(path, mode) as out:
      out.write(text)
    f[name] = path

  write('good.csv', CSV_HEADER + _csv_rows())
  write('empty.csv', '')
  write('header_only.csv', CSV_HEADER)
  write('malformed.csv', CSV_HEADER + '1,2,3,0\n1,2,0\n' + _csv_rows())
  write('not_a_number.csv', CSV_HEADER + '1,x,3,0\n' + _csv_rows())
  write(
      'latin1.csv',
      (CSV_HEADER + _csv_rows()).encode() + b'0.1,0.2,0.3,caf\xe9\n',
      'wb',
  )
  write('single_class.csv', CSV_HEADER + _csv_rows(classes=1))
  write(
      'unseen_label.csv',
      CSV_HEADER + ''.join(f'{i}.5,1,2,{3 + i % 2}\n' for i in range(20)),
  )
  write(
      'all_inf.csv',
      CSV_HEADER + ''.join(f'inf,{i},-inf,{i % 2}\n' for i in range(40)),
  )
  write(
      'all_nan.csv',
      CSV_HEADER + ''.join(f'nan,nan,nan,{i % 2}\n' for i in range(40)),
  )
  write(
      'text.tsv',
      'sentence\tlabel\n'
      + ''.join(f'word{i} other{i % 3} thing\t{i % 2}\n' for i in range(200)),
  )
  f['missing.csv'] = str(d / 'missing.csv')
  # Hugging Face folders
  bert = {
      'model_type': 'bert',
      'architectures': ['BertModel'],
      'hidden_size': 8,
      'num_hidden_layers': 1,
      'num_attention_heads': 2,
      'intermediate_size': 16,
      'vocab_size': 30,
      'max_position_embeddings': 16,
      'type_vocab_size': 2,
      'hidden_act': 'gelu',
      'layer_norm_eps': 1e-12,
  }
  for name, config in (
      ('hf_no_weights', bert),
      ('hf_corrupt', bert),
      (
          'hf_mamba',
          {
              'model_type': 'mamba',
              'architectures': ['MambaForCausalLM'],
              'hidden_size': 8,
          },
      ),
  ):
    os.makedirs(d / name)
    with open(d / name / 'config.json', 'w') as out:
      json.dump(config, out)
    f[name] = str(d / name)
  with open(d / 'hf_corrupt' / 'model.safetensors', 'wb') as out:
    out.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"not": json' + b'\0' * 64)
  os.makedirs(d / 'no_tokenizer')
  f['no_tokenizer'] = str(d / 'no_tokenizer')
  # Instruction data: a word-level tokenizer with a chat template.
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  special = ['<pad>', '</s>', '<|im_start|>', '<|im_end|>']
  words = 'user assistant the cat sat'.split()
  tokenizer = Tokenizer(
      models.WordLevel(
          {t: i for i, t in enumerate(special + words)}, unk_token='<pad>'
      )
  )
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.add_special_tokens(special)
  os.makedirs(d / 'chat_model')
  tokenizer.save(str(d / 'chat_model' / 'tokenizer.json'))
  with open(d / 'chat_model' / 'tokenizer_config.json', 'w') as out:
    json.dump(
        {
            'eos_token': '<|im_end|>',
            'chat_template': (
                '{% for m in messages %}<|im_start|>{{ m.role }} '
                '{{ m.content }}<|im_end|> {% endfor %}'
            ),
        },
        out,
    )
  f['chat_model'] = str(d / 'chat_model')
  chat = lambda *turns: json.dumps(  # pylint: disable=unnecessary-lambda-assignment
      {'messages': [{'role': r, 'content': c} for r, c in turns]}
  )
  good = chat(('user', 'the cat'), ('assistant', 'sat')) + '\n'
  write('bad_role.jsonl', good * 2 + chat(('robot', 'the')) + '\n' + good * 20)
  write(
      'long_prompt.jsonl',
      good * 3
      + chat(('user', 'the cat ' * 40), ('assistant', 'sat'))
      + '\n'
      + good * 20,
  )
  return f


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished tiny run: checkpoints, results.json, metrics.jsonl."""
  enable_compilation_cache()
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  assert (
      main.cli(
          [
              'main.py',
              f'--config={TINY}',
              f'--workdir={workdir}',
              '--config.training.total_steps=20',
              '--config.training.eval_every_steps=10',
          ]
      )
      == 0
  )
  return workdir


CSV = ('--config.data.source=csv',)
NEW = '--workdir={empty_workdir}'  # a new work directory
CHAT = (  # conversations for causal_lm (loss on the assistant turns)
    NEW,
    '--config.task=causal_lm',
    '--config.data.source=jsonl',
    '--config.data.messages_column=messages',
    '--config.data.tokenizer={chat_model}',
    '--config.data.max_length=16',
    '--config.data.drop_duplicates=false',
    '--config.model.name=llama',
)

# (id, extra argv ({placeholders} from the files fixture), exit code,
#  words the error line must hold)
CASES = [
    # ---- config values and types
    (
        'batch_size_0',
        ['--config.training.batch_size=0'],
        1,
        ['config.training.batch_size=0', 'at least 1'],
    ),
    (
        'batch_size_negative',
        ['--config.training.batch_size=-8'],
        1,
        ['config.training.batch_size=-8'],
    ),
    (
        'batch_size_not_a_number',
        ['--config.training.batch_size=abc'],
        2,
        ["'abc'", '--config.training.batch_size', 'an int'],
    ),
    (
        'learning_rate_negative',
        ['--config.optimizer.learning_rate=-1'],
        1,
        ['config.optimizer.learning_rate=-1.0', 'positive learning rate'],
    ),
    (
        'learning_rate_not_a_number',
        ['--config.optimizer.learning_rate=fast'],
        2,
        ["'fast'", 'a float'],
    ),
    (
        'dropout_one',
        ['--config.model.dropout=1.0'],
        1,
        ['config.model.dropout=1.0', '[0, 1)'],
    ),
    (
        'dropout_negative',
        ['--config.model.dropout=-0.1'],
        1,
        ['config.model.dropout=-0.1'],
    ),
    (
        'warmup_longer_than_run',
        ['--config.optimizer.warmup_steps=500'],
        1,
        [
            'warm-up of 500 steps is longer than the run (40 steps)',
            'warmup_steps',
        ],
    ),
    (
        'eval_batch_0',
        ['--config.training.eval_batch_size=0'],
        1,
        ['config.training.eval_batch_size=0'],
    ),
    (
        'total_steps_0',
        ['--config.training.total_steps=0'],
        1,
        ['config.training.total_steps=0'],
    ),
    (
        'steps_and_epochs',
        ['--config.training.total_epochs=2.0'],
        1,
        ['both set', 'only one'],
    ),
    (
        'unknown_optimizer',
        ['--config.optimizer.name=adamx'],
        1,
        ["unknown config.optimizer.name 'adamx'", "'adamw'"],
    ),
    (
        'unknown_model',
        ['--config.model.name=transformer'],
        1,
        ["'transformer'", 'mlp'],
    ),
    (
        'accumulation_does_not_split',
        ['--config.training.accumulation_steps=3'],
        1,
        ['accumulation_steps=3', 'multiple'],
    ),
    (
        'validation_fraction',
        ['--config.data.validation_fraction=1.5'],
        1,
        ['config.data.validation_fraction=1.5'],
    ),
    (
        'unknown_mode',
        ['--config.mode=predict'],
        1,
        ["unknown config.mode 'predict'", "'eval'"],
    ),
    (
        'zero_layer_size',
        ['--config.model.hidden=(0,)'],
        1,
        ['config.model.hidden', 'positive layer sizes'],
    ),
    (
        'unknown_key',
        ['--config.optimizer.lrr=1e-3'],
        2,
        ['--config.optimizer.lrr', 'did you mean', 'learning_rate'],
    ),
    # ---- data files
    (
        'data_missing',
        [*CSV, '--config.data.path={missing.csv}'],
        1,
        ['not found', 'missing.csv', 'config.data.path'],
    ),
    (
        'data_empty',
        [*CSV, '--config.data.path={empty.csv}'],
        1,
        ['empty.csv', 'empty'],
    ),
    (
        'data_header_only',
        [*CSV, '--config.data.path={header_only.csv}'],
        1,
        ['header_only.csv', 'no rows'],
    ),
    (
        'data_malformed_row',
        [*CSV, '--config.data.path={malformed.csv}'],
        1,
        ['malformed.csv:3', 'expected 4 fields'],
    ),
    (
        'data_not_a_number',
        [*CSV, '--config.data.path={not_a_number.csv}'],
        1,
        ['not_a_number.csv:2', 'not a number'],
    ),
    (
        'data_wrong_encoding',
        [*CSV, '--config.data.path={latin1.csv}'],
        1,
        ['latin1.csv:', 'UTF-8'],
    ),
    (
        'instruction_unknown_role',
        [*CHAT, '--config.data.path={bad_role.jsonl}'],
        1,
        ['bad_role.jsonl:3:', 'unknown role "robot"', 'on_bad_rows'],
    ),
    (
        'instruction_prompt_fills_max_length',
        [*CHAT, '--config.data.path={long_prompt.jsonl}'],
        1,
        ['long_prompt.jsonl:4:', 'no response token fits', 'max_length=16'],
    ),
    (
        'data_missing_label_column',
        [
            *CSV,
            '--config.data.path={good.csv}',
            '--config.data.label_column=target',
        ],
        1,
        ["no label column 'target'", 'label_column'],
    ),
    (
        'data_missing_feature_column',
        [
            *CSV,
            '--config.data.path={good.csv}',
            "--config.data.feature_columns=('a', 'zzz')",
        ],
        1,
        ['zzz', 'feature_columns'],
    ),
    (
        'data_single_class',
        [*CSV, '--config.data.path={single_class.csv}'],
        1,
        ['single_class.csv', 'one class'],
    ),
    (
        'data_label_unseen_in_train',
        [
            *CSV,
            '--config.data.path={good.csv}',
            '--config.data.validation_path={unseen_label.csv}',
        ],
        1,
        ['validation split is empty', 'data files'],
    ),
    (
        'data_inf_features_all_dropped',
        [*CSV, '--config.data.path={all_inf.csv}'],
        1,
        ['0 training rows', 'test_fraction'],
    ),
    (
        'data_all_nan',
        [*CSV, '--config.data.path={all_nan.csv}'],
        1,
        ['0 training rows', 'test_fraction'],
    ),
    # ---- checkpoints
    (
        'init_missing',
        [NEW, '--config.init.checkpoint={missing.csv}'],
        1,
        ['init checkpoint not found', 'config.init.checkpoint'],
    ),
    (
        'init_corrupt',
        [NEW, '--config.init.checkpoint={corrupt_run}'],
        1,
        ['is corrupt', 'config.init.step'],
    ),
    (
        'init_mismatched_shapes',
        [
            NEW,
            '--config.init.checkpoint={trained}',
            '--config.data.classes=(0,1)',
        ],
        1,
        [
            'head/kernel: checkpoint has (32, 10), model wants (32, 2)',
            'config.init.reinit',
        ],
    ),
    (
        'init_no_such_step',
        [NEW, '--config.init.checkpoint={trained}', '--config.init.step=999'],
        1,
        ['no checkpoint step 999', 'steps there: '],
    ),
    (
        'resume_another_models_checkpoint',
        ['--config.model.hidden=(16,)'],
        1,
        ['written by another model', 'dense_0/kernel', 'new --workdir'],
    ),
    (
        'eval_without_checkpoint',
        ['--config.mode=eval', '--workdir={empty_workdir}'],
        1,
        ['no checkpoint in', 'train first'],
    ),
    # ---- Hugging Face folders
    (
        'hf_no_safetensors',
        [NEW, '--config.init.checkpoint={hf_no_weights}'],
        1,
        ['hf_no_weights', 'safetensors'],
    ),
    (
        'hf_corrupt_safetensors',
        [NEW, '--config.init.checkpoint={hf_corrupt}'],
        1,
        ['model.safetensors'],
    ),
    (
        'hf_unknown_architecture',
        [NEW, '--config.init.checkpoint={hf_mamba}'],
        1,
        ['mamba'],
    ),
    (
        'tokenizer_missing',
        [
            *CSV,
            '--config.data.path={text.tsv}',
            '--config.data.source=tsv',
            '--config.data.text_column=sentence',
            '--config.model.name=lstm',
            '--config.data.tokenizer={no_tokenizer}',
        ],
        1,
        ['no_tokenizer', 'tokenizer.json or vocab.txt'],
    ),
    # ---- devices and mesh
    (
        'unknown_parallelism',
        ['--config.parallelism=ring'],
        1,
        ["config.parallelism='ring'", 'pmap, mesh'],
    ),
    (
        'mesh_more_devices_than_there_are',
        ['--config.parallelism=mesh', '--config.mesh.fsdp=2'],
        1,
        ['config.mesh', 'devices'],
    ),
    (
        'mesh_axis_zero',
        ['--config.parallelism=mesh', '--config.mesh.data=0'],
        1,
        ['config.mesh.data=0', '-1'],
    ),
    # ---- model / data mismatches
    (
        'text_model_numeric_features',
        ['--config.model.name=lstm'],
        1,
        ["'lstm' needs text data", 'text_column'],
    ),
    (
        'numeric_model_text_data',
        [
            '--config.data.source=tsv',
            '--config.data.path={text.tsv}',
            '--config.data.text_column=sentence',
        ],
        1,
        ['mlp', 'text', 'model.name'],
    ),
    (
        'fewer_classes_than_data',
        ['--config.model.num_classes=3'],
        1,
        ['num_classes=3', 'smaller than the 10 classes'],
    ),
    (
        'cnn_without_image_shape',
        ['--config.model.name=cnn'],
        1,
        ['image_shape'],
    ),
    # ---- the work directory
    (
        'workdir_is_a_file',
        ['--workdir={good.csv}'],
        1,
        ['is a file, not a directory'],
    ),
]


def _fill(arg, places):
  for key, value in places.items():
    arg = arg.replace('{' + key + '}', value)
  return arg


@pytest.mark.parametrize(
    'args,code,words', [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_error_line(
    args, code, words, files, trained, tmp_path, capfd
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  places = dict(files, trained=trained, empty_workdir=str(tmp_path / 'new'))
  if any('{corrupt_run}' in a for a in args):
    places['corrupt_run'] = str(tmp_path / 'corrupt')
    shutil.copytree(trained, places['corrupt_run'])
    corrupt_largest_file(
        os.path.join(places['corrupt_run'], 'checkpoints', '20')
    )
  args = [_fill(a, places) for a in args]
  if not any(a.startswith('--workdir=') for a in args):
    args.append(f'--workdir={workdir}')
  watched = [w for w in (workdir, trained, places.get('corrupt_run')) if w]
  before = {w: tree_digest(w) for w in watched}
  file_before = tree_digest(os.path.dirname(files['good.csv']), ('good.csv',))
  assert main.cli(['main.py', f'--config={TINY}', *args]) == code
  out, err = capfd.readouterr()
  lines = error_lines(err)
  assert len(lines) == 1, err
  assert 'Traceback' not in out + err, out + err
  for word in words:
    assert word in lines[0], lines[0]
  for w in watched:
    assert tree_digest(w) == before[w], w
  assert (
      tree_digest(os.path.dirname(files['good.csv']), ('good.csv',))
      == file_before
  )


def test_there_are_at_least_30_cases():
  assert len(CASES) >= 30
