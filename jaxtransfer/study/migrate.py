"""study.json files written while a study named its image folder by path, or by the earlier kind
of content fingerprint, read by today's code.

Studies used to record `image_folder`, the folder's absolute path, in their config: the same
data elsewhere was another study, and a shard run on another machine did not pool. They then
recorded `data_fingerprint` of names and sizes only (`imagefolder.sizes_fingerprint`, a bare
sha256), blind to an image replaced by another of the same size. They now record the content
fingerprint, which hashes every image's bytes (`imagefolder.content_fingerprint`, 'v2:...').
A record of either earlier kind is migrated (its data named by the content fingerprint, config
hash recomputed, the first hash kept as `config_hash_before_migration` and an earlier
fingerprint as `data_fingerprint_before_migration`):

- automatically when the study resumes with `--image_folder` at the very path it recorded, or
  at a folder whose names and sizes are the ones it recorded;
- else by `python -m experiments.migrate_study WORKDIR... --image_folder=PATH`, with PATH the
  data wherever it is now (its class names, or its names and sizes, must be the recorded ones).

A study of a model of your own recorded before its source's digest (`model_sha256`) was part of
its identity adopts the digest of the model file when it resumes (`adopt_model`).

Records of names and sizes keep reading and pooling with each other as they are (every
published study's); a shard of that kind pools with one of today's only once migrated.
"""

from __future__ import annotations

import logging
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


def sizes_kind(record: dict) -> str:
  """The earlier-kind fingerprint (names and sizes) a study.json record names its data by ('' if
  none)."""
  fingerprint = record.get('config', {}).get('data_fingerprint') or ''
  return fingerprint if imagefolder.is_sizes_fingerprint(fingerprint) else ''


def migrated(record: dict, fingerprint: str) -> dict:
  """`record` naming its data by the content `fingerprint` instead of a path or an earlier kind of
  fingerprint (kept, with the study's first hash, as provenance)."""
  config = {k: v for k, v in record['config'].items() if k != LEGACY_FIELD}
  before = config.get('data_fingerprint') or ''
  config['data_fingerprint'] = fingerprint
  old = {}
  if 'config_hash' in record:
    old['config_hash_before_migration'] = record.get('config_hash_before_migration',
                                                     record['config_hash'])
  if before:
    old['data_fingerprint_before_migration'] = before
  return {
      **record, 'config': config,
      'config_hash': config_lib.config_hash(config_lib.with_defaults(config)), **old
  }


def _holds_sizes(image_folder: str, splits, recorded: str, workdir: str) -> None:
  """Refuse a folder whose names and sizes are not those `workdir` recorded."""
  found = imagefolder.sizes_fingerprint(splits)
  if found != recorded:
    raise ValueError(f'{image_folder} is not the data {workdir} recorded: its names and sizes '
                     f'give the fingerprint {found}, the study recorded {recorded}')


