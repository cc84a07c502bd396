"""Datasets as in-memory uint8 arrays, cached; their statistics and normalisation.

Two sources give the same `types.ArrayDataset`:

* an image folder `root/{train,test}/<class>/*.{png,jpg,jpeg}` (`imagefolder`), decoded with PIL
  alone (no TensorFlow, no TFDS);
* a TFDS builder of our own (`jaxtransfer.data.cifar_builder`) that prepares the
  official CIFAR archive as array_record and is read with `as_data_source`.

Either way the decoded arrays are cached as one uncompressed `.npz` per split,
keyed by a fingerprint of the source, so every later run starts in well under
2 s. This module never imports TensorFlow or TFDS at import time: TFDS is only
imported inside the functions that use it.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtransfer.config import DEFAULT_CACHE_DIR, TFDS_NAMES
from jaxtransfer import files
from jaxtransfer.data import cifar, imagefolder, types
from jaxtransfer.data.types import ArrayDataset, DataError

# Examples fetched per `__getitems__` call when reading a TFDS data source.
_READ_CHUNK = 2048


def _read_cache(path: str) -> ArrayDataset | None:
  """The cached dataset, or None if absent or unreadable (then rebuilt)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as npz:
      return ArrayDataset(
          images=npz['images'],
          labels=npz['labels'],
          class_names=tuple(str(n) for n in npz['class_names']),
      )
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('Ignoring unreadable cache %s: %s', path, e)
    return None


def _write_cache(path: str, ds: ArrayDataset) -> None:
  """Writes the cache atomically: a killed run leaves no file at `path`."""
  with files.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.savez(f, images=ds.images, labels=ds.labels,
               class_names=np.array(ds.class_names, dtype=str))


def _cached(path: str, build: Callable[[], ArrayDataset]) -> ArrayDataset:
  ds = _read_cache(path)
  if ds is None:
    ds = build()
    _write_cache(path, ds)
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
    root = os.fspath(image_folder)
    splits = imagefolder.scan_image_folder(root)
    path = _cache_file(cache_dir, 'image_folder', split,
                       imagefolder.folder_fingerprint(root, splits))
    return _cached(
        path, lambda: imagefolder.folder_split(splits, split, imagefolder.folder_class_names(
            splits), num_workers=None))
  if dataset not in TFDS_NAMES:
    raise DataError(f'unknown dataset {dataset!r}, expected one of '
                    f'{sorted(TFDS_NAMES)} or an image_folder')
  config = 'download' if manual_dir is None else 'manual'
  data_dir = os.path.abspath(os.path.expanduser(data_dir or _default_tfds_data_dir()))
  fingerprint = types.fingerprint({
      'format': types.CACHE_FORMAT,
      'kind': 'tfds',
      'name': TFDS_NAMES[dataset],
      'config': config,
      'version': cifar.BUILDER_VERSION,
      'data_dir': data_dir,
  })
  path = _cache_file(cache_dir, TFDS_NAMES[dataset], split, fingerprint)
  return _cached(path, lambda: _load_tfds(dataset, config, split, data_dir, manual_dir))


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
