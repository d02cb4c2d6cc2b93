"""The files a run writes for people: `config.json` and `results.json`."""

from __future__ import annotations

import json
import os

import jax

from tuning.terminal import console


def write_config(config, workdir: str):
  """Writes WORKDIR/config.json, the resolved config (process 0)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def write_results(workdir: str, results: dict):
  """Writes WORKDIR/results.json (process 0) and says where."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  console.info(f'wrote {os.path.join(workdir, "results.json")}')
