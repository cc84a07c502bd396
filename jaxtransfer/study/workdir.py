"""A study's working directory: its layout, its claim on one config, its lock, checkpoints and
metrics.

  study.json             the config (and the dataset's class names) this workdir belongs to
  lock                   exists while a run holds the workdir (an OS lock): who holds it
  stacks/<stack>.json    one finished stack's result rows and the sha256 of every array of its
                         checkpoint; written last, so it marks the stack done
  checkpoints/<stack>/   the stack's final variables (orbax), a leading model axis on every leaf
  metrics.jsonl          per-epoch metrics of every member of every stack, one JSON object a line
  results.csv/json, report.md, figures/   what the study derives from the rows

A rerun skips the stacks whose rows exist, so a kill loses at most the stack in progress. Every
file read back is checked first (`read_study`, `Workdir.finished`, `Workdir.restore`): a bad one
is named in one line, with the way to recover, before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from jaxtransfer import config as config_lib
from jaxtransfer import errors
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer import files
from jaxtransfer.study import context
from jaxtransfer.study import plan as plan_lib

METRICS = 'metrics.jsonl'
LOCK = 'lock'
DIGEST = 'checkpoint_sha256'
# Checkpoint folders being written or replaced start with these; orbax's own end with the
# other. Under the lock, any of them is left over from a killed run.
_PARTIAL = ('.tmp-', '.old-')
_ORBAX_TMP = '.orbax-checkpoint-tmp'
RETRAIN_FLAG = '--retrain_corrupt'


class StateError(ValueError):
  """A workdir that cannot be used as it is: one line naming the file and what to do."""


class Busy(StateError):
  """Another run holds the workdir."""


class Corrupt(StateError):
  """A finished stack whose rows file or checkpoint cannot be trusted; retraining it recovers."""
  def __init__(self, problem: str, recovery: str):
    super().__init__(f'{problem}; {recovery}')
    self.problem = problem


@dataclasses.dataclass(frozen=True)
class StudyRecord:
  """A study.json, checked: the config as today's code records it (`config.with_defaults`), the
  same config validated, and the dataset's class names."""
  recorded: dict
  config: config_lib.StudyConfig
  class_names: tuple[str, ...]


def read_study(path: str) -> StudyRecord:
  """The one reader of study.json files (workdirs, shards): any problem names `path`."""
  record = rows_lib.read_json(path)
  if not isinstance(record, dict) or not isinstance(record.get('config'), dict):
    raise StateError(f'{path} is not a study record (expected an object with a "config")')
  config = context.from_json(record['config'], path)
  names = record.get('class_names', [])
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise StateError(f'{path}: "class_names" must be a list of strings')
  return StudyRecord(config_lib.with_defaults(record['config']), config, tuple(names))


