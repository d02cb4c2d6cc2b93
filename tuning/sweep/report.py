"""A sweep's report: every trial in a table sorted by the metric, and a plot.

Built from the Optuna study alone (trial values, intermediate values and the
user attributes each trial's worker records), so that a report made on one
machine covers trials run by workers elsewhere. Writes report.csv,
report.md and report.png (the metric against each swept hyperparameter).
"""

from __future__ import annotations

import csv
import json
import math
import os

import optuna

from tuning.sweep import space as sweep_space
from tuning.sweep import study as sweep_study

STATES = {
    optuna.trial.TrialState.COMPLETE: 'complete',
    optuna.trial.TrialState.PRUNED: 'pruned',
    optuna.trial.TrialState.FAIL: 'failed',
    optuna.trial.TrialState.RUNNING: 'running',
    optuna.trial.TrialState.WAITING: 'waiting',
}


def trial_rows(study, spec: dict) -> list[dict]:
  """One row per trial (retried trials once), best first."""
  maximize = spec['direction'] == 'maximize'
  rows = []
  for t in study.get_trials(deepcopy=False):
    attrs = t.user_attrs
    if attrs.get('interrupted'):
      continue  # superseded by the trial that resumed it
    best, best_step = None, attrs.get('best_step')
    if t.intermediate_values:
      pick = max if maximize else min
      best_step, best = pick(
          t.intermediate_values.items(), key=lambda item: item[1]
      )
    if t.state == optuna.trial.TrialState.COMPLETE:
      best = t.value
    rows.append(
        {
            'trial': t.number,
            'name': attrs.get('trial_dir', ''),
            'state': STATES.get(t.state, str(t.state)),
            'overrides': attrs.get('overrides', {}),
            'best_validation': best,
            'best_step': best_step,
            'test': (attrs.get('test') or {}).get(spec['metric']),
            'steps': attrs.get('steps'),
            'wall_time_s': attrs.get('wall_time_s'),
            'error': attrs.get('error', ''),
        }
    )

  def order(row):
    value = row['best_validation']
    if value is None or math.isnan(value):
      return (1, 0, row['trial'])
    return (0, -value if maximize else value, row['trial'])

  return sorted(rows, key=order)


def _number(value, digits=4) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def _value(text: str) -> str:
  """A swept value for the table: floats to 4 significant digits."""
  number = _as_float(text)
  return (
      f'{number:.4g}'
      if number is not None and any(c in text for c in '.eE')
      else str(text)
  )


def table(rows: list[dict], spec: dict) -> tuple[list[str], list[list[str]]]:
  """Header and text cells of the report table."""
  keys = sweep_space.swept_keys(spec)
  names = sweep_space.short_names(keys)
  metric = spec['metric']
  header = (
      ['rank', 'trial', 'state']
      + [names[k] for k in keys]
      + [
          f'best val {metric}',
          'at step',
          f'test {metric}',
          'steps',
          'wall time (s)',
          'error',
      ]
  )
  cells = []
  for rank, row in enumerate(rows, start=1):
    cells.append(
        [str(rank), row['name'] or f'#{row["trial"]}', row['state']]
        + [_value(row['overrides'].get(k, '')) for k in keys]
        + [
            _number(row['best_validation']),
            _number(row['best_step']),
            _number(row['test']),
            _number(row['steps']),
            _number(row['wall_time_s'], 1),
            row['error'].replace('|', '/'),
        ]
    )
  return header, cells


def markdown(header: list[str], cells: list[list[str]]) -> str:
  widths = [max(len(c) for c in column) for column in zip(header, *cells)]
  line = (
      lambda row: '| '
      + ' | '.join(c.ljust(w) for c, w in zip(row, widths))
      + ' |'
  )
  return '\n'.join(
      [line(header), line(['-' * w for w in widths])]
      + [line(row) for row in cells]
  )


