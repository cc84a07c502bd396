"""Image-folder trees decoded with PIL alone.

An image folder is `root/{train,test}/<class>/*.{png,jpg,jpeg}`: no TensorFlow, no TFDS, so
any machine can train from a plain tree. `datasets.load(image_folder=...)` loads one split of
it (scan, decode, cache); this module lists, checks, decodes and identifies the tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from jaxtransfer.data.types import CACHE_FORMAT, ArrayDataset, DataError, fingerprint

SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Below this many images, spawning decode workers costs more than it saves.
_MIN_IMAGES_PER_WORKER = 4096

# ----------------------------------------------------------------------------
# Image folders.


def scan_image_folder(root: str | os.PathLike) -> dict[str, list[tuple[str, int]]]:
  """Lists `{'train': [(path, label), ...], 'test': [...]}` of an image tree.

  Classes are the sorted class folder names, which must be identical in train
  and test: a class missing from one split would silently shift every label.
  Paths are sorted within a class, so the order (and any cache) is stable.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(f'image folder {root} does not exist or is not a directory')
  class_names = {}
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise DataError(f'missing split folder {split_dir}')
    class_names[split] = sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))
    if not class_names[split]:
      raise DataError(f'no class folders in {split_dir}')
  train, test = set(class_names['train']), set(class_names['test'])
  if train != test:
    raise DataError(f'class folders differ between {os.path.join(root, "train")} and '
                    f'{os.path.join(root, "test")}: only in train: {sorted(train - test)}, '
                    f'only in test: {sorted(test - train)}')
  result = {}
  for split in SPLITS:
    items = []
    for label, name in enumerate(class_names[split]):
      class_dir = os.path.join(root, split, name)
      images = [
          e for e in os.scandir(class_dir)
          if not e.name.startswith('.') and e.name.lower().endswith(IMAGE_EXTENSIONS)
      ]
      broken = sorted(e.path for e in images if e.is_symlink() and not os.path.exists(e.path))
      if broken:  # skipping it would silently train on fewer images
        raise DataError(f'image {broken[0]} is a symbolic link to {os.readlink(broken[0])}, '
                        'which does not exist')
      files = sorted(e.name for e in images if e.is_file())
      if not files:
        raise DataError(f'no .png/.jpg/.jpeg images in {class_dir}')
      items.extend((os.path.join(class_dir, f), label) for f in files)
    result[split] = items
  return result


def folder_class_names(splits: dict[str, list[tuple[str, int]]]) -> tuple[str, ...]:
  """Class names of a `scan_image_folder` result, indexed by label.

  Read back from the class folder of each file, so the scan stays the one
  place that lists and validates a folder.
  """
  names = {label: os.path.basename(os.path.dirname(path)) for path, label in splits['train']}
  return tuple(names[label] for label in range(len(names)))


