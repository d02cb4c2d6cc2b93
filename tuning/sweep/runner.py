"""Hyperparameter sweeps: each trial one main.py run, Optuna choosing values.

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

`--dry_run` prints the main.py command of every grid trial not yet
finished (for any cluster scheduler; running them and then this sweep
records them in the study from their checkpoints), or, for a sampled
sweep, the worker command to start on each machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import glob
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna

from tuning.config import loading as config_loading
from tuning.sweep import report as sweep_report
from tuning.sweep import space as sweep_space
from tuning.sweep.space import SweepError

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
MAIN = os.path.join(REPO, 'main.py')
HOST = socket.gethostname()
LOCK = '.sweep.lock'
DEVICES = ('auto', 'cpu', 'cuda', 'none')
FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


class TrialFailed(Exception):
  """A trial's run failed; the sweep records it and goes on."""


class Interrupted(Exception):
  """The sweep was stopped; the trial is run again on the next attempt."""


class _SameTrial(Exception):
  """This trial is already being run by another worker."""


@dataclasses.dataclass
class Sweep:
  """A sweep's definition: what every trial runs, and where."""

  config: str  # 'experiments/x.py[:arg]', the path absolute
  workdir: str  # absolute
  spec: dict  # sweep_space.normalize()d
  overrides: list[str]  # '--config.k=v' for every trial
  storage: str
  study_name: str
  main: str = MAIN

  def command(self, trial_dir: str, values: dict) -> list[str]:
    return (
        [
            sys.executable,
            self.main,
            f'--config={self.config}',
            f'--workdir={trial_dir}',
        ]
        + self.overrides
        + [f'--config.{k}={v}' for k, v in values.items()]
    )

  def identity(self) -> dict:
    """What must match for a rerun to continue an existing study."""
    return {
        'config': self.config,
        'overrides': self.overrides,
        'spec': sweep_space.to_json(self.spec),
        'main': self.main,
    }


def load_spec(config_spec: str):
  """The config file's `get_sweep(arg)`, or None where it has none."""
  path, _, arg = config_spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)  # load_config_file checked it loads
  if not hasattr(module, 'get_sweep'):
    return None
  try:
    return module.get_sweep(arg) if arg else module.get_sweep()
  except Exception as e:  # the user's function rejecting its argument
    raise SweepError(
        f'{path}: get_sweep({arg!r}) failed: ' f'{type(e).__name__}: {e}'
    ) from None


def prepare(
    config: str,
    workdir: str,
    spec: dict | None = None,
    overrides=(),
    storage: str | None = None,
    study_name: str | None = None,
    main: str = MAIN,
    **changes,
) -> Sweep:
  """Loads and checks everything a sweep needs; runs nothing.

  `spec` None: the config file's get_sweep. `overrides`: 'k=v' or
  '--config.k=v' for every trial. `changes`: spec entries to replace
  (metric=..., trials=...), None meaning unchanged.
  """
  path, colon, arg = config.partition(':')
  config = os.path.abspath(path) + colon + arg
  loaded = config_loading.load_config_file(config)
  if spec is None:
    spec = load_spec(config)
    if spec is None:
      raise SweepError(
          f'{path} has no get_sweep(arg=None); define one or '
          "pass --sweep='key=v1,v2;key2=...'"
      )
  spec = dict(spec, **{k: v for k, v in changes.items() if v is not None})
  spec = sweep_space.normalize(spec, loaded)
  flags = []
  for text in overrides:
    text = text.removeprefix('--').removeprefix('config.')
    key, eq, _ = text.partition('=')
    if not eq:
      raise SweepError(f'override {text!r}: use --config.key=value')
    sweep_space.check_key(loaded, key)
    if key in sweep_space.swept_keys(spec):
      raise SweepError(
          f'--config.{key} is swept; leave it out of the ' 'overrides'
      )
    flags.append(f'--config.{text}')
  workdir = os.path.abspath(workdir)
  return Sweep(
      config=config,
      workdir=workdir,
      spec=spec,
      overrides=flags,
      storage=storage or default_storage(workdir),
      study_name=study_name or os.path.basename(workdir),
      main=os.path.abspath(main),
  )


def default_storage(workdir: str) -> str:
  return f'sqlite:///{os.path.join(os.path.abspath(workdir), "study.db")}'