def write(study, spec: dict, workdir: str) -> str:
  """Writes report.csv/.md/.png in `workdir`; returns the Markdown table."""
  rows = trial_rows(study, spec)
  header, cells = table(rows, spec)
  text = markdown(header, cells)
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(
        f'# Sweep {study.study_name}: {spec["direction"]} best validation'
        f' {spec["metric"]}\n\n{text}\n'
    )
  keys = sweep_space.swept_keys(spec)
  with open(
      os.path.join(workdir, 'report.csv'), 'w', newline='', encoding='utf-8'
  ) as f:
    writer = csv.writer(f)
    writer.writerow(
        ['rank', 'trial', 'number', 'state']
        + keys
        + [
            f'best_validation_{spec["metric"]}',
            'best_step',
            f'test_{spec["metric"]}',
            'steps',
            'wall_time_s',
            'error',
        ]
    )
    for rank, row in enumerate(rows, start=1):
      writer.writerow(
          [rank, row['name'], row['trial'], row['state']]
          + [row['overrides'].get(k, '') for k in keys]
          + [
              row['best_validation'],
              row['best_step'],
              row['test'],
              row['steps'],
              row['wall_time_s'],
              row['error'],
          ]
      )
  plot(rows, spec, os.path.join(workdir, 'report.png'))
  return text


def _as_float(text):
  try:
    return float(text)
  except (TypeError, ValueError):
    return None


def plot(rows: list[dict], spec: dict, path: str):
  """The best validation metric against each swept hyperparameter."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  keys = sweep_space.swept_keys(spec)
  fig, axes = plt.subplots(
      1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False
  )
  styles = {
      'complete': dict(marker='o', color='C0', label='complete'),
      'pruned': dict(marker='x', color='C1', label='pruned'),
      'running': dict(marker='.', color='C2', label='running'),
  }
  for ax, key in zip(axes[0], keys):
    texts = [row['overrides'].get(key) for row in rows]
    numbers = [_as_float(t) for t in texts]
    present = [n for n, t in zip(numbers, texts) if t is not None]
    if present and all(n is not None for n in present):
      xs = numbers
      kind = (spec['space'].get(key) or ('',))[0]
      # Log axis for log-uniform spaces and for positive grids spanning
      # a factor of 10 or more.
      if kind == 'loguniform' or (
          kind not in ('uniform', 'int')
          and min(present) > 0
          and max(present) / min(present) >= 10
      ):
        ax.set_xscale('log')
    elif not present:
      ax.text(0.5, 0.5, 'no values yet', ha='center', transform=ax.transAxes)
      xs = numbers
    else:  # categories in first-seen order
      categories = list(dict.fromkeys(t for t in texts if t is not None))
      xs = [categories.index(t) if t is not None else None for t in texts]
      ax.set_xticks(range(len(categories)))
      ax.set_xticklabels(categories, rotation=30, ha='right')
      ax.set_xlim(-0.5, len(categories) - 0.5)
    for state, style in styles.items():
      points = [
          (x, row['best_validation'])
          for x, row in zip(xs, rows)
          if row['state'] == state
          and x is not None
          and row['best_validation'] is not None
      ]
      if points:
        ax.scatter(*zip(*points), **style)
    ax.set_xlabel(key)
    ax.set_ylabel(f'best validation {spec["metric"]}')
    ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  if handles:
    axes[0][0].legend(handles, labels, fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary(study, workdir: str) -> str:
  """Writes DIR/report.{md,csv,png}; returns the text to print."""
  spec = json.loads(study.user_attrs['sweep']['spec'])
  text = write(study, spec, workdir)
  rows = trial_rows(study, spec)
  counts = {}
  for row in rows:
    counts[row['state']] = counts.get(row['state'], 0) + 1
  lines = [
      f'{spec["direction"]} best validation {spec["metric"]}; trials: '
      + ', '.join(f'{n} {state}' for state, n in counts.items()),
      text,
  ]
  if rows and rows[0]['best_validation'] is not None:
    best = sweep_study.frozen_trial(study, rows[0]['trial'])
    lines.append(f'best: {rows[0]["name"]}: {best.user_attrs.get("command")}')
  lines.append(
      f'wrote {os.path.join(workdir, "report.md")}, report.csv, ' 'report.png'
  )
  return '\n'.join(lines)
