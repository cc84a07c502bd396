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
import errno
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
STUDY = 'study.json'
POOL = 'pool.json'
# What a study (or a pool, which is a study too) leaves in its folder: any of them without the
# folder's record belongs to a study whose record is lost, and a run would mix the two.
OUTPUTS = ('results.csv', 'results.json', 'report.md', 'sweep.md', METRICS, 'stacks', 'checkpoints',
           'figures')


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
  same config validated, the dataset's class names, and the hashes its rows may carry (its own
  and, for a migrated record, the one before)."""
  recorded: dict
  config: config_lib.StudyConfig
  class_names: tuple[str, ...]
  hashes: tuple[str, ...] = ()


def read_study(path: str) -> StudyRecord:
  """The one reader of study.json files (workdirs, shards): any problem names `path`. A record
  whose `config_hash` is not the hash of its config was edited by hand: its rows were trained
  under another config, so it is refused rather than trusted."""
  record = rows_lib.read_json(path)
  if not isinstance(record, dict) or not isinstance(record.get('config'), dict):
    raise StateError(f'{path} is not a study record (expected an object with a "config")')
  config = context.from_json(record['config'], path)
  names = record.get('class_names', [])
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise StateError(f'{path}: "class_names" must be a list of strings')
  recorded = config_lib.with_defaults(record['config'])
  actual = config_lib.config_hash(recorded)
  if record.get('config_hash', actual) != actual:
    raise StateError(f'{path}: its config does not match its "config_hash" '
                     f'({record["config_hash"]!r}, the config hashes to {actual!r}): edited after '
                     'its models were trained? Restore the record, or run the changed study in a '
                     'new --workdir')
  before = record.get('config_hash_before_migration')
  hashes = (actual,) + ((before,) if isinstance(before, str) else ())
  return StudyRecord(recorded, config, tuple(names), hashes)


def outputs(path: str) -> list[str]:
  """The study outputs in folder `path`: files, and folders that are not empty."""
  found = []
  for name in OUTPUTS:
    full = os.path.join(path, name)
    if os.path.islink(full) or os.path.isfile(full) or (os.path.isdir(full) and os.listdir(full)):
      found.append(name + ('/' if os.path.isdir(full) and not os.path.islink(full) else ''))
  return found


def check_owner(path: str, *, study: bool, pool: dict | None = None) -> None:
  """Refuse folder `path` unless it is new or belongs to the study about to write there: the one
  notion of ownership for a run (`study`: its study.json is compared by the caller) and a pool
  (`pool`: the pool.json it would write; the same pool of the same shards may be pooled again,
  giving the same files). A pool.json, a study.json of the other kind, or study outputs without
  a record are another study's: refused in one line naming the folder and what it holds."""
  use = 'use a new --workdir' if study else 'pool into a new directory'
  if os.path.lexists(os.path.join(path, POOL)):
    if study:
      raise StateError(f'{path} holds a pooled study ({POOL}); a run cannot write into it: {use}')
    held = rows_lib.read_json(os.path.join(path, POOL))
    if held != pool:
      raise StateError(f'{path} holds another pool ({POOL} with other shards or flags); {use}')
    return
  if os.path.lexists(os.path.join(path, STUDY)):
    if not study:
      raise StateError(f'{path} holds a study ({STUDY}); {use}')
    return
  found = outputs(path)
  if found:
    raise StateError(f'{path} holds study outputs without a {STUDY} or {POOL} '
                     f'({", ".join(found)}); {use}, or delete them')


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
    """Refuse a workdir that holds a study with other flags, a pool, or outputs of a study
    without its record (`check_owner`: no mixing of studies)."""
    check_owner(self.path, study=True)
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
    meta = self.file(STUDY)
    record = {'config': config.to_json(), 'config_hash': config.hash()}
    if os.path.exists(meta):
      record = rows_lib.read_json(meta)
    if not os.path.exists(meta) or (class_names and not record.get('class_names')):
      files.write_json(meta, {**record, 'class_names': list(class_names)})
    os.makedirs(self.file('stacks'), exist_ok=True)  # after the record: never outputs without it

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
      fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
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
    """Delete what killed runs left half-written (call under the lock: then nobody writes):
    partial checkpoints, and the temporary files of atomic writes (`files.TEMP_PREFIX`) in the
    workdir, stacks/ and figures/."""
    if not self.writer:
      return
    folder = self.file('checkpoints')
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.startswith(_PARTIAL) or _ORBAX_TMP in name:
          _remove(os.path.join(folder, name))
    # Only the folders a run writes files into: a folder nested here may be another study's.
    for where in (self.path, self.file('stacks'), self.file('figures')):
      if os.path.isdir(where) and not os.path.islink(where):
        for name in os.listdir(where):
          path = os.path.join(where, name)
          if name.startswith(files.TEMP_PREFIX) and not os.path.isdir(path):
            os.remove(path)

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
    study = self.study()
    foreign = next(
        (r['config_hash'] for r in rows if study and r['config_hash'] not in study.hashes), None)
    if foreign is not None:
      raise StateError(f'{path} holds rows of study {foreign}, not of the study its {STUDY} '
                       f'records ({study.hashes[0]}): the two were mixed; use a new --workdir')
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
    """Checkpoint into a temporary folder, read it back and check it against the digest of
    every array (a save is never trusted unread), swap it in, then write the rows with that
    digest: the rows file marks the stack finished. A failure ends in one line, leaving what was
    there. A synchronous orbax checkpointer: the asynchronous one's background thread held a
    failed save's process for minutes before it could exit. Only the writer saves; the others
    wait until it has."""
    final = self.checkpoint(stack)
    tmp = self.file('checkpoints', _PARTIAL[0] + stack.name)
    old = self.file('checkpoints', _PARTIAL[1] + stack.name)
    if self.writer:
      _remove(tmp)
      expected = digest(variables)
      try:
        with _orbax_path(tmp) as where:
          _checkpointer().save(where, variables)
        bad = _mismatch(digest(_read_checkpoint(tmp)), expected)
        if bad:
          raise StateError(f'read back, it does not match what was saved ({", ".join(bad[:3])})')
        if os.path.exists(final):  # left by a run killed before its rows were written
          files.replace(final, old)
        files.replace(tmp, final)
        _remove(old)
        files.write_json(self.rows_file(stack), {'rows': rows, DIGEST: expected})
      except Exception as e:  # pylint: disable=broad-except
        raise StateError(f'cannot save checkpoint {final}: {errors.one_line(e)}') from None
    _barrier(f'saved-{stack.name}')

  def _load(self, stack: plan_lib.Stack):
    path = os.path.abspath(self.checkpoint(stack))
    if not os.path.isdir(path):
      raise Corrupt(f'checkpoint {path} is missing', self._recovery(stack))
    try:
      return _read_checkpoint(path)
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
      bad = _mismatch(digest(variables), expected)
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
    line, which `read_metrics` skips. A symlink there is refused, not written through."""
    if not self.writer:
      return
    text = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
    fd = open_nofollow(self.file(METRICS), os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
      end = os.lseek(fd, 0, os.SEEK_END)
      if end and os.pread(fd, 1, end - 1) != b'\n':
        text = '\n' + text
      os.write(fd, text.encode())
    finally:
      os.close(fd)

  def read_metrics(self) -> list[dict]:
    """Every complete metrics line; of records repeated for the same run and epoch (a stack
    retrained after a kill), the last. The one reader of metrics.jsonl: a line that is neither
    a metrics record nor one cut by a kill is named, with the way out."""
    return read_metrics(self.file(METRICS))


_METRIC_FIELDS = {
    'run': str, 'condition': str, 'epoch': int, 'depth': int, 'loss': (int, float),
    'train_accuracy': (int, float)
}


def _metrics_problem(record) -> str | None:
  """Why `record` is not a metrics record (None if it is)."""
  if not isinstance(record, dict):
    return f'a JSON {type(record).__name__}, not an object'
  for key, kind in _METRIC_FIELDS.items():
    if key not in record:
      return f'no "{key}"'
    if not isinstance(record[key], kind) or isinstance(record[key], bool):
      return f'"{key}" is {record[key]!r:.40}'
  if record['epoch'] < 1:
    return f'"epoch" is {record["epoch"]}'
  test = record.get('test_accuracy', 0.0)
  if not isinstance(test, (int, float)) or isinstance(test, bool):
    return f'"test_accuracy" is {test!r:.40}'
  return None


def read_metrics(path: str) -> list[dict]:
  """`Workdir.read_metrics` of the metrics file `path` (a workdir's, or a shard's)."""
  if not os.path.lexists(path):
    return []
  if os.path.islink(path):
    raise StateError(f'{path} is a symlink; a workdir\'s files are its own: remove the link')
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  latest = {}
  for number, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    where = f'{path} line {number}: not a metrics record'
    fix = 'delete the line or the file: it only feeds the learning curves'
    try:
      line = raw.decode('ascii')  # json.dumps writes ASCII only
    except UnicodeDecodeError as e:
      raise StateError(f'{where} (byte {raw[e.start]:#x} at column {e.start + 1}); {fix}') from None
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if line.startswith('{"') and line.isprintable():
        continue  # a line cut by a kill
      raise StateError(f'{where} ({e}); {fix}') from None
    problem = _metrics_problem(record)
    if problem:
      raise StateError(f'{where} ({problem}); {fix}')
    latest[(record['run'], record['epoch'])] = record
  return list(latest.values())


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
  """`os.open` of a workdir file that is not a symlink: a link there (to anything) is refused in
  one line naming it, so that no run writes through it into its target."""
  try:
    return os.open(path, flags | os.O_NOFOLLOW, mode)
  except OSError as e:
    if e.errno == errno.ELOOP or os.path.islink(path):
      raise StateError(f'{path} is a symlink; a workdir\'s files are its own: remove the link '
                       '(nothing was written through it)') from None
    raise


def _mismatch(actual: Mapping[str, str], expected: Mapping[str, str]) -> list[str]:
  """The arrays whose digests differ (or that only one side has), sorted."""
  return sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))


_GLOB = frozenset('*?[]{}')


@contextlib.contextmanager
def _orbax_path(path: str) -> Iterator[str]:
  """`path` as orbax can be given it: orbax reads a path with glob characters (`exp[lr=0.1]`) as
  a pattern and never merges or finds its checkpoint, so such a path is reached through a
  symlink to its folder from a temporary folder whose name has none."""
  path = os.path.abspath(path)
  if not _GLOB & set(path):
    yield path
    return
  import tempfile
  link_dir = tempfile.mkdtemp(prefix='jaxtransfer-')
  if _GLOB & set(link_dir):
    raise StateError(f'the temporary folder {link_dir} has glob characters; set TMPDIR to a '
                     'folder without any of *?[]{}')
  try:
    link = os.path.join(link_dir, 'folder')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(os.path.dirname(path), link)
    yield os.path.join(link, os.path.basename(path))
  finally:
    shutil.rmtree(link_dir)


def _read_checkpoint(path: str):
  """The variables of the orbax checkpoint at `path` (host arrays)."""
  _quiet_closed_loop()
  with _orbax_path(path) as where:
    return _checkpointer().restore(where)


def _run_id(run: plan_lib.Run) -> tuple:
  return rows_lib.run_id(plan_lib.run_fields(run))


def _same_file(fd: int, path: str) -> bool:
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