def _storage(url: str):
  kwargs = {'connect_args': {'timeout': 60}} if url.startswith('sqlite') else {}
  try:
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
  except Exception as e:  # a bad URL, a missing driver, no server
    raise SweepError(
        f'cannot open the study storage {_printable(url)}: '
        f'{type(e).__name__}: {e}'
    ) from None


def _study_exists(sweep: Sweep) -> bool:
  if sweep.storage == default_storage(sweep.workdir):
    if not os.path.exists(os.path.join(sweep.workdir, 'study.db')):
      return False
  return sweep.study_name in optuna.get_all_study_names(_storage(sweep.storage))


class _GridSampler(optuna.samplers.GridSampler):
  """Optuna's grid sampler, less its `after_trial`, which only stops an
  `optimize` loop once the grid is done: workers here use ask/tell and
  count the grid's trials themselves."""

  def after_trial(self, study, trial, state, values):
    del study, trial, state, values


def open_study(sweep: Sweep) -> optuna.Study:
  """Creates the study, or loads it after checking it holds this sweep."""
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  spec = sweep.spec
  if spec['sampler'] == 'grid':
    sampler = _GridSampler(
        sweep_space.grid_search_space(spec), seed=spec['seed']
    )
  elif spec['sampler'] == 'random':
    sampler = optuna.samplers.RandomSampler(seed=spec['seed'])
  else:
    sampler = optuna.samplers.TPESampler(seed=spec['seed'])
  pruner = (
      optuna.pruners.MedianPruner(**spec['pruner_args'])
      if spec['pruner'] == 'median'
      else optuna.pruners.NopPruner()
  )
  if sweep.storage == default_storage(sweep.workdir):
    os.makedirs(sweep.workdir, exist_ok=True)
  study = optuna.create_study(
      storage=_storage(sweep.storage),
      sampler=sampler,
      pruner=pruner,
      study_name=sweep.study_name,
      direction=spec['direction'],
      load_if_exists=True,
  )
  identity = sweep.identity()
  stored = study.user_attrs.get('sweep')
  if stored is None:
    study.set_user_attr('sweep', identity)
  elif stored != identity:
    differs = ', '.join(k for k in identity if stored.get(k) != identity[k])
    raise SweepError(
        f'study {sweep.study_name!r} holds another sweep '
        f'(different {differs}); use a new --workdir or '
        '--study_name'
    )
  return study


def _frozen(study, number: int):
  return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _trial_id(study, number: int) -> int:
  storage = study._storage  # pylint: disable=protected-access
  return storage.get_trial_id_from_study_id_trial_number(
      storage.get_study_id_from_name(study.study_name), number
  )


def _enqueue_retry(study, frozen, wall_time_s: float | None):
  """A waiting copy of an interrupted trial: same values, same directory."""
  system = {'fixed_params': dict(frozen.params)}
  for key in ('grid_id', 'search_space'):  # GridSampler's bookkeeping
    if key in frozen.system_attrs:
      system[key] = frozen.system_attrs[key]
  previous = (frozen.user_attrs.get('previous_wall_time_s') or 0) + (
      wall_time_s or 0
  )
  user = {'retry_of': frozen.number, 'previous_wall_time_s': previous}
  for key in ('trial_dir', 'overrides'):
    if key in frozen.user_attrs:
      user[key] = frozen.user_attrs[key]
  study.add_trial(
      optuna.trial.create_trial(
          state=optuna.trial.TrialState.WAITING,
          system_attrs=system,
          user_attrs=user,
      )
  )


