"""Knowledge-graph triples: the source, negatives (never a known true
triple, from (seed, batch), exactly resumable), TransE/DistMult's loss
against a hand computation, the per-relation thresholds, and a run through
main.py that learns a toy graph."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_main_in_process
from tuning.config.defaults import base_config
from tuning.data import augmentation
from tuning.data import triples as triples_lib
from tuning.data.datasets import build_datasets
from tuning.data.pipeline import TrainStream
from tuning.data.tables import DataError
from tuning.models import kg_embedding
from tuning.modes import triple_thresholds
from tuning.tasks import classification

# A toy graph: entities a0..a9 and b0..b9; every a -> b pair 'likes' is
# true; training holds 80 of them, validation the other 20 and 20 false
# a -> a pairs.
A = [f'a{i}' for i in range(10)]
B = [f'b{i}' for i in range(10)]
PAIRS = [(a, b) for a in A for b in B]


def write_graph(tmp_path):
  (tmp_path / 'entities.txt').write_text(
      ''.join(f'{e}\t{e[0]} thing {e[1]}\n' for e in A + B)
  )
  (tmp_path / 'relations.txt').write_text('likes\tlikes\nhates\thates\n')
  order = np.random.default_rng(0).permutation(len(PAIRS))
  train = [PAIRS[i] for i in order[:80]]
  held = [PAIRS[i] for i in order[80:]]
  (tmp_path / 'train.tsv').write_text(
      ''.join(f'{a}\tlikes\t{b}\n' for a, b in train)
  )
  false = [(A[i], A[(i + 1) % 10]) for i in range(10)] + [
      (A[i], A[(i + 3) % 10]) for i in range(10)
  ]
  (tmp_path / 'dev.tsv').write_text(
      ''.join(f'{a}\tlikes\t{b}\t1\n' for a, b in held)
      + ''.join(f'{a}\tlikes\t{b}\t-1\n' for a, b in false)
  )
  return tmp_path


def triple_config(tmp_path, **data):
  c = base_config()
  c.task = 'classification'
  c.data.source = 'triples'
  c.data.path = str(tmp_path / 'train.tsv')
  c.data.validation_path = str(tmp_path / 'dev.tsv')
  c.data.entity_names = str(tmp_path / 'entities.txt')
  c.data.relation_names = str(tmp_path / 'relations.txt')
  c.data.test_fraction = 0.1
  c.data.negatives = 2
  for k, v in data.items():
    c.data[k] = v
  return c


def test_negatives_change_one_side_and_are_never_known_true(tmp_path):
  config = triple_config(write_graph(tmp_path))
  data = build_datasets(config.data)
  assert data.num_classes == 2 and data.vocab_size(config.data) == 22
  known = data.triples.known
  assert len(known) == 100  # 80 training and 20 validation true triples
  hook = augmentation.for_training(config, 'classification', data)
  stream = TrainStream(data.train, 30, seed=5, augment=hook)
  for _ in range(5):
    batch = next(stream)
    false = batch['label'] == 0
    assert 0 < false.sum() < len(false)
    for t, s in zip(batch['triples'][false], batch['source_triple'][false]):
      assert tuple(t.tolist()) not in known
      assert (t != s).sum() == 1 and t[1] == s[1]  # head or tail only
    np.testing.assert_array_equal(
        batch['triples'][~false], batch['source_triple'][~false]
    )


def test_negatives_come_from_the_seed_and_batch_and_resume_exactly(tmp_path):
  config = triple_config(write_graph(tmp_path))
  data = build_datasets(config.data)
  hook = augmentation.for_training(config, 'classification', data)

  def stream(seed=5):
    return TrainStream(data.train, 30, seed=seed, augment=hook)

  first = stream()
  batches = [next(first) for _ in range(4)]
  second = stream()
  next(second)
  state = second.get_state()
  resumed = stream()
  resumed.set_state(state)
  for want in batches[1:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['triples'], want['triples'])
  other = next(stream(seed=6))
  assert not np.array_equal(other['triples'], batches[0]['triples'])


def test_word_input_gives_each_entity_its_words(tmp_path):
  config = triple_config(write_graph(tmp_path), triple_input='words')
  data = build_datasets(config.data)
  words = data.validation['triple_words']
  assert words.shape[1:] == (3, triples_lib.MAX_WORDS)
  vocab = data.triples.vocab
  # Relations are one id each (1, 2); entity words start after them.
  assert set(words[:, 1, 0].tolist()) == {1} and (words[:, 1, 1:] == 0).all()
  thing = words[0, 0, 1]  # every entity is "<a|b> thing <digit>"
  assert (words[:, [0, 2], 1] == thing).all()
  assert data.vocab_size(config.data) == vocab.num_words == 1 + 2 + 13


def test_scores_and_loss_equal_a_hand_computation():
  rng = np.random.default_rng(0)
  h, r, t = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
  l1 = -np.abs(h + r - t).sum(-1)
  l2 = -np.sqrt(((h + r - t) ** 2).sum(-1))
  dm = (h * r * t).sum(-1)
  np.testing.assert_allclose(kg_embedding.score(h, r, t, 'transe', 1), l1, 1e-5)
  np.testing.assert_allclose(kg_embedding.score(h, r, t, 'transe', 2), l2, 1e-5)
  np.testing.assert_allclose(kg_embedding.score(h, r, t, 'distmult'), dm, 1e-5)
  model = kg_embedding.TripleScorer(vocab_size=6, dim=5, kind='transe')
  triples = jnp.asarray([[0, 4, 1], [2, 5, 3], [1, 4, 0]], jnp.int32)
  params = model.init(jax.random.key(0), triples)['params']
  table = np.asarray(params['embeddings']) - 6.0 / 5**0.5
  s = -np.abs(table[[0, 2, 1]] + table[[4, 5, 4]] - table[[1, 3, 0]]).sum(-1)
  np.testing.assert_allclose(float(params['bias']), -s.mean(), rtol=1e-5)
  logits = model.apply({'params': params}, triples)
  z = s + float(params['bias'])
  np.testing.assert_allclose(logits[:, 1] - logits[:, 0], z, rtol=1e-5)
  labels = jnp.asarray([1, 0, 1])
  total, _ = classification.loss(logits, {'label': labels})
  y = 2.0 * np.asarray(labels) - 1.0
  np.testing.assert_allclose(
      float(total), np.logaddexp(0.0, -y * z).sum(), rtol=1e-5
  )


def test_relation_thresholds_by_hand():
  scores = np.asarray([0.1, 0.4, 0.35, 0.8, 5.0, 6.0, 7.0])
  relations = np.asarray([0, 0, 0, 0, 1, 1, 1])
  labels = np.asarray([0, 1, 0, 1, 0, 1, 1])
  th = triple_thresholds.relation_thresholds(scores, relations, labels)
  assert th == {0: pytest.approx(0.375), 1: pytest.approx(5.5)}
  assert triple_thresholds.threshold_accuracy(
      scores, relations, labels, th
  ) == pytest.approx(1.0)
  assert triple_thresholds.threshold_accuracy(
      scores, relations, labels, {0: 0.0, 1: 0.0}
  ) == pytest.approx(4 / 7)
  both = triple_thresholds.two_fold_accuracy(scores, relations, labels)
  assert 0.0 <= both <= 1.0


@pytest.mark.parametrize(
    'line, words',
    [
        ('a0\tlikes\n', 'expected head<TAB>relation<TAB>tail'),
        ('a0\tlikes\tzz\n', "unknown entity 'zz'"),
        ('a0\tloves\tb1\n', "unknown relation 'loves'"),
        ('a0\tlikes\tb1\tyes\n', "label 'yes' is not 1, 0 or -1"),
    ],
)
def test_bad_triple_lines_name_the_file_and_line(tmp_path, line, words):
  write_graph(tmp_path)
  with open(tmp_path / 'train.tsv', 'a') as f:
    f.write(line)
  with pytest.raises(DataError, match=r'train.tsv:81: ' + words):
    build_datasets(triple_config(tmp_path).data)


def test_bad_triple_setups_are_one_line_errors(tmp_path):
  write_graph(tmp_path)
  with pytest.raises(DataError, match='set config.data.negatives'):
    build_datasets(triple_config(tmp_path, negatives=0).data)
  with pytest.raises(DataError, match='entity_names is required'):
    build_datasets(triple_config(tmp_path, entity_names=None).data)
  with pytest.raises(DataError, match='leave config.data.classes'):
    build_datasets(triple_config(tmp_path, classes=('1', '0')).data)


def test_transe_learns_a_toy_graph_through_main(tmp_path):
  write_graph(tmp_path)
  workdir = tmp_path / 'run'
  args = [
      f'--workdir={workdir}',
      '--config.task=classification',
      '--config.data.source=triples',
      f'--config.data.path={tmp_path / "train.tsv"}',
      f'--config.data.validation_path={tmp_path / "dev.tsv"}',
      f'--config.data.entity_names={tmp_path / "entities.txt"}',
      f'--config.data.relation_names={tmp_path / "relations.txt"}',
      '--config.data.test_fraction=0.1',
      '--config.data.negatives=2',
      '--config.model.name=transe',
      '--config.model.embed_dim=8',
      '--config.optimizer.name=adamw',
      '--config.optimizer.learning_rate=0.05',
      '--config.optimizer.warmup_steps=0',
      '--config.training.batch_size=24',
      '--config.training.total_steps=150',
      '--config.training.eval_every_steps=150',
  ]
  out = run_main_in_process('--config=tests/tiny_config.py', *args).stdout
  assert 'a threshold per relation chosen on validation' in out
  results = json.loads((workdir / 'results.json').read_text())
  assert results['validation']['accuracy'] >= 0.9
  assert results['triple_thresholds']['validation_two_fold'] >= 0.9
