"""Datasets as in-memory uint8 arrays, cached; their statistics and normalisation.

Two sources give the same `types.ArrayDataset`:

* an image folder `root/{train,test}/<class>/*.{png,jpg,jpeg}` (`imagefolder`), decoded with PIL
  alone (no TensorFlow, no TFDS);
* a TFDS builder of our own (`jaxtransfer.data.cifar_builder`) that prepares the
  official CIFAR archive as array_record and is read with `as_data_source`.

Either way the decoded arrays are cached as one uncompressed `.npz` per split,
keyed by a fingerprint of the source (an image folder's by the bytes of its images), so every
later run starts in a few seconds. A cache is never trusted blindly: its class names, labels
and the digest of its arrays written with it are checked on every read, and one that fails is
rebuilt. This module never imports TensorFlow or TFDS at import time: TFDS is only
imported inside the functions that use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtransfer.config import DEFAULT_CACHE_DIR, TFDS_NAMES
from jaxtransfer import files
from jaxtransfer.data import cifar, imagefolder, types
from jaxtransfer.data.types import ArrayDataset, DataError

# Examples fetched per `__getitems__` call when reading a TFDS data source.
_READ_CHUNK = 2048


class Expected(NamedTuple):
  """What a split read from the cache must be, known without decoding it: its class names and,
  for an image folder, every image's label (the scan's, so the per-class counts too)."""

  class_names: tuple[str, ...]
  labels: np.ndarray | None = None


def _digest(ds: ArrayDataset) -> str:
  """sha256 of a dataset's arrays (dtype, shape, bytes) and class names, stored in its cache."""
  h = hashlib.sha256(json.dumps(ds.class_names).encode())
  for x in (ds.images, ds.labels):
    x = np.ascontiguousarray(x)
    h.update(f'\0{x.dtype.str}{x.shape}\0'.encode())
    h.update(memoryview(x).cast('B'))
  return h.hexdigest()


def _cache_problem(npz, ds: ArrayDataset, key: str, expected: Expected) -> str | None:
  """Why a cached dataset cannot be used (None if it can)."""
  if str(npz['key']) != key:
    return f'it holds the arrays of another source ({str(npz["key"])[:20]}...)'
  if ds.class_names != expected.class_names:
    return f'its class names {list(ds.class_names)} are not the data\'s {list(expected.class_names)}'
  if len(ds) and (ds.labels.min() < 0 or ds.labels.max() >= len(ds.class_names)):
    return (f'its labels span {ds.labels.min()}..{ds.labels.max()}, outside the '
            f'{len(ds.class_names)} classes')
  if expected.labels is not None and not np.array_equal(ds.labels, expected.labels):
    if len(ds) != len(expected.labels):
      return f'it holds {len(ds)} images, the folder {len(expected.labels)}'
    count = lambda y: np.bincount(y, minlength=len(ds.class_names)).tolist()
    if count(ds.labels) != count(expected.labels):
      return (f'its labels are not the folder\'s: images per class {count(ds.labels)}, the '
              f'folder has {count(expected.labels)}')
    return 'its labels are not the folder\'s: the same counts per class, in another order'
  if str(npz['digest']) != _digest(ds):
    return 'its arrays do not match the digest written with them (changed since)'
  return None


