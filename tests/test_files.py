"""Atomic writes: a target holds its whole new content or its whole old one, never part of a file,
and both the file and the rename are synced to disk."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from jaxtransfer import files
from tests.conftest import ROOT


def test_a_write_replaces_the_whole_file_and_leaves_nothing_beside_it(tmp_path):
  path = tmp_path / 'new' / 'report.md'  # the folder is created
  files.write_text(str(path), 'old\n')
  files.write_text(str(path), 'new\n')
  assert path.read_text() == 'new\n' and os.listdir(path.parent) == ['report.md']
  files.write_json(str(tmp_path / 'study.json'), {'b': [1], 'a': 'x'})
  assert (tmp_path / 'study.json').read_text() == '{\n "a": "x",\n "b": [\n  1\n ]\n}\n'


def test_a_new_file_gets_the_mode_of_a_plain_open(tmp_path):
  """0o666 less the umask, as `open(path, 'w')` gives: not mkstemp's owner-only 0o600."""
  umask = os.umask(0o022)
  try:
    files.write_text(str(tmp_path / 'results.csv'), 'x')
  finally:
    os.umask(umask)
  assert stat.S_IMODE(os.stat(tmp_path / 'results.csv').st_mode) == 0o644


def test_a_writer_failing_midway_leaves_the_old_file_and_no_temporary_one(tmp_path):
  path = tmp_path / 'results.csv'
  files.write_text(str(path), 'the old content\n')
  with pytest.raises(ZeroDivisionError):
    with files.atomic_path(str(path)) as tmp:
      assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith('.csv')  # savefig's format
      with open(tmp, 'w') as f:
        f.write('half of the new')
      1 / 0
  assert path.read_text() == 'the old content\n'
  assert os.listdir(tmp_path) == ['results.csv']


def test_a_failed_rename_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
  path = tmp_path / 'study.json'
  files.write_json(str(path), {'old': True})

  def full_disk(src, dst):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'replace', full_disk)
  with pytest.raises(OSError, match='No space left'):
    files.write_json(str(path), {'new': True})
  assert json.loads(path.read_text()) == {'old': True}
  assert os.listdir(tmp_path) == ['study.json']


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path):
  """kill -9 mid-write: no cleanup runs, yet the target holds its old content; what is left
  beside it is a hidden temporary file. files.py needs no JAX or numpy."""
  path = tmp_path / 'results.csv'
  files.write_text(str(path), 'the old content\n')
  code = ('import os, signal, sys; from jaxtransfer import files\n'
          'assert not {"jax", "numpy"} & set(sys.modules), sorted(sys.modules)\n'
          f'with files.atomic_path({str(path)!r}) as tmp:\n'
          '  with open(tmp, "w") as f:\n'
          '    f.write("half of the new"); f.flush()\n'
          '    os.kill(os.getpid(), signal.SIGKILL)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert path.read_text() == 'the old content\n'
  (left,) = set(os.listdir(tmp_path)) - {'results.csv'}
  assert left.startswith(files.TEMP_PREFIX) and left.endswith('.csv')


def test_the_file_and_then_its_directory_are_synced(tmp_path, monkeypatch):
  synced = []
  real_fsync = os.fsync

  def fsync(fd):
    synced.append('dir' if stat.S_ISDIR(os.fstat(fd).st_mode) else 'file')
    real_fsync(fd)

  monkeypatch.setattr(os, 'fsync', fsync)
  files.write_text(str(tmp_path / 'report.md'), 'text')
  assert synced == ['file', 'dir']
  synced.clear()
  (tmp_path / '.tmp-checkpoint').mkdir()
  files.replace(str(tmp_path / '.tmp-checkpoint'), str(tmp_path / 'checkpoint'))
  assert synced == ['dir'] and sorted(os.listdir(tmp_path)) == ['checkpoint', 'report.md']
