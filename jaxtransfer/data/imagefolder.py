"""Image-folder trees decoded with PIL alone.

An image folder is `root/{train,test}/<class>/*.{png,jpg,jpeg}`: no TensorFlow, no TFDS, so
any machine can train from a plain tree. `datasets.load(image_folder=...)` loads one split of
it (scan, decode, cache); this module lists, checks, decodes and identifies the tree.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from jaxtransfer.data.types import ArrayDataset, DataError

SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Below this many images, spawning decode workers costs more than it saves.
_MIN_IMAGES_PER_WORKER = 4096
# Decoding a large folder takes a while: a line at most this often on the progress logger, which
# nothing shows unless a caller attaches a handler (the study driver shows it with its progress).
PROGRESS_SECONDS = 10.0
PROGRESS_LOGGER = 'jaxtransfer.progress'
_progress = logging.getLogger(PROGRESS_LOGGER)
_progress.propagate = False  # not the warnings' way: only where the caller asks for it
_COUNT_EVERY = 256  # a worker writes how many images it decoded this often

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


# PIL modes of one 16-bit (or wider) integer channel: PNG greyscale of 16 bits opens as one of
# these, and PIL's conversion to RGB clips it at 255 (a 16-bit image would turn almost white).
# PIL itself keeps the high byte of 16-bit RGB(A) and grey + alpha PNGs.
_WIDE_GREY_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def _wide_grey_to_rgb(values: np.ndarray, mode: str, path: str) -> np.ndarray:
  """A 16-bit grey image as 8-bit RGB: its high byte (value >> 8), as PIL reads 16-bit RGB."""
  if values.size and (values.min() < 0 or values.max() > 0xFFFF):
    raise DataError(f'image {path} has {mode} pixel values in {values.min()}..{values.max()}, '
                    'outside the 16-bit range 0..65535 that can be scaled to 8 bits: save it '
                    'with 8 or 16 bits per channel')
  grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def decode_image(path: str) -> np.ndarray:
  """Decodes one image file to a uint8 RGB [H, W, 3] array with PIL; 16 bits per channel are
  scaled to 8 (the high byte), never clipped."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path, formats=('PNG', 'JPEG')) as image:
      image.load()
      if image.mode in _WIDE_GREY_MODES:
        return _wide_grey_to_rgb(np.asarray(image), image.mode, path)
      if image.mode != 'RGB':
        image = image.convert('RGB')
      return np.asarray(image, dtype=np.uint8)
  except DataError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot decode image {path}: {e}') from e


def check_image_shape(image: np.ndarray, shape: Sequence[int], path: str, first: str) -> None:
  """Refuses an image whose H x W x C differs from the dataset's first image (`first`, of
  `shape`). Both are named: either may be the odd one."""
  if image.shape != tuple(shape):
    raise DataError(f'image {path} has shape {image.shape}, but the first image {first} has '
                    f'{tuple(shape)}: every image of a dataset needs one shape; resize the odd '
                    'one(s)')


class _Ticker:
  """Says how far decoding is, at most every PROGRESS_SECONDS (nothing for a quick decode)."""
  def __init__(self, total: int, what: str):
    self.total, self.what = total, what
    self.start = self.said = time.monotonic()

  def __call__(self, done: int) -> None:
    now = time.monotonic()
    if now - self.said >= PROGRESS_SECONDS and done < self.total:
      self.said = now
      _progress.info('decoding %s: %s of %s images (%d%%), %.0f s', self.what, f'{done:,}',
                     f'{self.total:,}', 100 * done // max(self.total, 1), now - self.start)


def _decode_serial(paths: Sequence[str], shape: Sequence[int], first: str, tick=None) -> np.ndarray:
  out = np.empty((len(paths), *shape), np.uint8)
  for i, path in enumerate(paths):
    image = decode_image(path)
    check_image_shape(image, shape, path, first)
    out[i] = image
    if tick is not None and i % _COUNT_EVERY == _COUNT_EVERY - 1:
      tick(i + 1)
  return out


def _write_count(path: str, count: int) -> None:
  """A worker's count of decoded images, for the parent's progress (renamed into place)."""
  with open(path + '.tmp', 'w') as f:
    f.write(str(count))
  os.replace(path + '.tmp', path)


def _read_count(path: str) -> int:
  try:
    with open(path) as f:
      return int(f.read() or 0)
  except (OSError, ValueError):
    return 0


def _decode_worker(job_path: str, out_path: str) -> None:
  """Entry point of a decode subprocess: a JSON job in, a .npy file out.

  A DataError exits with status 3 and its one-line message on stderr.
  """
  with open(job_path) as f:
    job = json.load(f)
  try:
    images = _decode_serial(job['paths'], job['shape'], job['first'],
                            lambda n: _write_count(out_path + '.count', n))
  except DataError as e:
    sys.stderr.write(str(e))
    sys.exit(3)
  np.save(out_path, images)


_WORKER_CODE = ('import sys; from jaxtransfer.data.imagefolder import _decode_worker; '
                '_decode_worker(sys.argv[1], sys.argv[2])')


def _decode_parallel(paths: Sequence[str], shape: Sequence[int], num_workers: int,
                     tick=None) -> np.ndarray | None:
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
        with open(os.path.join(tmp, f'{w}.err'), 'w') as err:  # a file: no pipe to fill
          procs.append(
              subprocess.Popen(
                  [sys.executable, '-c', _WORKER_CODE, job_path,
                   os.path.join(tmp, f'{w}.npy')],
                  stderr=err,
                  env=env,
                  text=True,
              ))
      while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        if tick is not None:
          tick(sum(_read_count(os.path.join(tmp, f'{w}.npy.count')) for w in range(len(procs))))
      errors = []
      for w in range(len(procs)):
        with open(os.path.join(tmp, f'{w}.err')) as f:
          errors.append(f.read())
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


def _decode_images(paths: Sequence[str], num_workers: int | None, what: str = '') -> np.ndarray:
  """Decodes all images; every one must have the first image's shape. How far it is goes to the
  progress logger (`PROGRESS_LOGGER`) every PROGRESS_SECONDS."""
  shape = decode_image(paths[0]).shape
  if num_workers is None:
    num_workers = min(os.cpu_count() or 1, 8)
  num_workers = min(num_workers, len(paths) // _MIN_IMAGES_PER_WORKER)
  tick = _Ticker(len(paths), what or 'images')
  if num_workers > 1:
    images = _decode_parallel(paths, shape, num_workers, tick)
    if images is not None:
      return images
  return _decode_serial(paths, shape, paths[0], tick)


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
      images=_decode_images([p for p, _ in items], num_workers, f'the {split} split'),
      labels=np.array([label for _, label in items], np.int32),
      class_names=class_names,
  )


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f'unknown split {split!r}, expected one of {SPLITS}')