def _read_cache(path: str, key: str, expected: Expected) -> ArrayDataset | None:
  """The cached dataset, or None if absent or not to be trusted (then rebuilt, with one log
  line): every check of `_cache_problem`, the arrays' digest last."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as npz:
      ds = ArrayDataset(
          images=npz['images'],
          labels=npz['labels'],
          class_names=tuple(str(n) for n in npz['class_names']),
      )
      problem = _cache_problem(npz, ds, key, expected)
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    problem = f'unreadable ({types.DataError(str(e))})'
  if problem:
    logging.warning('Rebuilding the cache %s: %s', path, problem)
    return None
  return ds


def _write_cache(path: str, ds: ArrayDataset, key: str) -> None:
  """Writes the cache atomically (a killed run leaves no file at `path`), with its source's key
  and the digest of its arrays, which every read checks."""
  with files.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.savez(f, images=ds.images, labels=ds.labels,
               class_names=np.array(ds.class_names,
                                    dtype=str), key=np.array(key), digest=np.array(_digest(ds)))


def _cached(cache_dir: str, name: str, split: str, key: str, expected: Expected,
            build: Callable[[], ArrayDataset]) -> ArrayDataset:
  path = _cache_file(cache_dir, name, split, key)
  ds = _read_cache(path, key, expected)
  if ds is None:
    ds = build()
    _write_cache(path, ds, key)
  return ds


def _cache_file(cache_dir: str, name: str, split: str, fingerprint: str) -> str:
  return os.path.join(os.path.expanduser(cache_dir), f'{name}-{split}-{fingerprint[:20]}.npz')


# ----------------------------------------------------------------------------
# TFDS.


def _default_tfds_data_dir() -> str:
  # Same default as TFDS, resolved here so that the cache key needs no TFDS.
  return os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'


def _read_chunk(source: Sequence[Any], indices: list[int]) -> list[Any]:
  """Fetches examples by index list: TFDS data sources do not slice."""
  return source.__getitems__(indices)


def data_source_to_arrays(source: Sequence[Any], class_names: Sequence[str]) -> ArrayDataset:
  """Reads a TFDS data source of {'image', 'label'} examples into numpy."""
  n = len(source)
  images = labels = None
  for start in range(0, n, _READ_CHUNK):
    examples = _read_chunk(source, list(range(start, min(start + _READ_CHUNK, n))))
    if images is None:
      first = np.asarray(examples[0]['image'])
      images = np.empty((n, *first.shape), np.uint8)
      labels = np.empty((n,), np.int32)
    for i, ex in enumerate(examples, start):
      images[i] = ex['image']
      labels[i] = ex['label']
  if images is None:
    raise DataError(f'data source {source} is empty')
  return ArrayDataset(images=images, labels=labels, class_names=tuple(class_names))


def _load_tfds(dataset: str, config: str, split: str, data_dir: str,
               manual_dir: str | None) -> ArrayDataset:
  from jaxtransfer.data import cifar_builder  # pylint: disable=g-import-not-at-top

  builder = cifar_builder.prepare(dataset, config=config, data_dir=data_dir, manual_dir=manual_dir)
  return data_source_to_arrays(builder.as_data_source(split=split),
                               builder.info.features['label'].names)


def load(
    split: str,
    *,
    dataset: str = 'cifar10',
    image_folder: str | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    cache_dir: str | None = None,
) -> ArrayDataset:
  """Loads one split as numpy arrays, decoding only on the first call.

  With `image_folder`, the tree is decoded with PIL (no TFDS). Otherwise our
  TFDS builder prepares `dataset` into `data_dir`: from the archive in
  `manual_dir` if given, else downloaded. The arrays are cached in `cache_dir`
  (default: ~/.cache/jaxtransfer, as the compiled programs; never `data_dir`, which
  may be a shared or read-only dataset folder) under a fingerprint of the source
  (the data_dir included), so edits to the folder or a new builder version rebuild
  the cache.
  """
  imagefolder.check_split(split)
  cache_dir = cache_dir or DEFAULT_CACHE_DIR
  if image_folder is not None:
    splits = imagefolder.scan_image_folder(os.fspath(image_folder))
    class_names = imagefolder.folder_class_names(splits)
    key = types.fingerprint({
        'format': types.CACHE_FORMAT,
        'kind': 'image_folder',
        'content': imagefolder.content_fingerprint(splits),
    })
    expected = Expected(class_names, np.array([label for _, label in splits[split]], np.int32))
    return _cached(cache_dir, 'image_folder', split, key, expected,
                   lambda: imagefolder.folder_split(splits, split, class_names, num_workers=None))
  if dataset not in TFDS_NAMES:
    raise DataError(f'unknown dataset {dataset!r}, expected one of '
                    f'{sorted(TFDS_NAMES)} or an image_folder')
  config = 'download' if manual_dir is None else 'manual'
  data_dir = os.path.abspath(os.path.expanduser(data_dir or _default_tfds_data_dir()))
  key = types.fingerprint({
      'format': types.CACHE_FORMAT,
      'kind': 'tfds',
      'name': TFDS_NAMES[dataset],
      'config': config,
      'version': cifar.BUILDER_VERSION,
      'data_dir': data_dir,
  })
  return _cached(cache_dir, TFDS_NAMES[dataset], split, key,
                 Expected(cifar.ARCHIVES[dataset].class_names),
                 lambda: _load_tfds(dataset, config, split, data_dir, manual_dir))


# ----------------------------------------------------------------------------
# Statistics.


def channel_stats(images: np.ndarray, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of images/255 over all pixels, as float32.

  Works through `chunk_size` images at a time, so no float copy of the whole
  dataset is ever made. uint8 images are reduced to per-channel value
  histograms (exact integer counts, ~10x faster); other dtypes accumulate
  sums and sums of squares in float64.
  """
  images = np.asarray(images)
  channels = images.shape[-1]
  flat = images.reshape(-1, channels)
  n = len(flat)
  if n == 0:
    raise DataError('channel_stats of an empty image array')
  step = chunk_size * int(np.prod(images.shape[1:-1], dtype=np.int64))
  if images.dtype == np.uint8:
    counts = np.zeros((channels, 256), np.int64)
    for start in range(0, n, step):
      chunk = flat[start:start + step]
      for c in range(channels):
        counts[c] += np.bincount(chunk[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = counts @ values / n
    var = counts @ values**2 / n - mean**2
  else:
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    for start in range(0, n, step):
      chunk = flat[start:start + step].astype(np.float64) / 255.0
      total += chunk.sum(axis=0)
      total_sq += np.einsum('ij,ij->j', chunk, chunk)
    mean = total / n
    var = total_sq / n - mean**2
  std = np.sqrt(np.maximum(var, 0.0))
  return mean.astype(np.float32), std.astype(np.float32)


def normalize(images_u8: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 images -> float32, per channel (x / 255 - mean) / std."""
  return (jnp.asarray(images_u8).astype(jnp.float32) / 255.0 - mean) / std
