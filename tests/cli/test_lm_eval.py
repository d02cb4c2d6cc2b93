"""`python -m tuning.lm_eval` and the `tuning` lm-eval backend
(tuning/cli/lm_eval.py, tuning/cli/lm_eval_backend.py): on a tiny random
Llama written as a Hugging Face folder, the log-likelihoods, the rolling
log-likelihoods, a multiple-choice task's accuracy and greedy generations
equal lm-eval's `hf` backend on the same weights; bad command lines are one
error line each."""

import json
import os
import textwrap

import pytest

from conftest import TINY_LLAMA
from tuning.cli import generate
from tuning.cli import lm_eval as lm_eval_cli
from tuning.cli import lm_eval_backend
from tuning.formats import huggingface as hf_convert

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
lm_eval = pytest.importorskip('lm_eval')
from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top,g-bad-import-order
from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top,g-bad-import-order

WORDS = (
    'the cat sat on mat dog ran to park a bird flew over tree good bad'
    ' review is : .'
).split()
SPECIALS = ['<pad>', '<s>', '</s>', '<unk>']

DOCS = [
    {'text': 'the cat sat on the mat', 'label': 1},
    {'text': 'a dog ran to the park', 'label': 0},
    {'text': 'the bird flew over a tree', 'label': 1},
    {'text': 'a cat ran over the mat', 'label': 0},
    {'text': 'the dog sat on a tree', 'label': 1},
]

TASK_YAML = """\
task: tiny_mc
dataset_path: local
custom_dataset: !function tiny_data.docs
output_type: multiple_choice
test_split: test
doc_to_text: "review : {{text}} is"
doc_to_choice: ["bad", "good"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """(Hugging Face folder, its tuning conversion, a task folder)."""
  root = tmp_path_factory.mktemp('lm_eval')
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  hf = str(root / 'hf')
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token='<s>',
      eos_token='</s>',
      pad_token='<pad>',
      unk_token='<unk>',
      clean_up_tokenization_spaces=False,
  )
  fast.save_pretrained(hf)
  config = dict(
      TINY_LLAMA,
      vocab_size=len(vocab),
      max_position_embeddings=128,
      initializer_range=0.4,  # peaked distributions: no near-ties
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
  model.save_pretrained(hf)
  converted = str(root / 'tuning')
  hf_convert.convert(hf, converted)
  tasks = root / 'tasks'
  tasks.mkdir()
  (tasks / 'tiny_mc.yaml').write_text(TASK_YAML)
  (tasks / 'tiny_data.py').write_text(textwrap.dedent(f"""\
      import datasets

      def docs(**unused):
        return datasets.DatasetDict(
            test=datasets.Dataset.from_list({DOCS!r}))
      """))
  return hf, converted, str(tasks)


@pytest.fixture(scope='module')
def backends(folders):
  hf, converted, _ = folders
  ours = lm_eval_backend.TuningLM(
      loaded=generate.load(converted), checkpoint=converted, batch_size=4
  )
  theirs = HFLM(pretrained=hf, device='cpu', batch_size=4, dtype='float32')
  return ours, theirs


def _requests(kind, args):
  return [
      Instance(request_type=kind, doc={}, arguments=a, idx=i)
      for i, a in enumerate(args)
  ]


def test_loglikelihoods_equal_the_hf_backend(backends):
  ours, theirs = backends
  pairs = [
      ('the cat', ' sat on the mat'),
      ('a dog ran to the', ' park'),
      ('review : the bird flew is', ' good'),
      ('review : the bird flew is', ' bad'),
      ('', 'the tree'),
      ('the cat sat on the mat . ' * 8, ' a dog'),
  ]
  got = ours.loglikelihood(_requests('loglikelihood', pairs))
  want = theirs.loglikelihood(_requests('loglikelihood', pairs))
  for (g, g_greedy), (w, w_greedy), pair in zip(got, want, pairs):
    assert abs(g - w) < 1e-4, (pair, g, w)
    assert g_greedy == w_greedy, pair
  texts = [('the cat sat on the mat',), ('a bird . ' * 40,)]
  got = ours.loglikelihood_rolling(_requests('loglikelihood_rolling', texts))
  want = theirs.loglikelihood_rolling(_requests('loglikelihood_rolling', texts))
  for g, w in zip(got, want):
    assert abs(g - w) < 1e-3 * max(1.0, abs(w)), (g, w)


def test_greedy_generations_equal_the_hf_backend(backends):
  ours, theirs = backends
  args = [
      ('the cat sat', {'until': ['.'], 'max_gen_toks': 8, 'do_sample': False}),
      ('a dog', {'until': ['mat'], 'max_gen_toks': 6, 'do_sample': False}),
      ('review : the', {'until': [], 'max_gen_toks': 5, 'do_sample': False}),
  ]
  got = ours.generate_until(_requests('generate_until', args))
  want = theirs.generate_until(_requests('generate_until', args))
  assert got == want
  assert any(got), got  # the generations are not all empty


def test_multiple_choice_task_accuracy_equals_the_hf_backend(backends, folders):
  ours, theirs = backends
  manager = lm_eval_cli.task_manager(folders[2])
  accuracies = []
  for model in (ours, theirs):
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=['tiny_mc'],
        task_manager=manager,
        bootstrap_iters=0,
    )
    accuracies.append(results['results']['tiny_mc']['acc,none'])
  assert accuracies[0] == accuracies[1], accuracies


def test_the_command_writes_results(folders, tmp_path):
  _, converted, tasks = folders
  out = str(tmp_path / 'results.json')
  args = [
      f'--checkpoint={converted}',
      '--tasks=tiny_mc',
      f'--include_path={tasks}',
      '--limit=3',
      f'--output={out}',
  ]
  assert lm_eval_cli.main(args) == 0
  with open(out, encoding='utf-8') as f:
    results = json.load(f)['results']
  assert 0.0 <= results['tiny_mc']['acc,none'] <= 1.0


def one_error_line(capfd) -> str:
  err = capfd.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: '), err
  return err


def test_bad_command_lines_are_one_line_errors(folders, tmp_path, capfd):
  _, converted, _ = folders
  cases = [
      (
          ['--checkpoint=' + str(tmp_path / 'nope'), '--tasks=sst2_local'],
          'not found',
      ),
      (['--tasks=sst2_local'], '--checkpoint is required'),
      ([f'--checkpoint={converted}'], '--tasks is required'),
      (
          [f'--checkpoint={converted}', '--tasks=sst2_locl'],
          "unknown lm-eval task 'sst2_locl' (did you mean 'sst2_local'?)",
      ),
  ]
  for args, message in cases:
    assert lm_eval_cli.main(args) == 1, args
    assert message in one_error_line(capfd), args
  assert not os.path.exists(tmp_path / 'nope')
