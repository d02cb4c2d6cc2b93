"""tuning.decoding.translation and `python -m tuning.translate`: a tiny random
MarianMTModel (saved by transformers, converted by tuning.convert) translates
like its `generate` (greedy and beam 4), in the input order; run work
directories (a synthetic one, see `_workdir`) and the one-line errors."""

import io
import json
import os
import sys

import jax
import numpy as np
import optax
import pytest
from ml_collections import config_dict

from conftest import TINY_MARIAN
from tuning.formats import huggingface as hf_convert
from tuning.cli import translate as translate_cli
from tuning.decoding import translation
from tuning.engine.checkpoints import RunCheckpoints
from tuning.config.defaults import base_config
from tuning.tasks.registry import TASKS
from tuning.engine.train_step import initial_state

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

PAD, EOS, UNK = 0, 1, 2
WORDS = [f'w{i}' for i in range(3, 16)]  # ids 3..15
MARIAN = {**TINY_MARIAN, 'init_std': 0.5, 'tie_word_embeddings': False}
MAX_NEW = 9


def _tokenizer():
  """Words w3..w15 and <pad> </s> <unk>; encoding appends </s>."""
  vocab = {'<pad>': PAD, '</s>': EOS, '<unk>': UNK}
  vocab.update({w: i for i, w in enumerate(WORDS, start=3)})
  tok = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab, unk_token='<unk>')
  )
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(['<pad>', '</s>', '<unk>'])
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single='$A </s>', special_tokens=[('</s>', EOS)]
  )
  return tok


def _cycle_head(embedding):
  """An output layer that favours a fixed successor of the last token (as
  in test_encoder_decoder_parity), so that a tiny random model writes
  varied sentences."""
  order = torch.randperm(16)
  unit = embedding / embedding.norm(dim=1, keepdim=True).clamp(min=1e-3)
  head = torch.empty_like(embedding)
  for i in range(16):
    head[order[(i + 1) % 16]] = unit[order[i]]
  return torch.nn.Parameter(4.0 * head + 0.5 * torch.randn_like(head))


def _sentences():
  """11 sentences of 1..12 words, not in length order."""
  rng = np.random.default_rng(3)
  lengths = [5, 1, 12, 3, 9, 2, 7, 12, 4, 10, 6]
  return [' '.join(rng.choice(WORDS, n)) for n in lengths]


@pytest.fixture(scope='module')
def marian(tmp_path_factory):
  """(transformers model, tokenizer, converted folder)."""
  folder = tmp_path_factory.mktemp('hf')
  torch.manual_seed(0)
  hf = transformers.MarianMTModel(transformers.MarianConfig(**MARIAN)).eval()
  # varied outputs from a random model
  hf.lm_head.weight = _cycle_head(hf.model.decoder.embed_tokens.weight.detach())
  hf.save_pretrained(folder)
  tok = _tokenizer()
  tok.save(str(folder / 'tokenizer.json'))
  out = tmp_path_factory.mktemp('converted') / 'marian'
  hf_convert.convert(str(folder), str(out), verbose=False)
  return hf, tok, str(out)


def _hf_translations(hf, tok, sentences, beams, length_penalty):
  """transformers' generate on the padded batch, decoded by `tok`."""
  ids = [tok.encode(s).ids for s in sentences]
  longest = max(map(len, ids))
  batch = np.full((len(ids), longest), PAD)
  for r, row in enumerate(ids):
    batch[r, : len(row)] = row
  with torch.no_grad():
    out = hf.generate(
        input_ids=torch.tensor(batch),
        attention_mask=torch.tensor((batch != PAD).astype(np.int64)),
        num_beams=beams,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=False,
        max_new_tokens=MAX_NEW,
        min_length=0,
        no_repeat_ngram_size=0,
        repetition_penalty=1.0,
        bad_words_ids=None,
        forced_eos_token_id=None,
    ).numpy()[:, 1:]
  texts = []
  for row in out.tolist():
    row = row[: row.index(EOS)] if EOS in row else row
    texts.append(tok.decode(row, skip_special_tokens=True))
  return texts


