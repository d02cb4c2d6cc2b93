"""`python -m tuning.sweep`: hyperparameter sweeps, each trial one main.py run,
Optuna choosing values.

  python -m tuning.sweep --config=experiments/digits_mlp.py --workdir=DIR \\
      [--parallel=2] [--config.training.total_steps=200 ...]
  python -m tuning.sweep --config=experiments/x.py --workdir=DIR \\
      --sweep='optimizer.learning_rate=1e-3,3e-3;seed=0,1'
  python -m tuning.sweep --config=... --workdir=DIR --dry_run
  python -m tuning.sweep report --workdir=DIR

What is swept: the config file's `get_sweep(arg)` (called with the same
`:arg` as `get_config`), or `--sweep`/`--zip` on the command line, which
replace it; `--metric`, `--direction`, `--trials`, `--sampler`, `--pruner`
change single entries. The spec format is in tuning/sweep/space.py. Every
swept key and every `--config.k=v` override (applied to all trials) is
checked against the config before anything runs.

Trials. Each trial runs `python main.py --config=... --workdir=DIR/<trial>
--config.k=v ...`, output to DIR/<trial>/log.txt; DIR/<trial>/trial.json
holds its command. Grid trials are named by their values
(`learning_rate=0.001,seed=0`), sampled ones `trial_007`. `--parallel=N`
runs N at a time; with `--devices=cuda` each gets one GPU
(CUDA_VISIBLE_DEVICES), with `--devices=cpu` each is pinned to its share
of the CPU cores (sched_setaffinity, JAX_PLATFORMS=cpu); `auto` (default) is
cuda where /dev/nvidia* devices exist, else cpu, and leaves the environment
alone when N=1.

Optuna. The study (sampler grid, random or tpe; median pruning of sampled
trials on the validation metric each run writes during training) is stored
in DIR/study.db; `--storage=postgresql://...` shares one study between
machines, each running this same command as a worker (its trials in its own
DIR). Workers ask Optuna for trials and tell it their outcome. Several
workers may share one SQLite file on one machine, but SQLite cannot lock
rows: two workers popping the same queued trial notice it by its trial
directory's lock, and two choosing the same grid point at once (rare) leave
a failed 'duplicate' trial; a server database avoids both. A trial's value
is its best validation metric.

Resume. Re-running the same command skips finished trials (complete,
pruned or failed); a trial left running by a sweep that was stopped is run
again in the same directory, so main.py resumes it from its checkpoint.
Stopping a sweep with SIGTERM or Ctrl-C asks its runs to checkpoint first.
A trial counts as left running when it was started on this host and no
process holds its DIR/<trial>/.sweep.lock any more.

Failures. A run that exits non-zero marks its trial failed, with its last
`error:` line in the report; the sweep goes on (and exits 0).

Report. At the end, and with `report`: a table of every trial sorted by
the metric, printed and saved as DIR/report.md and DIR/report.csv, and
DIR/report.png, the metric against each swept hyperparameter.

Process settings. main.py's `--malloc` and `--xla_cpu_dots`, given here,
are passed on to every trial's main.py (and are part of what a rerun must
match).

`--dry_run` prints the main.py command of every grid trial not yet
finished (for any cluster scheduler; running them and then this sweep
records them in the study from their checkpoints), or, for a sampled
sweep, the worker command to start on each machine.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from tuning.cli import flags as cli_flags
from tuning.config import loading as config_loading
from tuning.platform import process_flags
from tuning.sweep import report as sweep_report
from tuning.sweep import space as sweep_space
from tuning.sweep import study as sweep_study
from tuning.sweep import trials as sweep_trials
from tuning.sweep.space import SweepError

PROG = 'python -m tuning.sweep'
COMMANDS = ('run', 'report')
# Flags a dry run's worker command repeats when they are not the default.
WORKER_FLAGS = (
    'sweep',
    'zip',
    'trials',
    'sampler',
    'metric',
    'direction',
    'pruner',
    'parallel',
    'devices',
)


def define_flags(fv: flags.FlagValues):
  flags.DEFINE_string(
      'config', None, 'Experiment config file[:arg].', flag_values=fv
  )
  flags.DEFINE_string('workdir', None, 'Sweep directory.', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)
  flags.DEFINE_string(
      'sweep',
      None,
      "Grid or space: 'k=v1,v2;k2=loguniform(a,b)'.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      'zip', None, "Lists varying together: 'k=v1,v2;k2=..'.", flag_values=fv
  )
  flags.DEFINE_integer('trials', None, 'Trial budget (spaces).', flag_values=fv)
  flags.DEFINE_enum(
      'sampler', None, list(sweep_space.SAMPLERS), 'Sampler.', flag_values=fv
  )
  flags.DEFINE_enum(
      'metric',
      None,
      list(sweep_space.METRICS),
      'Validation metric to optimize.',
      flag_values=fv,
  )
  flags.DEFINE_enum(
      'direction',
      None,
      ['maximize', 'minimize'],
      'Whether the metric is maximized or minimized.',
      flag_values=fv,
  )
  flags.DEFINE_enum(
      'pruner', None, ['median', 'none'], 'Pruner.', flag_values=fv
  )
  flags.DEFINE_integer('parallel', 1, 'Trials at a time.', flag_values=fv)
  flags.DEFINE_enum(
      'devices',
      'auto',
      list(sweep_trials.DEVICES),
      'What each parallel trial gets.',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'storage',
      None,
      'Optuna storage URL (default sqlite:///DIR/study.db).',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'study_name', None, 'Default: the basename of DIR.', flag_values=fv
  )
  flags.DEFINE_bool(
      'dry_run', False, 'Print the commands; run nothing.', flag_values=fv
  )


def _worker_command(fv: flags.FlagValues, sweep) -> list[str]:
  """The command a dry run prints for each machine of a sampled sweep."""
  command = [
      sys.executable,
      '-m',
      'tuning.sweep',
      f'--config={sweep.config}',
      f'--workdir={sweep.workdir}',
      f'--storage={sweep.storage}',
      f'--study_name={sweep.study_name}',
  ]
  for name in WORKER_FLAGS:
    if fv[name].value != fv[name].default:
      command.append(f'--{name}={fv[name].value}')
  return command + sweep.overrides


def sweep_command(fv: flags.FlagValues, positional: list[str], overrides):
  """The command, its flags parsed; `overrides`: the --config.k=v
  arguments (for every trial)."""
  if len(positional) > 1 or (positional and positional[0] not in COMMANDS):
    raise cli_flags.UsageError(
        f'unexpected arguments: {" ".join(positional)} (the command is '
        f'{" or ".join(COMMANDS)}; see {PROG} --help)'
    )
  if positional and positional[0] == 'report':
    study = sweep_study.load_study(fv.workdir, fv.storage, fv.study_name)
    print(sweep_report.summary(study, os.path.abspath(fv.workdir)))
    return
  if not fv.config:
    raise SweepError('--config=experiments/<name>.py[:arg] is required')
  spec = None
  if fv.sweep or fv.zip:
    spec = sweep_space.parse_cli(fv.sweep, fv.zip)
  sweep = sweep_study.prepare(
      fv.config,
      fv.workdir,
      spec,
      overrides,
      fv.storage,
      fv.study_name,
      trials=fv.trials,
      sampler=fv.sampler,
      metric=fv.metric,
      direction=fv.direction,
      pruner=fv.pruner,
      main_flags=[
          f'--{name}={fv[name].value}'
          for name in (process_flags.MALLOC, process_flags.XLA_CPU_DOTS)
          if fv[name].present
      ],
  )
  if fv.dry_run:
    print(sweep_study.dry_run(sweep, _worker_command(fv, sweep)))
    return
  sweep_trials.slot_settings(fv.devices, fv.parallel)  # before any run
  sweep_trials.run(sweep, fv.parallel, fv.devices)


def main(argv=None) -> int:
  """The command; `argv`: its arguments (None: sys.argv[1:])."""
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith('--config.')]
  rest = [a for a in argv if not a.startswith('--config.')]
  return cli_flags.run(
      PROG,
      __doc__,
      define_flags,
      lambda fv, positional: sweep_command(fv, positional, overrides),
      rest,
      usage_errors=(config_loading.ConfigError, SweepError),
      # Process settings are the trials': passed on to each main.py run.
      apply_process_flags=False,
  )


if __name__ == '__main__':
  sys.exit(main())