def decode_image(path: str) -> np.ndarray:
  """Decodes one image file to a uint8 RGB [H, W, 3] array with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path, formats=('PNG', 'JPEG')) as image:
      image.load()
      if image.mode != 'RGB':
        image = image.convert('RGB')
      return np.asarray(image, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot decode image {path}: {e}') from e


def check_image_shape(image: np.ndarray, shape: Sequence[int], path: str, first: str) -> None:
  """Refuses an image whose H x W x C differs from the dataset's first image (`first`, of
  `shape`). Both are named: either may be the odd one."""
  if image.shape != tuple(shape):
    raise DataError(f'image {path} has shape {image.shape}, but the first image {first} has '
                    f'{tuple(shape)}: every image of a dataset needs one shape; resize the odd '
                    'one(s)')


def _decode_serial(paths: Sequence[str], shape: Sequence[int], first: str) -> np.ndarray:
  out = np.empty((len(paths), *shape), np.uint8)
  for i, path in enumerate(paths):
    image = decode_image(path)
    check_image_shape(image, shape, path, first)
    out[i] = image
  return out


def _decode_worker(job_path: str, out_path: str) -> None:
  """Entry point of a decode subprocess: a JSON job in, a .npy file out.

  A DataError exits with status 3 and its one-line message on stderr.
  """
  with open(job_path) as f:
    job = json.load(f)
  try:
    images = _decode_serial(job['paths'], job['shape'], job['first'])
  except DataError as e:
    sys.stderr.write(str(e))
    sys.exit(3)
  np.save(out_path, images)


_WORKER_CODE = ('import sys; from jaxtransfer.data.imagefolder import _decode_worker; '
                '_decode_worker(sys.argv[1], sys.argv[2])')


def _decode_parallel(paths: Sequence[str], shape: Sequence[int],
                     num_workers: int) -> np.ndarray | None:
  """Decodes in fresh `python -c` subprocesses; None if they failed to run.

  PIL decoding holds the GIL, so threads do not help. Subprocesses (not a
  fork/spawn multiprocessing pool) are safe after JAX has started its threads
  and never re-import the caller's `__main__`.
  """
  env = dict(os.environ)
  package_parent = str(pathlib.Path(__file__).resolve().parents[2])  # holds jaxtransfer/
  env['PYTHONPATH'] = os.pathsep.join(p for p in (package_parent, env.get('PYTHONPATH')) if p)
  chunks = np.array_split(np.arange(len(paths)), num_workers)
  with tempfile.TemporaryDirectory(prefix='jaxtransfer-decode-') as tmp:
    procs = []
    try:
      for w, chunk in enumerate(chunks):
        job_path = os.path.join(tmp, f'{w}.json')
        with open(job_path, 'w') as f:
          json.dump({'paths': [paths[i] for i in chunk], 'shape': list(shape), 'first': paths[0]},
                    f)
        procs.append(
            subprocess.Popen(
                [sys.executable, '-c', _WORKER_CODE, job_path,
                 os.path.join(tmp, f'{w}.npy')],
                stderr=subprocess.PIPE,
                env=env,
                text=True,
            ))
      errors = [p.communicate()[1] for p in procs]
    finally:  # e.g. KeyboardInterrupt: leave no orphan decoding on
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    results = [(p.returncode, err) for p, err in zip(procs, errors)]
    for code, err in results:
      if code == 3:
        raise DataError(err)
    if any(code != 0 for code, _ in results):
      logging.warning('Decode workers failed, decoding in-process: %s',
                      next(err for code, err in results if code).strip()[-500:])
      return None
    out = np.empty((len(paths), *shape), np.uint8)
    for w, chunk in enumerate(chunks):
      if len(chunk):
        out[chunk[0]:chunk[-1] + 1] = np.load(os.path.join(tmp, f'{w}.npy'))
    return out


def _decode_images(paths: Sequence[str], num_workers: int | None) -> np.ndarray:
  """Decodes all images; every one must have the first image's shape."""
  shape = decode_image(paths[0]).shape
  if num_workers is None:
    num_workers = min(os.cpu_count() or 1, 8)
  num_workers = min(num_workers, len(paths) // _MIN_IMAGES_PER_WORKER)
  if num_workers > 1:
    images = _decode_parallel(paths, shape, num_workers)
    if images is not None:
      return images
  return _decode_serial(paths, shape, paths[0])


def folder_split(
    splits: dict[str, list[tuple[str, int]]],
    split: str,
    class_names: tuple[str, ...],
    num_workers: int | None,
) -> ArrayDataset:
  """One split of a `scan_image_folder` result, decoded with PIL + numpy (no TFDS).

  Every image must decode and have the H x W x C of the first one; grey or RGBA images are
  converted to RGB. Large folders are decoded by `num_workers` subprocesses (None: one per CPU,
  at most 8).
  """
  items = splits[split]
  return ArrayDataset(
      images=_decode_images([p for p, _ in items], num_workers),
      labels=np.array([label for _, label in items], np.int32),
      class_names=class_names,
  )


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f'unknown split {split!r}, expected one of {SPLITS}')


def content_fingerprint(splits: dict[str, list[tuple[str, int]]]) -> str:
  """Identity of an image tree's content wherever it lies: sha256 over the class names and every
  image's path relative to the tree ('train/<class>/<file>') with its size in bytes.

  Not the root's location nor mtimes (unlike `folder_fingerprint`, the cache key), so a copy,
  extraction or mount elsewhere is the same data: a study names its data by this."""
  h = hashlib.sha256(
      json.dumps({
          'kind': 'image_folder_content', 'version': 1, 'classes': list(folder_class_names(splits))
      }).encode())
  for split in SPLITS:
    for path, _ in splits[split]:
      relative = '/'.join((split, os.path.basename(os.path.dirname(path)), os.path.basename(path)))
      h.update(f'\0{relative}\0{os.stat(path).st_size}'.encode())
  return h.hexdigest()


def identify(root: str | os.PathLike) -> tuple[str, tuple[int, ...]]:
  """(content fingerprint, H x W x C of the first image) of an image tree: what a study needs to
  know of its data before decoding it all (its identity, and the input shape of its model)."""
  splits = scan_image_folder(root)
  return content_fingerprint(splits), decode_image(splits['train'][0][0]).shape


def folder_fingerprint(root: str, splits: dict[str, list[tuple[str, int]]]) -> str:
  """Identity of an image tree: resolved root + file names, sizes and mtimes."""
  resolved = str(pathlib.Path(root).resolve())
  files = sorted(p for split in SPLITS for p, _ in splits[split])
  return fingerprint(
      {'format': CACHE_FORMAT, 'kind': 'image_folder', 'root': resolved},
      files,
      root,
  )