def test_cli_matches_transformers_in_input_order(
    marian, tmp_path, monkeypatch, capfd
):
  hf, tok, folder = marian
  sentences = _sentences()
  expected = _hf_translations(hf, tok, sentences, 1, 1.0)
  assert len(set(expected)) >= 6  # varied outputs: a wrong order would show
  source = tmp_path / 'src.txt'
  # An empty line stays an empty line.
  source.write_text('\n'.join(sentences[:4] + [''] + sentences[4:]) + '\n')
  # The command in this process, reading stdin and writing stdout.
  monkeypatch.setattr(sys, 'stdin', io.StringIO(source.read_text()))
  code = translate_cli.main(
      [
          f'--checkpoint={folder}',
          '--beam_size=1',
          f'--max_length_offset={MAX_NEW}',
          '--max_length_ratio=0',
          '--batch_size=4',
      ]
  )
  out, err = capfd.readouterr()
  assert code == 0, err[-2000:]
  lines = out.splitlines()
  assert lines == expected[:4] + [''] + expected[4:]
  # Batches of similar lengths, padded to multiples of 8: two shapes.
  assert 'translated 11 sentences' in err
  assert '2 source lengths' in err


@pytest.mark.parametrize('length_penalty', [1.0, 0.6])
def test_beam_4_matches_transformers(marian, tmp_path, length_penalty):
  hf, tok, folder = marian
  sentences = _sentences()
  expected = _hf_translations(hf, tok, sentences, 4, length_penalty)
  source, output = tmp_path / 'src.txt', tmp_path / 'out.txt'
  source.write_text('\n'.join(sentences) + '\n')
  result = translate_cli.run(
      folder,
      str(source),
      str(output),
      progress=False,
      beam_size=4,
      length_penalty=length_penalty,
      max_length_offset=MAX_NEW,
      max_length_ratio=0.0,
      batch_size=4,
      length_multiple=16,  # one source length: one compilation
  )
  assert output.read_text().splitlines() == expected
  assert result.stats['source_lengths'] == [16]
  assert result.stats['target_tokens'] > 0 and result.stats['tokens_per_s'] > 0


def test_per_source_length_limit(marian):
  """max_length_ratio: each source's own limit, as transformers' generate
  of that source alone with max_new_tokens = floor(b + a * its tokens)."""
  hf, tok, folder = marian
  translator = translate_cli.load(folder)
  sentences = _sentences()[:6]
  ours = translator.translate(
      sentences,
      beam_size=1,
      max_length_ratio=0.5,
      max_length_offset=1,
      batch_size=8,
  )
  for sentence, tokens in zip(sentences, ours.tokens):
    limit = int(1 + 0.5 * len(tok.encode(sentence).ids))
    ids = torch.tensor([tok.encode(sentence).ids])
    with torch.no_grad():
      out = (
          hf.generate(
              input_ids=ids,
              num_beams=1,
              do_sample=False,
              max_new_tokens=limit,
              forced_eos_token_id=None,
          )
          .numpy()[0, 1:]
          .tolist()
      )
    out = out[: out.index(EOS)] if EOS in out else out
    assert tokens == out


def _workdir(path, tok, params, steps, model_fields):
  """A seq2seq run work directory as the seq2seq task writes it: the run
  config, WORKDIR/tokenizer.json and run checkpoints (written here by
  RunCheckpoints with `params` at each of `steps`). The seq2seq task is not
  on this branch: the config names it when it exists (its task only decides
  the best-checkpoint rule here), else causal_lm."""
  config = base_config()
  config.task = 'seq2seq' if 'seq2seq' in TASKS else 'causal_lm'
  config.checkpoint.best_metric, config.checkpoint.best_mode = 'loss', 'min'
  config.checkpoint.keep = len(steps)
  config.model = config_dict.ConfigDict(model_fields)
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f)
  tok.save(os.path.join(path, 'tokenizer.json'))
  checkpoints = RunCheckpoints(
      os.path.join(path, 'checkpoints'), 'loss', 'min', keep=len(steps)
  )
  for step, p in zip(steps, params):
    state = initial_state(p, optax.adamw(1e-3))
    checkpoints.save(step, state, {}, metrics={'loss': float(10 - step)})
  checkpoints.wait()
  checkpoints.close()
  return path


