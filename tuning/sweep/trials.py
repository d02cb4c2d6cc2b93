"""Running a sweep's trials: each a main.py subprocess, N at a time.

`run` opens the study, re-queues trials a stopped sweep left running on this
host (`recover`), then a `Runner` asks Optuna for trials and runs each in
DIR/<trial> (its log.txt, trial.json and a lock file that its main.py
inherits), reports its validation metric as it trains (median pruning sends
the run SIGTERM: it checkpoints and stops), and tells Optuna the outcome: its
best validation metric, pruned, or failed with the run's last `error:` line.
With `--parallel=N` each slot gets a GPU or a share of the CPU cores
(`slot_settings`). SIGINT/SIGTERM ask every run to checkpoint, and each
stopped trial is queued again, to resume in its directory on the next run.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shlex
import signal
import subprocess
import threading
import time

import optuna

from tuning.sweep import report as sweep_report
from tuning.sweep import space as sweep_space
from tuning.sweep import study as sweep_study
from tuning.sweep.space import SweepError

LOCK = '.sweep.lock'
DEVICES = ('auto', 'cpu', 'cuda', 'none')


class TrialFailed(Exception):
  """A trial's run failed; the sweep records it and goes on."""


class Interrupted(Exception):
  """The sweep was stopped; the trial is run again on the next attempt."""


class _SameTrial(Exception):
  """This trial is already being run by another worker."""


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


def recover(study, sweep: sweep_study.Sweep) -> list[int]:
  """Re-queues trials left running by a sweep on this host that died."""
  retried = []
  for t in study.get_trials(
      deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
  ):
    name = t.user_attrs.get('trial_dir')
    if name is not None:
      if t.user_attrs.get('host') != sweep_study.HOST:
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
    trial_id = sweep_study.trial_id(study, t.number)
    storage = study._storage  # pylint: disable=protected-access
    storage.set_trial_user_attr(trial_id, 'interrupted', True)
    sweep_study.enqueue_retry(study, t, wall)
    storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    retried.append(t.number)
  return retried


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
      self,
      sweep: sweep_study.Sweep,
      study,
      parallel: int,
      devices: str,
      out=print,
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
        if sweep_study.remaining(self.study, self.sweep) <= 0:
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
    sweep_study.enqueue_retry(
        self.study,
        sweep_study.frozen_trial(self.study, trial.number),
        wall_time_s,
    )
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
    trial.set_user_attr('host', sweep_study.HOST)
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
          f'=== trial {trial.number} on {sweep_study.HOST} at '
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
              'host': sweep_study.HOST,
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
    sweep: sweep_study.Sweep,
    parallel: int = 1,
    devices: str = 'auto',
    out=print,
) -> optuna.Study:
  """Runs (or resumes) the sweep, then writes its report."""
  if parallel < 1:
    raise SweepError(f'--parallel={parallel}: use 1 or more')
  study = sweep_study.open_study(sweep)
  runner = Runner(sweep, study, parallel, devices, out)
  for number in recover(study, sweep):
    out(
        f'trial {number} was left running by a stopped sweep: it will be '
        'resumed from its checkpoint'
    )
  todo = sweep_study.remaining(study, sweep)
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
      f'{sweep_study.printable(sweep.storage)}'
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
  out(sweep_report.summary(study, sweep.workdir))
  if runner.stop.is_set():
    raise Interrupted('sweep stopped; rerun the same command to resume')
  return study