def _lock(trial_dir: str, number: int | None = None):
  """An open, exclusively locked fd on the trial's lock file, or None.

  With `number`, the file then holds it: the trial that owns the directory.
  """
  fd = os.open(os.path.join(trial_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  if number is not None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(number).encode(), 0)
  return fd


def _lock_owner(trial_dir: str) -> int | None:
  """The trial number written in a held lock file (waits for it briefly)."""
  for _ in range(20):
    try:
      with open(os.path.join(trial_dir, LOCK), encoding='utf-8') as f:
        return int(f.read())
    except (OSError, ValueError):
      time.sleep(0.1)
  return None


def recover(study, sweep: Sweep) -> list[int]:
  """Re-queues trials left running by a sweep on this host that died."""
  retried = []
  for t in study.get_trials(
      deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
  ):
    name = t.user_attrs.get('trial_dir')
    if name is not None:
      if t.user_attrs.get('host') != HOST:
        continue  # another machine's worker; it resumes its own
      trial_dir = os.path.join(sweep.workdir, name)
      if not os.path.isdir(trial_dir):
        continue
      fd = _lock(trial_dir)
      if fd is None:
        continue  # still running
      os.close(fd)
      log = os.path.join(trial_dir, 'log.txt')
      end = os.path.getmtime(log) if os.path.exists(log) else time.time()
    elif time.time() - t.datetime_start.timestamp() > 60:
      end = None  # its worker died before it started a run
    else:
      continue
    wall = end - t.datetime_start.timestamp() if end else None
    trial_id = _trial_id(study, t.number)
    storage = study._storage  # pylint: disable=protected-access
    storage.set_trial_user_attr(trial_id, 'interrupted', True)
    _enqueue_retry(study, t, wall)
    storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    retried.append(t.number)
  return retried


def remaining(study, sweep: Sweep) -> int:
  """How many trials this worker starts: waiting ones + the unspent budget."""
  trials = [
      t
      for t in study.get_trials(deepcopy=False)
      if not t.user_attrs.get('interrupted')
  ]
  waiting = sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
  return waiting + max(0, sweep.spec['trials'] - len(trials))


def slot_settings(devices: str, parallel: int) -> list[tuple[dict, list]]:
  """Per parallel slot: environment variables and CPU cores (or [])."""
  if devices not in DEVICES:
    raise SweepError(f'unknown --devices={devices} (use: {", ".join(DEVICES)})')
  gpus = os.environ.get('CUDA_VISIBLE_DEVICES')
  gpus = (
      gpus.split(',')
      if gpus
      else sorted(
          (p[len('/dev/nvidia') :] for p in glob.glob('/dev/nvidia[0-9]*')),
          key=int,
      )
  )
  if devices == 'auto':
    devices = 'none' if parallel == 1 else ('cuda' if gpus else 'cpu')
  if devices == 'none':
    return [({}, [])] * parallel
  if devices == 'cuda':
    if parallel > len(gpus):
      raise SweepError(
          f'--parallel={parallel} with --devices=cuda needs '
          f'{parallel} GPUs; found {len(gpus)} (--devices=none '
          'shares them)'
      )
    return [({'CUDA_VISIBLE_DEVICES': gpus[i]}, []) for i in range(parallel)]
  cores = sorted(os.sched_getaffinity(0))
  shares = [
      cores[i * len(cores) // parallel : (i + 1) * len(cores) // parallel]
      or [cores[i % len(cores)]]
      for i in range(parallel)
  ]
  return [({'JAX_PLATFORMS': 'cpu'}, share) for share in shares]


def _validation(trial_dir: str) -> list[dict]:
  """metrics.jsonl's validation lines (a half-written last line skipped)."""
  path = os.path.join(trial_dir, 'metrics.jsonl')
  lines = []
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if record.get('split') == 'validation':
          lines.append(record)
  return lines


def _total_steps(trial_dir: str) -> int | None:
  """The run's training.total_steps from its config.json (None if in
  epochs, or not written yet)."""
  try:
    with open(os.path.join(trial_dir, 'config.json'), encoding='utf-8') as f:
      return json.load(f)['training']['total_steps']
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _last_error(log_path: str, offset: int) -> str:
  """The run's last `error:` line (else its last line) in this attempt."""
  with open(log_path, encoding='utf-8', errors='replace') as f:
    f.seek(offset)
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines if line.startswith('error:')]
  text = (errors or lines or ['(no output)'])[-1]
  return text.removeprefix('error:').strip()[:300]


class Runner:
  """Runs a sweep's trials, N at a time, each a main.py subprocess."""

  def __init__(
      self, sweep: Sweep, study, parallel: int, devices: str, out=print
  ):
    self.sweep, self.study, self.out = sweep, study, out
    self.settings = slot_settings(devices, parallel)
    self.stop = threading.Event()
    self.error = None  # an unexpected exception in a worker thread
    self._children = set()
    self._trial_locks = {}  # trial number -> fd, held until its state is set
    self._lock = threading.Lock()
    self._ask_lock = threading.Lock()

  def run(self, todo: int):
    """Runs the trials left (`todo` now), a worker thread per slot."""
    threads = [
        threading.Thread(target=self._work, args=setting, daemon=True)
        for setting in self.settings[:todo]
    ]
    for thread in threads:
      thread.start()
    for thread in threads:
      while thread.is_alive():
        thread.join(0.2)  # short waits: signal handlers run in between
    if self.error is not None:
      raise self.error

  def _work(self, env_changes: dict, cores: list):
    """A worker: asks Optuna for trials (one at a time across threads, so
    that no two pop the same queued trial) and tells it their outcome."""
    while not self.stop.is_set():
      with self._ask_lock:
        # Counted afresh each time: other workers' trials are in the study.
        if remaining(self.study, self.sweep) <= 0:
          return
        trial = self.study.ask()
      state, value, same = optuna.trial.TrialState.FAIL, None, False
      try:
        value = self._run(trial, env_changes, cores)
        state = optuna.trial.TrialState.COMPLETE
      except optuna.TrialPruned:
        state = optuna.trial.TrialState.PRUNED
      except (TrialFailed, Interrupted):
        pass
      except _SameTrial:
        same = True
      except Exception as e:  # pylint: disable=broad-except
        trial.set_user_attr('error', f'{type(e).__name__}: {e}'[:300])
        self.error = e  # a bug or a broken machine: stop the sweep
        self.stop.set()
      finally:
        if not same:
          self.study.tell(trial, value, state=state)
          self._release(trial.number)

  def say(self, message: str):
    with self._lock:
      self.out(message)

  def interrupt(self, signum=None, frame=None):
    """Signal handler: runs checkpoint and stop; no new trial starts."""
    del signum, frame
    self.stop.set()
    with self._lock:
      children = list(self._children)
    for proc in children:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  def _release(self, number: int):
    """Frees a trial's lock once its state is stored."""
    with self._lock:
      fd = self._trial_locks.pop(number, None)
    if fd is not None:
      os.close(fd)

  def _retry_later(self, trial, wall_time_s):
    trial.set_user_attr('interrupted', True)
    _enqueue_retry(self.study, _frozen(self.study, trial.number), wall_time_s)
    self.stop.set()  # the sweep stops with its runs
    raise Interrupted('sweep stopped; the trial is resumed on rerun')

  def _run(self, trial, env_changes: dict, cores: list) -> float:
    spec = self.sweep.spec
    values = sweep_space.suggest(trial, spec)
    if self.stop.is_set():
      self._retry_later(trial, None)
    name = trial.user_attrs.get('trial_dir') or (
        sweep_space.grid_trial_name(values)
        if spec['sampler'] == 'grid'
        else sweep_space.space_trial_name(trial.number)
    )
    trial_dir = os.path.join(self.sweep.workdir, name)
    os.makedirs(trial_dir, exist_ok=True)
    lock = _lock(trial_dir, trial.number)
    if lock is None and _lock_owner(trial_dir) == trial.number:
      # Another worker popped the same queued trial (SQLite cannot lock the
      # row); it runs and tells it.
      raise _SameTrial()
    if lock is None:  # a duplicate (workers racing for the last grid point)
      trial.set_user_attr('trial_dir', name)
      trial.set_user_attr(
          'error',
          'duplicate: another worker is running ' 'this trial directory',
      )
      raise TrialFailed(trial.user_attrs['error'])
    with self._lock:
      self._trial_locks[trial.number] = lock
    trial.set_user_attr('host', HOST)
    trial.set_user_attr('overrides', values)
    trial.set_user_attr('trial_dir', name)  # recover() looks for this
    start, proc = time.time(), None
    try:
      proc, offset = self._start(
          trial, trial_dir, values, lock, env_changes, cores
      )
      pruned = self._watch(trial, proc, trial_dir)
    finally:
      with self._lock:
        self._children.discard(proc)
    return self._outcome(
        trial, trial_dir, proc.returncode, pruned, start, offset
    )

  def _start(self, trial, trial_dir, values, lock, env_changes, cores):
    """Starts main.py for the trial; returns it and its log's offset."""
    command = self.sweep.command(trial_dir, values)
    trial.set_user_attr('command', shlex.join(command))
    log_path = os.path.join(trial_dir, 'log.txt')
    with open(log_path, 'a', encoding='utf-8') as log:
      log.write(
          f'=== trial {trial.number} on {HOST} at '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}: '
          f'{shlex.join(command)}\n'
      )
      log.flush()
      offset = log.tell()
      # The run inherits the lock (held while it lives, even if this process
      # dies) and gets its own session: Ctrl-C reaches it via interrupt().
      proc = subprocess.Popen(  # pylint: disable=consider-using-with
          command,
          stdout=log,
          stderr=subprocess.STDOUT,
          env={**os.environ, **env_changes},
          pass_fds=(lock,),
          start_new_session=True,
      )
    if cores:
      os.sched_setaffinity(proc.pid, cores)
    with self._lock:
      self._children.add(proc)
    with open(
        os.path.join(trial_dir, 'trial.json'), 'w', encoding='utf-8'
    ) as f:
      json.dump(
          {
              'trial': trial.number,
              'study': self.sweep.study_name,
              'host': HOST,
              'pid': proc.pid,
              'overrides': values,
              'command': command,
          },
          f,
          indent=2,
      )
    resumes = trial.user_attrs.get('retry_of')
    self.say(
        f'[trial {trial.number}] {os.path.basename(trial_dir)}: started'
        + (f' (resuming trial {resumes})' if resumes is not None else '')
        + f'; log {log_path}'
    )
    if self.stop.is_set():  # a signal came before it was registered
      proc.send_signal(signal.SIGTERM)
    return proc, offset

  def _outcome(self, trial, trial_dir, returncode, pruned, start, offset):
    """Records how the run ended; returns its value or raises."""
    spec, metric = self.sweep.spec, self.sweep.spec['metric']
    name, say = os.path.basename(trial_dir), self.say
    wall = time.time() - start
    trial.set_user_attr(
        'wall_time_s',
        round(wall + (trial.user_attrs.get('previous_wall_time_s') or 0), 2),
    )
    history = _validation(trial_dir)
    if history:
      trial.set_user_attr('steps', max(h['step'] for h in history))
    results_path = os.path.join(trial_dir, 'results.json')
    results = {}
    if os.path.exists(results_path) and os.path.getmtime(results_path) >= start:
      with open(results_path, encoding='utf-8') as f:
        results = json.load(f)
    if pruned:
      say(
          f'[trial {trial.number}] {name}: pruned at step '
          f'{trial.user_attrs.get("steps")}'
      )
      raise optuna.TrialPruned()
    if self.stop.is_set() or 'preempted_at_step' in results:
      say(
          f'[trial {trial.number}] {name}: stopped; rerun the sweep to '
          'resume it from its checkpoint'
      )
      self._retry_later(trial, wall)
    if returncode != 0:
      error = _last_error(os.path.join(trial_dir, 'log.txt'), offset)
      trial.set_user_attr('error', error)
      say(
          f'[trial {trial.number}] {name}: FAILED (exit {returncode}): '
          f'{error}'
      )
      raise TrialFailed(error)
    if 'test' not in results:
      trial.set_user_attr('error', 'main.py wrote no results.json')
      raise TrialFailed(trial.user_attrs['error'])
    trial.set_user_attr(
        'steps', results.get('steps', trial.user_attrs.get('steps'))
    )
    trial.set_user_attr(
        'test', {k: results['test'].get(k) for k in sweep_space.METRICS}
    )
    if history:
      pick = max if spec['direction'] == 'maximize' else min
      best = pick(history, key=lambda h: h[metric])
      value, step = best[metric], best['step']
    else:
      value, step = results['validation'][metric], results.get('steps')
    trial.set_user_attr('best_step', step)
    say(
        f'[trial {trial.number}] {name}: done in {wall:.1f} s; best '
        f'validation {metric} {value:.4f} (step {step}), test '
        f'{results["test"][metric]:.4f}'
    )
    return value

  def _watch(self, trial, proc, trial_dir: str) -> bool:
    """Waits for the run, reporting its validation metric; True if pruned."""
    metric, reported = self.sweep.spec['metric'], set()
    prune = self.sweep.spec['pruner'] is not None
    while True:
      done, new = proc.poll() is not None, False
      for record in _validation(trial_dir):
        if record['step'] not in reported and metric in record:
          trial.report(record[metric], record['step'])
          reported.add(record['step'])
          new = True
      if done:
        return False
      last = _total_steps(trial_dir)  # pruning at the last step saves nothing
      if (
          prune
          and new
          and not self.stop.is_set()
          and (last is None or max(reported) < last)
          and trial.should_prune()
      ):
        proc.send_signal(signal.SIGTERM)  # main.py checkpoints, then exits
        try:
          proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
        return True
      time.sleep(0.5)


