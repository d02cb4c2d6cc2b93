"""The README's main command: the quickstart, with its embedded default."""

import os

from conftest import read_json, run_main


def test_quickstart_pretraining_beats_scratch(tmp_path):
  # As in the README: no flags at all, from the user's current directory.
  out = run_main(cwd=tmp_path).stdout
  workdir = str(tmp_path / 'workdirs' / 'quickstart')
  assert f'work directory: {workdir}' in out
  assert 'test split by stage:' in out
  stages = read_json(os.path.join(workdir, 'results.json'))['stages']
  accuracy = {k: v['test']['accuracy'] for k, v in stages.items()}
  assert accuracy['pretrain'] > 0.9
  # Few labels: the pretrained start clearly beats scratch.
  assert accuracy['finetune'] > accuracy['scratch'] + 0.05, accuracy
  for stage in ('pretrain', 'finetune', 'scratch'):
    assert os.path.exists(os.path.join(workdir, stage, 'results.json'))