# A content fingerprint of today's kind starts with this; the earlier kind (`sizes_fingerprint`,
# names and sizes only) is a bare sha256, and the records naming one are migrated
# (`study.migrate`).
CONTENT_PREFIX = 'v2:'
# Threads hashing image files: reading and sha256 release the GIL, and most of the time of a small
# file is the system calls, which overlap across threads even on few cores.
_HASH_THREADS = 16
_HASH_CHUNK = 256  # files per task
_fingerprints: dict[str, str] = {}  # stat signature of a tree -> its content fingerprint


def _relative(split: str, path: str) -> str:
  return '/'.join((split, os.path.basename(os.path.dirname(path)), os.path.basename(path)))


def _file_digests(paths: Sequence[str]) -> list[bytes]:
  out = []
  for path in paths:
    with open(path, 'rb') as f:
      out.append(hashlib.file_digest(f, 'sha256').digest())
  return out


def content_fingerprint(splits: dict[str, list[tuple[str, int]]]) -> str:
  """Identity of an image tree's content wherever it lies: 'v2:' + sha256 over the class names
  and, for every image, its path relative to the tree ('train/<class>/<file>'), its size and the
  sha256 of its bytes.

  Every byte is read (in threads), so an image replaced by another of the same size is other
  data; not the root's location nor mtimes, so a copy, extraction or mount elsewhere is the same
  data: a study names its data by this. Remembered within the process under every file's
  (size, mtime, ctime, inode): a file written since changes its ctime, which no copy tool
  restores, so a study's identity, cache and resume checks hash the tree once."""
  items = [(split, path) for split in SPLITS for path, _ in splits[split]]
  signature = hashlib.sha256()
  for _, path in items:
    st = os.stat(path)
    signature.update(f'\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}'
                     f'\0{st.st_dev}'.encode())
  key = signature.hexdigest()
  if key in _fingerprints:
    return _fingerprints[key]
  paths = [path for _, path in items]
  chunks = [paths[i:i + _HASH_CHUNK] for i in range(0, len(paths), _HASH_CHUNK)]
  try:
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
      digests = [d for chunk in pool.map(_file_digests, chunks) for d in chunk]
  except OSError as e:
    raise DataError(f'cannot read image {e.filename}: {e.strerror}') from None
  h = hashlib.sha256(
      json.dumps({
          'kind': 'image_folder_content', 'version': 2, 'classes': list(folder_class_names(splits))
      }).encode())
  for (split, path), digest in zip(items, digests):
    h.update(f'\0{_relative(split, path)}\0{os.stat(path).st_size}\0'.encode() + digest)
  _fingerprints[key] = CONTENT_PREFIX + h.hexdigest()
  return _fingerprints[key]


def is_sizes_fingerprint(fingerprint: str) -> bool:
  """Whether `fingerprint` is of the earlier kind (`sizes_fingerprint`): a bare sha256."""
  return len(fingerprint) == 64 and all(c in '0123456789abcdef' for c in fingerprint)


def sizes_fingerprint(splits: dict[str, list[tuple[str, int]]]) -> str:
  """The earlier kind of content fingerprint, which studies recorded before the bytes were
  hashed: sha256 over the class names and every image's relative path with its size in bytes.
  Blind to an image replaced by one of the same size: only `study.migrate` computes it, to
  recognise the data of such a record (and give it the `content_fingerprint`)."""
  h = hashlib.sha256(
      json.dumps({
          'kind': 'image_folder_content', 'version': 1, 'classes': list(folder_class_names(splits))
      }).encode())
  for split in SPLITS:
    for path, _ in splits[split]:
      h.update(f'\0{_relative(split, path)}\0{os.stat(path).st_size}'.encode())
  return h.hexdigest()


def identify(root: str | os.PathLike) -> tuple[str, tuple[int, ...]]:
  """(content fingerprint, H x W x C of the first image) of an image tree: what a study needs to
  know of its data before decoding it all (its identity, and the input shape of its model)."""
  splits = scan_image_folder(root)
  return content_fingerprint(splits), decode_image(splits['train'][0][0]).shape
