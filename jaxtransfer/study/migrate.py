"""study.json files written while a study named its image folder by path, read by today's code.

Studies used to record `image_folder`, the folder's absolute path, in their config: the same
data elsewhere was another study, and a shard run on another machine did not pool. They now
record `data_fingerprint`, the folder's content fingerprint (`imagefolder.content_fingerprint`).
A record with a path is migrated (path replaced by the fingerprint, config hash recomputed, the
old hash kept as `config_hash_before_migration`):

- automatically when the study resumes with `--image_folder` at the very path it recorded;
- else by `python -m experiments.migrate_study WORKDIR... --image_folder=PATH`, with PATH the
  data wherever it is now (its class names must be the recorded ones).
"""

from __future__ import annotations

import os
from typing import Sequence

from jaxtransfer import config as config_lib
from jaxtransfer.data import imagefolder
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer import files

LEGACY_FIELD = 'image_folder'
STUDY = 'study.json'


def legacy_path(record: dict) -> str:
  """The image-folder path a study.json record names its data by ('' if none)."""
  return record.get('config', {}).get(LEGACY_FIELD) or ''


def migrated(record: dict, fingerprint: str) -> dict:
  """`record` naming its data by `fingerprint` instead of a path."""
  config = {k: v for k, v in record['config'].items() if k != LEGACY_FIELD}
  config['data_fingerprint'] = fingerprint
  old = {'config_hash_before_migration': record['config_hash']} if 'config_hash' in record else {}
  return {
      **record, 'config': config,
      'config_hash': config_lib.config_hash(config_lib.with_defaults(config)), **old
  }


def _read(workdir: str) -> dict | None:
  path = os.path.join(workdir, STUDY)
  if not os.path.isfile(path):
    return None
  record = rows_lib.read_json(path)  # a file that is not JSON is named
  return record if isinstance(record, dict) else None  # the workdir's checker names the rest


def command(workdir: str) -> str:
  """The command that migrates `workdir`, for error messages."""
  return f'python -m experiments.migrate_study {workdir} --image_folder=PATH'


def migrate(workdir: str, image_folder: str) -> str:
  """Rewrite `workdir`/study.json to name its data by the content of `image_folder`; returns the
  fingerprint. Refuses (one line) a folder whose classes are not the recorded ones."""
  record = _read(workdir)
  if record is None:
    raise ValueError(f'{workdir} holds no {STUDY}')
  if not legacy_path(record):
    raise ValueError(f'{workdir}/{STUDY} names no image folder by path: nothing to migrate')
  splits = imagefolder.scan_image_folder(image_folder)
  names = list(imagefolder.folder_class_names(splits))
  if record.get('class_names') and record['class_names'] != names:
    raise ValueError(f'{image_folder} holds classes {names}, but {workdir} recorded '
                     f'{record["class_names"]}: not the data of that study')
  fingerprint = imagefolder.content_fingerprint(splits)
  files.write_json(os.path.join(workdir, STUDY), migrated(record, fingerprint))
  return fingerprint


def adopt(workdir: str, image_folder: str | None, fingerprint: str, write: bool = True) -> bool:
  """Before a study resumes in `workdir`: migrate a record of `image_folder`'s own path (the
  data of `fingerprint`); refuse one of another path, naming the command. True if migrated (or,
  without `write`, for a process that only reads the workdir, if it is to be)."""
  record = _read(workdir)
  path = legacy_path(record or {})
  if not path:
    return False
  if image_folder is None or os.path.abspath(image_folder) != path:
    raise ValueError(f'{workdir} records its image folder by path ({path}), not by content: if '
                     f'that data is now elsewhere, run {command(workdir)} first')
  if write:
    files.write_json(os.path.join(workdir, STUDY), migrated(record, fingerprint))
  return True


def refuse_legacy(workdirs: Sequence[str]) -> None:
  """Pooling reads identities: a shard that names its data by path must be migrated first."""
  for workdir in workdirs:
    path = legacy_path(_read(workdir) or {})
    if path:
      raise ValueError(f'{workdir} records its image folder by path ({path}), not by content: '
                       f'run {command(workdir)} first')
