"""Files written whole or not at all: the one place the package writes a file atomically.

Whatever reads a file back (a rerun resuming a workdir, `compare`, a person) sees either the
whole new content under its final name or the whole old one, never part of a file, even after
`kill -9` or a power cut: the content goes to a temporary file beside the target, is synced to
disk, renamed over the target, and the rename is synced with the directory.

Standard library only, so every floor of the package can use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from typing import Any, Iterator

# Temporary files start with this: hidden, and recognisable as left over by a killed writer.
TEMP_PREFIX = '.tmp-'


def _temp_beside(path: str) -> str:
  """A new empty file in `path`'s directory, with `path`'s extension (writers such as savefig
  pick the format from it). Created with the mode a plain `open(path, 'w')` gives (0o666 less
  the umask), not `tempfile.mkstemp`'s owner-only 0o600: results are meant to be read by
  others."""
  directory, name = os.path.split(os.path.abspath(path))
  suffix = os.path.splitext(name)[1]
  while True:
    tmp = os.path.join(directory, f'{TEMP_PREFIX}{secrets.token_hex(6)}{suffix}')
    try:
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      return tmp
    except FileExistsError:
      continue


def _sync(path: str) -> None:
  """fsync the file or directory at `path`: its data, or its entries (a rename), reach the disk."""
  fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
  try:
    os.fsync(fd)
  except OSError as e:
    # Some file systems (network, FUSE) cannot sync a directory; the rename is atomic anyway.
    if e.errno != errno.EINVAL or not os.path.isdir(path):
      raise
  finally:
    os.close(fd)


def replace(src: str, dst: str) -> None:
  """Rename `src` (a file or a folder) over `dst`, then sync the directory so that the rename
  itself survives a crash."""
  os.replace(src, dst)
  _sync(os.path.dirname(os.path.abspath(dst)))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yield a temporary path beside `path` (same extension) for the block to write; if the block
  succeeds, sync it and move it into place (`replace`). If the block fails, the temporary file
  is removed and `path` keeps what it held. Creates `path`'s directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _temp_beside(path)
  try:
    yield tmp
    _sync(tmp)
    replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      f.write(text)


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON with sorted keys and a final newline: stable, diffable files."""
  write_text(path, json.dumps(obj, indent=1, sort_keys=True) + '\n')