def run(
    sweep: Sweep, parallel: int = 1, devices: str = 'auto', out=print
) -> optuna.Study:
  """Runs (or resumes) the sweep, then writes its report."""
  if parallel < 1:
    raise SweepError(f'--parallel={parallel}: use 1 or more')
  study = open_study(sweep)
  runner = Runner(sweep, study, parallel, devices, out)
  for number in recover(study, sweep):
    out(
        f'trial {number} was left running by a stopped sweep: it will be '
        'resumed from its checkpoint'
    )
  todo = remaining(study, sweep)
  spec = sweep.spec
  out(
      f'sweep {sweep.study_name}: {spec["trials"]} trials ({spec["sampler"]}'
      f' sampler, {spec["direction"]} validation {spec["metric"]}), '
      + (
          f'{todo} to run, {min(parallel, todo)} at a time'
          if todo
          else 'none left to run'
      )
      + f'; study in '
      f'{_printable(sweep.storage)}'
  )
  handlers = {}
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGINT, signal.SIGTERM):
      handlers[signum] = signal.signal(signum, runner.interrupt)
  try:
    runner.run(todo)
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
  out('')
  out(report(study, sweep.workdir))
  if runner.stop.is_set():
    raise Interrupted('sweep stopped; rerun the same command to resume')
  return study


