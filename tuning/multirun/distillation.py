"""Knowledge distillation: a fine-tuned teacher trains a student.

With `distill.teacher` set (one run work directory, or several: an ensemble
whose probabilities are averaged), each training example's loss is

  alpha * CE(label, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

(Hinton et al. 2015; `_T`: softmax at temperature T), or with
`distill.loss='mse'` the squared distance of the logits (Tang et al. 2019).
Examples the teacher alone labels (transfer text, augmented copies) carry
`labelled = 0` and get only the distillation term.

The teacher reads the student's examples its own way: its run's fitted
preprocessing (tokenizer, vocabulary, feature scaling) is applied to the
student's raw text/features, so a MiniLM teacher can train a BiLSTM student
with its own whitespace vocabulary.

Teacher logits come from one of two places (`distill.teacher_logits`):
  cache  computed once over all student training rows into
         WORKDIR/teacher_logits/ (a .npy file that training memory-maps and
         reads by row, with a fingerprint of the rows and teacher); reused
         when the run resumes, recomputed when anything changes;
  step   the teacher's features travel in the batch and its forward pass
         runs inside the jitted train step (one teacher).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tuning.terminal import console
from tuning.data import augmentation
from tuning.multirun.ensemble import combine
from tuning.multirun.finished_run import Members
from tuning.tasks import classification

LOSSES = ('kl', 'mse')
TEACHER_LOGITS = ('cache', 'step')
TEACHER_PREFIX = 'teacher/'


def enabled(distill_config) -> bool:
  return bool(distill_config is not None and distill_config.teacher)


def check_config(distill_config):
  c = distill_config
  if not 0.0 <= float(c.alpha) <= 1.0:
    raise ValueError(
        f'config.distill.alpha={c.alpha} must be in [0, 1] (the '
        'weight of the hard-label loss)'
    )
  if float(c.temperature) <= 0:
    raise ValueError(f'config.distill.temperature={c.temperature} must be > 0')
  if c.loss not in LOSSES:
    raise ValueError(f'config.distill.loss={c.loss!r}: use kl or mse')
  if c.teacher_logits not in TEACHER_LOGITS:
    raise ValueError(
        f'config.distill.teacher_logits={c.teacher_logits!r}: '
        'use cache or step'
    )
  if c.teacher_logits == 'step' and len(c.teacher) != 1:
    raise ValueError(
        'config.distill.teacher_logits=step runs one teacher in '
        f'the train step, not {len(c.teacher)}: use '
        'teacher_logits=cache for an ensemble teacher'
    )


def check_student_task(task):
  """Distillation teaches class probabilities: a classification student."""
  if task.name != 'classification':
    raise ValueError(
        'distillation teaches class probabilities; '
        f'config.task={task.name!r} (unset config.distill.teacher)'
    )


def distillation_loss(
    student_logits,
    teacher_logits,
    labels,
    labelled,
    alpha: float,
    temperature: float,
    kind: str = 'kl',
):
  """Per-example loss (float32): alpha * CE on labelled rows + (1 - alpha)
  * the soft term (T^2-scaled KL, or the logits' mean squared error)."""
  s = student_logits.astype(jnp.float32)
  t = teacher_logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(s, labels)
  if kind == 'kl':
    log_p_teacher = jax.nn.log_softmax(t / temperature)
    log_p_student = jax.nn.log_softmax(s / temperature)
    soft = temperature**2 * jnp.sum(
        jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1
    )
  elif kind == 'mse':
    soft = jnp.mean(jnp.square(s - t), axis=-1)
  else:
    raise ValueError(f'unknown distillation loss {kind!r}: use kl or mse')
  return alpha * labelled.astype(jnp.float32) * ce + (1.0 - alpha) * soft


def make_loss_fn(distill_config):
  """The train step's `loss_fn(logits, batch)` for distillation: the sum of
  the per-example losses and of the correct predictions (as the
  classification task's, whose `rows_weight` divides them)."""
  check_config(distill_config)
  alpha = float(distill_config.alpha)
  temperature = float(distill_config.temperature)
  kind = distill_config.loss

  def loss_fn(logits, batch):
    losses = distillation_loss(
        logits,
        batch['teacher_logits'],
        batch['label'],
        batch['labelled'],
        alpha,
        temperature,
        kind,
    )
    correct = (logits.argmax(-1) == batch['label']).astype(jnp.float32)
    return losses.sum(), {'accuracy': correct.sum()}

  return loss_fn


def read_transfer(path: str, raw_train: dict) -> dict:
  """Unlabelled transfer examples: a text file (one example a line) for
  text tasks, an .npz with 'x' for feature tasks."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'transfer data not found: {path} ' '(config.distill.transfer_path)'
    )
  if 'text' in raw_train:
    if path.endswith('.npz'):
      raise ValueError(
          f'{path}: a text task takes transfer text as a .txt '
          'file, one example a line (config.distill.transfer_path)'
      )
    if 'text_pair' in raw_train:
      raise ValueError(
          'transfer text for sentence-pair tasks is not '
          'supported; use distill.augment_copies instead'
      )
    with open(path, encoding='utf-8') as f:
      texts = [line.rstrip('\n') for line in f if line.strip()]
    return {'text': np.array(texts, dtype=object)}
  if not path.endswith('.npz'):
    raise ValueError(
        f'{path}: a feature task takes transfer examples as an '
        ".npz file with an 'x' array (config.distill.transfer_path)"
    )
  with np.load(path) as f:
    if 'x' not in f:
      raise ValueError(f"{path} has no 'x' array (arrays: {list(f.keys())})")
    x = np.asarray(f['x'], np.float64)
  width = raw_train['x'].shape[1:]
  if x.shape[1:] != width:
    raise ValueError(
        f'{path}: transfer examples have shape {x.shape[1:]}, '
        f'the training features {width}'
    )
  return {'x': x}


def _concat(tables: list[dict]) -> dict:
  return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def _fingerprint(raw: dict, teacher_dirs, steps, extra: dict) -> str:
  digest = hashlib.sha1()
  for key in sorted(raw):
    column = raw[key]
    if column.dtype == object:
      for value in column:
        digest.update(str(value).encode('utf-8'))
        digest.update(b'\0')
    else:
      digest.update(np.ascontiguousarray(column).tobytes())
  digest.update(
      json.dumps(
          [list(teacher_dirs), list(steps), extra], sort_keys=True
      ).encode('utf-8')
  )
  return digest.hexdigest()


class Teacher:
  """The teacher run(s), with their restored parameters and preprocessing."""

  def __init__(self, distill_config):
    check_config(distill_config)
    self.config = distill_config
    self.members = Members(
        tuple(distill_config.teacher),
        'best',
        named_by='config.distill.teacher',
        chosen_by='the best checkpoint of each teacher',
    )
    self.num_parameters = sum(
        int(np.size(x)) for p in self.members.params for x in jax.tree.leaves(p)
    )

  def logits(
      self, raw: dict, progress: str = '', by_length: bool = True
  ) -> np.ndarray:
    """Teacher logits of raw examples (ensembles: log of the mean
    probabilities); `by_length` batches them shortest first (faster)."""
    outputs = []
    for run, params in zip(self.members.runs, self.members.params):
      features = run.data.encode(raw)
      n = len(next(iter(features.values())))
      # Shortest first: batches then fall into the small length buckets.
      order = (
          np.argsort(features['attention_mask'].sum(1), kind='stable')
          if by_length and 'attention_mask' in features
          else np.arange(n)
      )
      table = {
          **{k: v[order] for k, v in features.items()},
          'label': np.zeros(n, np.int32),
      }
      logits, _ = run.predict(params, table, progress=progress)
      unsorted = np.empty_like(logits)
      unsorted[order] = logits
      outputs.append(unsorted)
    if len(outputs) == 1:
      return outputs[0]
    return combine(outputs, 'mean_probs').astype(np.float32)

  def report(self, run, results: dict) -> dict:
    """Teacher and student on the student's splits (validation and test
    passes as in the student's final evaluation, the test pass timed),
    printed as one table; returned for results.json."""
    data, c = run.data, self.config
    val = self.evaluate(
        data.raw['validation'], data.validation['label'], run.task.num_classes
    )
    test = self.evaluate(
        data.raw['test'], data.test['label'], run.task.num_classes
    )
    console.info(
        comparison_table(
            [
                ('teacher', val, self.num_parameters, test['examples_per_s']),
                (
                    'student',
                    results['validation'],
                    results['num_parameters'],
                    results['eval_examples_per_s'],
                ),
            ]
        )
    )
    return {
        'teacher': list(c.teacher),
        'alpha': c.alpha,
        'temperature': c.temperature,
        'loss': c.loss,
        'teacher_validation': val,
        'teacher_test': test,
        'teacher_parameters': self.num_parameters,
        'teacher_eval_examples_per_s': test['examples_per_s'],
    }

  def features(self, raw: dict) -> dict:
    """The (one) teacher's input features, prefixed, for in-step logits."""
    run = self.members.runs[0]
    return {TEACHER_PREFIX + k: v for k, v in run.data.encode(raw).items()}

  def evaluate(self, raw: dict, labels: np.ndarray, num_classes: int) -> dict:
    """Metrics on the student's split, with examples/s of the pass, in
    the split's order as the student's own evaluation."""
    start = time.time()
    logits = self.logits(raw, by_length=False)
    seconds = time.time() - start
    metrics = classification.metrics_from_logits(logits, labels, num_classes)
    metrics['examples_per_s'] = len(labels) / max(seconds, 1e-9)
    return metrics


def student_training_table(config, data, teacher: Teacher, workdir: str):
  """The student's training rows: its labelled examples, then transfer and
  augmented examples (label = the teacher's argmax, labelled = 0), with
  'teacher_logits' (cache) or the teacher's features (step)."""
  c = config.distill
  if not data.raw:
    raise ValueError(
        'distillation reads the training examples into memory;'
        f' config.data.source={config.data.source!r} streams '
        'them (use the files it was converted from)'
    )
  raw_parts = [data.raw['train']]
  n_labelled = len(data.train['label'])
  if c.transfer_path:
    raw_parts.append(read_transfer(c.transfer_path, data.raw['train']))
  if config.data.augment and not c.augment_copies:
    raise ValueError(
        'under distillation config.data.augment makes the teacher-labelled '
        'copies of config.distill.augment_copies: set augment_copies >= 1, '
        'or data.augment=""'
    )
  if c.augment_copies:
    if 'text' not in data.raw['train'] or 'text_pair' in data.raw['train']:
      raise ValueError(
          'config.distill.augment_copies augments single '
          'sentences; this task has numeric features or sentence'
          ' pairs (use transfer_path, or augment_copies=0)'
      )
    raw_parts.append(
        {
            'text': np.array(
                augmentation.copies(
                    data.raw['train']['text'],
                    augmentation.parse(config.data.augment),
                    int(c.augment_copies),
                    config.seed,
                ),
                dtype=object,
            )
        }
    )
  raw = _concat(raw_parts)
  n = len(next(iter(raw.values())))
  extra = n - n_labelled
  table = dict(data.train)
  if extra:
    student_features = data.encode({k: v[n_labelled:] for k, v in raw.items()})
    for k in table:
      if k in student_features:
        table[k] = np.concatenate([table[k], student_features[k]])
  labelled = np.zeros(n, np.float32)
  labelled[:n_labelled] = 1.0
  table['labelled'] = labelled
  line = f'distill: {n_labelled} labelled training examples'
  if extra:
    sources = ['transfer file'] * bool(c.transfer_path) + [
        f'{c.augment_copies} augmented copies'
    ] * bool(c.augment_copies)
    line += f' + {extra} teacher-labelled ({", ".join(sources)})'
  log = [line]
  if c.teacher_logits == 'step':
    table.update(teacher.features(raw))
    if extra:
      table['label'] = np.concatenate(
          [table['label'], np.zeros(extra, np.int32)]
      )
    log.append('distill: teacher logits computed in the train step')
    return table, log
  logits = cached_teacher_logits(teacher, raw, workdir, config.seed, log=log)
  if extra:
    table['label'] = np.concatenate(
        [
            table['label'],
            np.asarray(logits[n_labelled:]).argmax(-1).astype(np.int32),
        ]
    )
  table['teacher_logits'] = logits
  return table, log


def cached_teacher_logits(
    teacher: Teacher, raw: dict, workdir: str, seed: int, log: list
) -> np.ndarray:
  """Teacher logits of `raw`, from WORKDIR/teacher_logits when the
  fingerprint matches, else computed and written there; memory-mapped."""
  directory = os.path.join(workdir, 'teacher_logits')
  path = os.path.join(directory, 'logits.npy')
  meta_path = os.path.join(directory, 'meta.json')
  c = teacher.config
  fingerprint = _fingerprint(
      raw,
      teacher.members.workdirs,
      teacher.members.steps,
      {
          'seed': seed,
          'augment': c.augment_copies,
      },
  )
  n = len(next(iter(raw.values())))
  if os.path.exists(meta_path) and os.path.exists(path):
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
    if meta.get('fingerprint') == fingerprint:
      log.append(f'distill: teacher logits of {n} rows read from {path}')
      return np.load(path, mmap_mode='r')
    log.append(
        'distill: cached teacher logits are for other rows or another'
        ' teacher; recomputing'
    )
  start = time.time()
  console.info(
      f'distill: computing teacher logits of {n} training rows '
      f'(once; cached in {directory})'
  )
  logits = teacher.logits(raw, progress='teacher logits').astype(np.float32)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    np.save(path + '.tmp.npy', logits)
    os.replace(path + '.tmp.npy', path)
    with open(meta_path, 'w', encoding='utf-8') as f:
      json.dump(
          {
              'fingerprint': fingerprint,
              'rows': n,
              'teacher': teacher.members.workdirs,
              'steps': teacher.members.steps,
              'seconds': time.time() - start,
          },
          f,
          indent=2,
      )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices('teacher_logits_written')
  log.append(
      f'distill: teacher logits of {n} rows computed in '
      f'{time.time() - start:.0f} s, cached in {path}'
  )
  return np.load(path, mmap_mode='r')


def comparison_table(rows) -> str:
  """(name, validation metrics, parameters, eval examples/s) rows."""
  lines = [
      'distillation: validation accuracy, and examples/s of the test ' 'pass:',
      f'  {"model":<18} {"accuracy":>9} {"macro-F1":>9} '
      f'{"parameters":>12} {"eval ex/s":>10}',
  ]
  for name, m, params, speed in rows:
    lines.append(
        f'  {name:<18} {m["accuracy"]:9.4f} {m["macro_f1"]:9.4f} '
        f'{params:12,d} {speed:10.1f}'
    )
  return '\n'.join(lines)
