"""experiments/text_classification.py on a headerless four-class TSV (AG
News's shape, `text<TAB>label`): one command trains and reports each
class."""

import json
import os

import numpy as np

from conftest import ROOT, run_main_in_process

CONFIG = os.path.join(ROOT, 'experiments', 'text_classification.py')
TOPICS = {
    'world': 'minister election border treaty capital protest embassy',
    'sports': 'match goal season coach league striker tournament',
    'business': 'shares profit market quarter bank merger investors',
    'science': 'software chip research space planet physics laboratory',
}
FILLER = 'the a of in on and to for with by from at after report says'


def write_news(path, rows, seed):
  """`rows` headerless lines: eight words, three from the topic's list and
  the rest common filler, so that a word-level model can learn it."""
  rng = np.random.default_rng(seed)
  names = sorted(TOPICS)
  filler = FILLER.split()
  with open(path, 'w') as f:
    for _ in range(rows):
      topic = names[rng.integers(len(names))]
      words = list(rng.choice(TOPICS[topic].split(), 3)) + list(
          rng.choice(filler, 5)
      )
      rng.shuffle(words)
      f.write(f'{" ".join(words)}\t{topic}\n')


def test_headerless_four_class_tsv_trains_with_one_command(tmp_path):
  train, test = tmp_path / 'train.tsv', tmp_path / 'test.tsv'
  write_news(train, 600, seed=0)
  write_news(test, 200, seed=1)
  workdir = tmp_path / 'run'
  out = run_main_in_process(
      f'--config={CONFIG}:lstm',
      f'--workdir={workdir}',
      f'--config.data.path={train}',
      f'--config.data.test_path={test}',
      "--config.data.column_names=('text', 'label')",
      '--config.training.total_epochs=2',
  ).stdout
  for topic in TOPICS:  # the per-class rows of the test table
    assert topic in out
  results = json.loads((workdir / 'results.json').read_text())
  test_metrics = results['test']
  assert test_metrics['examples'] == 200
  assert len(test_metrics['confusion_matrix']) == 4
  assert test_metrics['accuracy'] > 0.9, test_metrics['accuracy']


def test_an_unknown_preset_names_the_presets():
  from experiments import text_classification  # pylint: disable=g-import-not-at-top

  try:
    text_classification.get_config('bilstm')
  except ValueError as e:
    assert 'use lstm or minilm' in str(e)
  else:
    raise AssertionError('no error for an unknown preset')