def _printable(storage: str) -> str:
  """The storage URL without its password."""
  return re.sub(r'//([^:/@]+):[^@/]+@', r'//\1:***@', storage)


def report(study, workdir: str) -> str:
  """Writes DIR/report.{md,csv,png}; returns the text to print."""
  spec = json.loads(study.user_attrs['sweep']['spec'])
  text = sweep_report.write(study, spec, workdir)
  rows = sweep_report.trial_rows(study, spec)
  counts = {}
  for row in rows:
    counts[row['state']] = counts.get(row['state'], 0) + 1
  lines = [
      f'{spec["direction"]} best validation {spec["metric"]}; trials: '
      + ', '.join(f'{n} {state}' for state, n in counts.items()),
      text,
  ]
  if rows and rows[0]['best_validation'] is not None:
    best = _frozen(study, rows[0]['trial'])
    lines.append(f'best: {rows[0]["name"]}: {best.user_attrs.get("command")}')
  lines.append(
      f'wrote {os.path.join(workdir, "report.md")}, report.csv, ' 'report.png'
  )
  return '\n'.join(lines)


def load_study(
    workdir: str, storage: str | None = None, study_name: str | None = None
) -> optuna.Study:
  """The study of a sweep directory, for `report`."""
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  workdir = os.path.abspath(workdir)
  if storage is None:
    storage = default_storage(workdir)
    if not os.path.exists(os.path.join(workdir, 'study.db')):
      raise SweepError(
          f'no sweep in {workdir} (no study.db; pass --storage '
          'for a shared study)'
      )
  names = optuna.get_all_study_names(_storage(storage))
  name = study_name or os.path.basename(workdir)
  if name not in names:
    if study_name is None and len(names) == 1:
      name = names[0]
    else:
      raise SweepError(
          f'no study {name!r} in {_printable(storage)} (have: '
          f'{", ".join(names) or "none"}); pass --study_name'
      )
  study = optuna.load_study(study_name=name, storage=_storage(storage))
  if 'sweep' not in study.user_attrs:
    raise SweepError(f'study {name!r} was not made by tuning.sweep')
  return study