def digest(variables) -> dict[str, str]:
  """sha256 of each array (dtype, shape and bytes), keyed by its path: a mismatch names the
  damaged array, and a missing or extra array shows as one."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    x = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f'{x.dtype.str}{x.shape}'.encode())
    h.update(x.tobytes())
    out['/'.join(str(getattr(k, 'key', k)) for k in path)] = h.hexdigest()
  return out


def _quiet_closed_loop() -> None:
  """After a failed restore, tensorstore's late callbacks report 'Event loop is closed' from
  other threads, a traceback each; they say nothing the one-line error does not."""
  previous = sys.unraisablehook
  if getattr(previous, 'quiet_closed_loop', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)

  hook.quiet_closed_loop = True
  sys.unraisablehook = hook


def _checkpointer():
  """An orbax checkpointer for this process alone: in a distributed run the writer saves and
  every process restores by itself, so no save or restore waits on a collective (orbax's own
  default makes every process take part in both)."""
  import orbax.checkpoint as ocp  # heavy import, only when a checkpoint is saved or read
  me = jax.process_index()
  options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options),
                          multiprocessing_options=options)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


class Workdir:
  """Layout: study.json, lock, stacks/<stack>.json (rows, written last), checkpoints/<stack>/."""
  def __init__(self, path: str, writer: bool | None = None):
    self.path = path
    self._writer = writer

  @property
  def writer(self) -> bool:
    """Whether this process writes the workdir (its lock, study.json, rows files, checkpoints,
    metrics and every derived file); by default the first process of a distributed run. The
    others compute the same values, read what the writer wrote and write nothing, so every
    shared file has one writer."""
    return jax.process_index() == 0 if self._writer is None else self._writer

  def sync(self, name: str) -> None:
    """Wait until every process of a distributed run is here (after the writer wrote what the
    others read next)."""
    _barrier(f'{name}-{self.path}')

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  def rows_file(self, stack: plan_lib.Stack) -> str:
    return self.file('stacks', f'{stack.name}.json')

  def checkpoint(self, stack: plan_lib.Stack) -> str:
    return self.file('checkpoints', stack.name)

  def study(self) -> StudyRecord | None:
    meta = self.file('study.json')
    return read_study(meta) if os.path.exists(meta) else None

  def check(self, config: config_lib.StudyConfig) -> None:
    """Refuse a workdir that holds a study with other flags (no mixing of studies)."""
    record = self.study()
    if record is not None:
      old, new = config_lib.complete(record.recorded), config_lib.complete(config.to_json())
      diff = config_lib.differing(old, new)
      if diff:
        changes = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)
        raise ValueError(f'workdir {self.path} holds a study with other flags ({changes}); '
                         'use a new --workdir')

  def claim(self, config: config_lib.StudyConfig, class_names: Sequence[str] = ()) -> None:
    """Record `config` as this workdir's study (after `check`), with the dataset's class names
    so that the results can be read (and pooled) without the data."""
    self.check(config)
    if not self.writer:
      return
    os.makedirs(self.file('stacks'), exist_ok=True)
    meta = self.file('study.json')
    record = {'config': config.to_json(), 'config_hash': config.hash()}
    if os.path.exists(meta):
      record = rows_lib.read_json(meta)
      if record.get('class_names') or not class_names:
        return
    files.write_json(meta, {**record, 'class_names': list(class_names)})

  @contextlib.contextmanager
  def lock(self, wait: bool = False, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the workdir for one run: an advisory OS lock (flock) on `lock`, so the kernel
    releases it when the process ends, however (kill -9 included). A second run is refused at
    once with the holder's pid and host, or, with `wait`, blocks until the holder ends. A lock
    file that is still there but unlocked was left by a run that died: `log` says whose, since
    its work is resumed now. Only the first process of a distributed run locks: the others are
    the same run."""
    if not self.writer:
      yield
      return
    os.makedirs(self.path, exist_ok=True)
    path = self.file(LOCK)
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
        if not wait:
          os.close(fd)
          raise Busy(f'workdir {self.path} is in use by {holder} (lock file {path}); let that '
                     'run finish, or pass --wait_for_lock to wait for it') from None
        if log:
          log(f'waiting for workdir {self.path}, in use by {holder}')
        fcntl.flock(fd, fcntl.LOCK_EX)
      if _same_file(fd, path):
        break
      os.close(fd)  # the holder removed the file as we waited on it: lock the new one
    try:
      died = os.pread(fd, 200, 0).decode(errors='replace').strip()  # a clean exit removes the file
      if died and log:
        log(f'the run of {died} ended without releasing workdir {self.path} (killed?): '
            'resuming its work')
      os.ftruncate(fd, 0)
      os.write(
          fd, f'pid {os.getpid()} on {socket.gethostname()} since '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode())
      yield
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # still locked: a waiter that opened it sees it gone and retries
      os.close(fd)

  def remove_leftovers(self) -> None:
    """Delete partial checkpoints of killed runs (call under the lock: then nobody writes)."""
    folder = self.file('checkpoints')
    if self.writer and os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.startswith(_PARTIAL) or _ORBAX_TMP in name:
          _remove(os.path.join(folder, name))

  def _recovery(self, stack: plan_lib.Stack) -> str:
    return (f'rerun with {RETRAIN_FLAG} to retrain stack {stack.name}, or delete '
            f'{self.rows_file(stack)} and {self.checkpoint(stack)}')

  def _record(self, stack: plan_lib.Stack) -> tuple[list, dict | None] | None:
    """The rows file as written (rows not yet checked, the digest or None for a file from before
    digests); None if the stack is not finished."""
    path = self.rows_file(stack)
    if not os.path.exists(path):
      return None
    try:
      record = rows_lib.read_json(path)
    except ValueError as e:
      raise Corrupt(str(e), self._recovery(stack)) from None
    if isinstance(record, list):  # written before digests
      return record, None
    if (isinstance(record, dict) and set(record) == {'rows', DIGEST} and
        isinstance(record['rows'], list) and isinstance(record[DIGEST], dict) and
        all(isinstance(v, str) for v in record[DIGEST].values())):
      return record['rows'], record[DIGEST]
    raise Corrupt(f'{path} is not a rows file (expected {{"rows": [...], "{DIGEST}": {{...}}}})',
                  self._recovery(stack))

  def finished(self, stack: plan_lib.Stack, expected: Mapping[tuple, dict]) -> list[dict] | None:
    """The stack's rows if it is finished, checked against the plan (`expected`: run id ->
    planned values) and its checkpoint against their digest; None if not finished. A rows file
    from before digests gets its checkpoint's digest recorded now. Raises Corrupt."""
    record = self._record(stack)
    if record is None:
      return None
    raw, sha = record
    path = self.rows_file(stack)
    planned = {k: v for k, v in expected.items() if k in {_run_id(r) for r in stack.runs}}
    try:
      rows = rows_lib.check_rows(
          [rows_lib.typed_row(r, f'{path} row {i}') for i, r in enumerate(raw)], path, planned)
    except rows_lib.RowsError as e:
      raise Corrupt(str(e), self._recovery(stack)) from None
    if sha is None:
      if self.writer:
        files.write_json(path, {'rows': rows, DIGEST: digest(self._load(stack))})
        logging.info('%s: recorded the digest of %s', path, self.checkpoint(stack))
      _barrier(f'digest-{stack.name}')
    else:
      self.restore(stack)
    return rows

  def discard(self, stack: plan_lib.Stack) -> None:
    """Mark the stack unfinished (its rows file goes first), to be retrained."""
    if self.writer and os.path.lexists(self.rows_file(stack)):
      os.remove(self.rows_file(stack))
    _barrier(f'discard-{stack.name}')

  def save(self, stack: plan_lib.Stack, variables, rows: list[dict]) -> None:
    """Checkpoint into a temporary folder, swap it in, then write the rows with the digest of
    every array: the rows file marks the stack finished. A failure ends in one line, leaving
    what was there. A synchronous orbax checkpointer: the asynchronous one's background thread
    held a failed save's process for minutes before it could exit. Only the writer saves; the
    others wait until it has."""
    final = self.checkpoint(stack)
    tmp = self.file('checkpoints', _PARTIAL[0] + stack.name)
    old = self.file('checkpoints', _PARTIAL[1] + stack.name)
    if self.writer:
      _remove(tmp)
      try:
        _checkpointer().save(os.path.abspath(tmp), variables)
        if os.path.exists(final):  # left by a run killed before its rows were written
          files.replace(final, old)
        files.replace(tmp, final)
        _remove(old)
        files.write_json(self.rows_file(stack), {'rows': rows, DIGEST: digest(variables)})
      except Exception as e:  # pylint: disable=broad-except
        raise StateError(f'cannot save checkpoint {final}: {errors.one_line(e)}') from None
    _barrier(f'saved-{stack.name}')

  def _load(self, stack: plan_lib.Stack):
    path = os.path.abspath(self.checkpoint(stack))
    if not os.path.isdir(path):
      raise Corrupt(f'checkpoint {path} is missing', self._recovery(stack))
    _quiet_closed_loop()
    try:
      return _checkpointer().restore(path)
    except Exception as e:  # pylint: disable=broad-except
      raise Corrupt(f'checkpoint {path} cannot be read ({errors.one_line(e)})',
                    self._recovery(stack)) from None

  def restore(self, stack: plan_lib.Stack):
    """The finished stack's variables (host arrays), verified against the digest in its rows
    file. Raises Corrupt naming the checkpoint and how to recover."""
    record = self._record(stack)
    if record is None:
      raise StateError(f'stack {stack.name} is not finished ({self.rows_file(stack)} is missing)')
    variables = self._load(stack)
    expected = record[1]
    if expected is not None:
      actual = digest(variables)
      bad = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
      if bad:
        raise Corrupt(
            f'checkpoint {self.checkpoint(stack)} is damaged: it does not match the digest in '
            f'{self.rows_file(stack)} ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})',
            self._recovery(stack))
    return variables

  def members(self, stacks: Sequence[plan_lib.Stack], base_only: bool = False) -> dict:
    """Every finished member's variables (host arrays, verified), keyed by its `Run`."""
    out = {}
    for stack in stacks:
      if stack.is_base or not base_only:
        variables = self.restore(stack)
        for j, run in enumerate(stack.runs):
          out[run] = jax.tree.map(lambda x, j=j: np.asarray(x[j]), variables)
    return out

  def append_metrics(self, records: Sequence[dict]) -> None:
    """Append one JSON line per record. One write per call, and a call that finds the file
    ending mid-line (a killed writer) starts on a new line: a kill costs at most its own last
    line, which `read_metrics` skips."""
    if not self.writer:
      return
    text = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
    path = self.file(METRICS)
    with open(path, 'ab') as f:
      if f.tell() and not _ends_with_newline(path):
        text = '\n' + text
      f.write(text.encode())

  def read_metrics(self) -> list[dict]:
    """Every complete metrics line; of records repeated for the same run and epoch (a stack
    retrained after a kill), the last."""
    path = self.file(METRICS)
    if not os.path.exists(path):
      return []
    latest = {}
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        latest[(record['run'], record['epoch'])] = record
    return list(latest.values())


def _run_id(run: plan_lib.Run) -> tuple:
  return rows_lib.run_id(plan_lib.run_fields(run))


def _same_file(fd: int, path: str) -> bool:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'