def test_run_workdir_from_pretrained_marian(marian, tmp_path):
  """A workdir fine-tuned from the Marian folder (model.hf_config) with
  the converted weights at its best step translates as the folder does;
  --step picks another checkpoint."""
  _, tok, folder = marian
  converted = translate_cli.load(folder)
  noisy = jax.tree.map(lambda x: np.asarray(x) * 0.5, converted.params)
  workdir = _workdir(
      str(tmp_path / 'run'),
      tok,
      [noisy, converted.params],
      [1, 2],
      {'name': 'marian', 'hf_config': folder, 'dropout': 0.0},
  )
  sentences = _sentences()
  # The options of test_beam_4_matches_transformers: compiled once.
  options = dict(
      beam_size=4,
      max_length_offset=MAX_NEW,
      max_length_ratio=0.0,
      batch_size=4,
      length_multiple=16,
  )
  expected = converted.translate(sentences, **options).texts
  loaded = translate_cli.load(workdir)  # best: step 2 (loss 8)
  assert 'step 2' in loaded.description
  assert loaded.translate(sentences, **options).texts == expected
  first = translate_cli.load(workdir, step='1')
  np.testing.assert_allclose(
      first.params['encoder']['layer_0']['attention']['query']['kernel'],
      noisy['encoder']['layer_0']['attention']['query']['kernel'],
  )


def test_run_workdir_from_fields(tmp_path):
  """A from-scratch workdir: the model from config.model fields and the
  vocabulary size of WORKDIR/tokenizer.json."""
  from tuning.models import encoder_decoder_hf  # pylint: disable=g-import-not-at-top

  tok = _tokenizer()
  fields = dict(
      name='encoder_decoder', layers=1, width=16, heads=2, ffn_width=32,
      pad_id=PAD, eos_id=EOS, dropout=0.0,
  )  # fmt: skip
  model = encoder_decoder_hf.build(
      config_dict.ConfigDict(fields), np.float32, vocab_size=16
  )
  ids = np.ones((1, 3), np.int32)
  params = jax.jit(model.init)(jax.random.key(1), ids, ids, ids)['params']
  params = jax.tree.map(np.asarray, params)
  workdir = _workdir(str(tmp_path / 'run'), tok, [params], [5], fields)
  loaded = translate_cli.load(workdir)
  assert loaded.model.config.vocab_size == 16
  np.testing.assert_array_equal(
      loaded.params['decoder']['layer_0']['mlp']['wi']['kernel'],
      params['decoder']['layer_0']['mlp']['wi']['kernel'],
  )
  sentences = _sentences()
  options = dict(beam_size=3, max_length_offset=5, length_multiple=16)
  got = loaded.translate(sentences, **options)
  want = translation.translate(model, params, tok, sentences, **options)
  assert got.texts == want.texts


def test_one_line_errors(marian, tmp_path, capfd):
  _, tok, folder = marian
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='neither a converted model folder'):
    translate_cli.load(str(empty))
  with pytest.raises(ValueError, match='not a folder'):
    translate_cli.load(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='--step applies to run work'):
    translate_cli.load(folder, step='3')
  no_tokenizer = tmp_path / 'copy'
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(folder, no_tokenizer)
  os.remove(no_tokenizer / 'tokenizer.json')
  with pytest.raises(ValueError, match='tokenizer.json not found'):
    translate_cli.load(str(no_tokenizer))
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'checkpoints').mkdir()
  config = base_config()
  config.model.name = 'marian'
  config.model.hf_config = folder
  (run / 'config.json').write_text(json.dumps(config.to_dict()))
  with pytest.raises(ValueError, match='no tokenizer for the run'):
    translate_cli.load(str(run))
  tok.save(str(run / 'tokenizer.json'))
  with pytest.raises(ValueError, match='no checkpoint in'):
    translate_cli.load(str(run))
  config.model.name = 'mlp'
  (run / 'config.json').write_text(json.dumps(config.to_dict()))
  with pytest.raises(ValueError, match='needs an encoder-decoder'):
    translate_cli.load(str(run))
  code = translate_cli.main([f'--checkpoint={empty}', '--input=/dev/null'])
  err = capfd.readouterr().err
  assert code == 1
  assert err.count('\n') == 1, err
  assert err.startswith('error: ValueError:')