def recognised(given: str, image_folder: str, fingerprint: str) -> str:
  """A `--data_fingerprint` of names and sizes given for `image_folder`: the folder's content
  `fingerprint` if its names and sizes give it (else `given`, which `config.with_data` refuses)."""
  splits = imagefolder.scan_image_folder(image_folder)
  return fingerprint if imagefolder.sizes_fingerprint(splits) == given else given


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
  fingerprint. Refuses (one line) a folder whose classes (for a record by path) or names and
  sizes (for one of that kind) are not the recorded ones."""
  record = _read(workdir)
  if record is None:
    raise ValueError(f'{workdir} holds no {STUDY}')
  if not legacy_path(record) and not sizes_kind(record):
    raise ValueError(f'{workdir}/{STUDY} names no image folder by path nor by names and sizes: '
                     'nothing to migrate')
  splits = imagefolder.scan_image_folder(image_folder)
  names = list(imagefolder.folder_class_names(splits))
  if record.get('class_names') and record['class_names'] != names:
    raise ValueError(f'{image_folder} holds classes {names}, but {workdir} recorded '
                     f'{record["class_names"]}: not the data of that study')
  if sizes_kind(record):
    _holds_sizes(image_folder, splits, sizes_kind(record), workdir)
  fingerprint = imagefolder.content_fingerprint(splits)
  files.write_json(os.path.join(workdir, STUDY), migrated(record, fingerprint))
  return fingerprint


def adopt(workdir: str, image_folder: str | None, fingerprint: str, write: bool = True) -> bool:
  """Before a study resumes in `workdir` on `image_folder` (the data of the content
  `fingerprint`): migrate a record of that folder's own path, or of its names and sizes; refuse
  one of another path, naming the command, one of other names and sizes, and one whose content
  fingerprint is not the folder's (its data changed since the study began). True if migrated
  (or, without `write`, for a process that only reads the workdir, if it is to be)."""
  record = _read(workdir) or {}
  path, sizes = legacy_path(record), sizes_kind(record)
  recorded = record.get('config', {}).get('data_fingerprint') or ''
  if path:
    if image_folder is None or os.path.abspath(image_folder) != path:
      raise ValueError(f'{workdir} records its image folder by path ({path}), not by content: if '
                       f'that data is now elsewhere, run {command(workdir)} first')
  elif sizes and image_folder is not None:
    _holds_sizes(image_folder, imagefolder.scan_image_folder(image_folder), sizes, workdir)
  elif (recorded.startswith(imagefolder.CONTENT_PREFIX) and image_folder is not None and
        recorded != fingerprint):
    raise ValueError(f'{image_folder} no longer holds the data {workdir} was started on (content '
                     f'fingerprint {fingerprint}, the study recorded {recorded}): an image was '
                     'added, removed, renamed or changed since; restore the data, or use a new '
                     '--workdir')
  else:
    return False
  if write:
    files.write_json(os.path.join(workdir, STUDY), migrated(record, fingerprint))
  return True


def refuse_legacy(workdirs: Sequence[str]) -> None:
  """Pooling reads identities: a shard that names its data by path must be migrated first, and
  so must one of names and sizes pooled with one of today's content fingerprint (shards all of
  names and sizes pool as they are)."""
  records = [_read(workdir) or {} for workdir in workdirs]
  for workdir, record in zip(workdirs, records):
    path = legacy_path(record)
    if path:
      raise ValueError(f'{workdir} records its image folder by path ({path}), not by content: '
                       f'run {command(workdir)} first')
  content = [
      w for w, r in zip(workdirs, records)
      if str(r.get('config', {}).get('data_fingerprint', '')).startswith(imagefolder.CONTENT_PREFIX)
  ]
  for workdir, record in zip(workdirs, records):
    if content and sizes_kind(record):
      raise ValueError(f'{workdir} names its data by names and sizes ({sizes_kind(record)}), '
                       f'{content[0]} by the bytes of its images: run {command(workdir)} first')


def adopt_model(workdir: str, config: config_lib.StudyConfig, write: bool = True) -> bool:
  """Before a study of a model of your own resumes in `workdir`: a record of that model written
  before model sources were digested adopts its source's digest (one log line; nothing to
  compare it with); one whose model source changed since is refused in one line naming the file.
  True if migrated."""
  record = _read(workdir) or {}
  recorded = record.get('config', {})
  if not config.model_sha256 or recorded.get('model') != config.model:
    return False  # a built-in net, or another study (`Workdir.check` names the difference)
  before = recorded.get('model_sha256', '')
  if before == config.model_sha256:
    return False
  from jaxtransfer.nets import modelspec  # flax: only for a model of your own
  source = modelspec.source_file(config.model) or config.model
  if before:
    raise ValueError(f'--model {config.model}: {source} changed since {workdir} was started (its '
                     f'sha256 is {config.model_sha256}, the study recorded {before}): restore '
                     'it, or use a new --workdir for the edited model')
  if not write:
    return True
  logging.warning('%s/%s recorded no digest of its model: adopting that of %s as it is now (%s)',
                  workdir, STUDY, source, config.model_sha256)
  config_now = {**recorded, 'model_sha256': config.model_sha256}
  old = {}
  if 'config_hash' in record:
    old['config_hash_before_migration'] = record.get('config_hash_before_migration',
                                                     record['config_hash'])
  files.write_json(
      os.path.join(workdir, STUDY), {
          **record, 'config': config_now, 'config_hash': config_lib.config_hash(
              config_lib.with_defaults(config_now)), **old
      })
  return True