def dry_run(sweep: Sweep, worker_command: list[str] | None = None) -> str:
  """The commands a scheduler would run, one a line ('#' lines explain)."""
  spec = sweep.spec
  if spec['sampler'] != 'grid':
    command = worker_command or [
        sys.executable,
        '-m',
        'tuning.sweep.runner',
        f'--config={sweep.config}',
        f'--workdir={sweep.workdir}',
        *sweep.overrides,
    ]
    return '\n'.join(
        [
            f'# {spec["sampler"]} sampler, {spec["trials"]} trials: values are '
            'chosen as trials finish, so run this worker (on each machine; they '
            'share the study through --storage):',
            f'cd {shlex.quote(REPO)} && {shlex.join(command)}',
        ]
    )
  finished = set()
  if _study_exists(sweep):
    study = optuna.load_study(
        study_name=sweep.study_name, storage=_storage(sweep.storage)
    )
    finished = {
        t.user_attrs.get('trial_dir')
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if not t.user_attrs.get('interrupted')
    }
  points = sweep_space.grid_points(spec)
  lines = [
      f'# {len(points)} trials, {len(points) - len(finished)} not yet '
      'finished in the study; one main.py run each (running '
      '`python -m tuning.sweep` with the same flags afterwards records '
      'them from their checkpoints):'
  ]
  for values in points:
    name = sweep_space.grid_trial_name(values)
    if name not in finished:
      lines.append(
          shlex.join(sweep.command(os.path.join(sweep.workdir, name), values))
      )
  return '\n'.join(lines)


# ------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    print(
        f'error: {message} (see python -m tuning.sweep --help)', file=sys.stderr
    )
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='python -m tuning.sweep',
      description=(
          'Runs a hyperparameter sweep (every trial a main.py run); '
          '`report` rewrites its report.'
      ),
      usage=(
          'python -m tuning.sweep [report] --config=experiments/x.py[:arg] '
          '--workdir=DIR [--sweep=...] [--parallel=N] [--dry_run] '
          '[--config.k=v ...]'
      ),
  )
  parser.add_argument(
      'command', nargs='?', default='run', choices=('run', 'report')
  )
  parser.add_argument('--config', help='experiment config file[:arg]')
  parser.add_argument('--workdir', required=True, help='sweep directory')
  parser.add_argument(
      '--sweep', help="grid/space: 'k=v1,v2;k2=loguniform(a,b)'"
  )
  parser.add_argument('--zip', help="lists varying together: 'k=v1,v2;k2=..'")
  parser.add_argument('--trials', type=int, help='trial budget (spaces)')
  parser.add_argument('--sampler', choices=sweep_space.SAMPLERS)
  parser.add_argument('--metric', choices=sweep_space.METRICS)
  parser.add_argument('--direction', choices=('maximize', 'minimize'))
  parser.add_argument('--pruner', choices=('median', 'none'))
  parser.add_argument(
      '--parallel', type=int, default=1, help='trials at a time (default 1)'
  )
  parser.add_argument(
      '--devices',
      default='auto',
      choices=DEVICES,
      help='what each parallel trial gets (default auto)',
  )
  parser.add_argument(
      '--storage', help='Optuna storage URL (default ' 'sqlite:///DIR/study.db)'
  )
  parser.add_argument('--study_name', help='default: the basename of DIR')
  parser.add_argument(
      '--dry_run', action='store_true', help='print the commands; run nothing'
  )
  return parser


def main(argv: list[str]) -> int:
  args, rest = _parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    _parser().error(f'unrecognized arguments: {" ".join(unknown)}')
  try:
    if args.command == 'report':
      study = load_study(args.workdir, args.storage, args.study_name)
      print(report(study, os.path.abspath(args.workdir)))
      return 0
    if not args.config:
      raise SweepError('--config=experiments/<name>.py[:arg] is required')
    spec = None
    if args.sweep or args.zip:
      spec = sweep_space.parse_cli(args.sweep, args.zip)
    sweep = prepare(
        args.config,
        args.workdir,
        spec,
        overrides,
        args.storage,
        args.study_name,
        trials=args.trials,
        sampler=args.sampler,
        metric=args.metric,
        direction=args.direction,
        pruner=args.pruner,
    )
    if args.dry_run:
      worker = [
          sys.executable,
          '-m',
          'tuning.sweep.runner',
          f'--config={sweep.config}',
          f'--workdir={sweep.workdir}',
          f'--storage={sweep.storage}',
          f'--study_name={sweep.study_name}',
      ]
      for flag in (
          'sweep',
          'zip',
          'trials',
          'sampler',
          'metric',
          'direction',
          'pruner',
          'parallel',
          'devices',
      ):
        if getattr(args, flag) != _parser().get_default(flag):
          worker.append(f'--{flag}={getattr(args, flag)}')
      print(dry_run(sweep, worker + sweep.overrides))
      return 0
    slot_settings(args.devices, args.parallel)  # a bad flag before any run
    run(sweep, args.parallel, args.devices)
  except (config_loading.ConfigError, SweepError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Interrupted as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
