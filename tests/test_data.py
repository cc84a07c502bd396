"""Loading with the array cache, channel statistics, import hygiene (no TFDS, no real data)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxtransfer.data import datasets, imagefolder
from jaxtransfer.data.types import DataError
from tests.conftest import N_TRAIN, SIZE

# ----------------------------------------------------------------------------
# Loading and caching.


def test_unknown_split_and_dataset(tree):
  root, _ = tree
  with pytest.raises(DataError, match='validation'):
    datasets.load('validation', image_folder=str(root))
  with pytest.raises(DataError, match='mnist'):
    datasets.load('train', dataset='mnist')


def _cache_files(cache_dir):
  return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def test_second_load_comes_from_cache(tree, tmp_path, monkeypatch):
  root, _ = tree
  cache = tmp_path / 'cache'
  first = datasets.load('train', image_folder=str(root), cache_dir=str(cache))
  files = _cache_files(cache)
  assert len(files) == 1 and files[0].endswith('.npz') and 'train' in files[0]

  def no_decode(path):
    raise AssertionError(f'decoded {path} despite the cache')

  monkeypatch.setattr(imagefolder, 'decode_image', no_decode)
  second = datasets.load('train', image_folder=str(root), cache_dir=str(cache))
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.labels, first.labels)
  assert second.class_names == first.class_names
  assert second.labels.dtype == np.int32 and second.images.dtype == np.uint8


def test_cache_defaults_to_the_users_cache_not_the_data_dir(tree, tmp_path, monkeypatch):
  """As --cache_dir's help says: a data_dir may be a shared or read-only dataset folder."""
  root, _ = tree
  monkeypatch.setattr(datasets, 'DEFAULT_CACHE_DIR', str(tmp_path / 'home-cache'))
  datasets.load('train', image_folder=str(root), data_dir=str(tmp_path / 'tfds'))
  assert len(_cache_files(tmp_path / 'home-cache')) == 1
  assert not (tmp_path / 'tfds').exists()


def test_cache_invalidated_when_a_file_changes(tree, tmp_path):
  root, _ = tree
  cache = str(tmp_path / 'cache')
  first = datasets.load('train', image_folder=str(root), cache_dir=cache)
  changed = root / 'train' / 'ant' / '0000.png'
  st = os.stat(changed)
  Image.fromarray(np.full((SIZE, SIZE, 3), 42, np.uint8)).save(changed)
  os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  second = datasets.load('train', image_folder=str(root), cache_dir=cache)
  np.testing.assert_array_equal(second.images[0], 42)
  assert not np.array_equal(second.images[0], first.images[0])
  np.testing.assert_array_equal(second.images[1:], first.images[1:])


def test_failed_cache_write_leaves_no_file(tree, tmp_path, monkeypatch):
  root, _ = tree
  cache = tmp_path / 'cache'

  def half_write(f, **arrays):
    f.write(b'PK\x03\x04 half a zip')  # what a killed run would leave behind
    raise KeyboardInterrupt

  monkeypatch.setattr(np, 'savez', half_write)
  with pytest.raises(KeyboardInterrupt):
    datasets.load('train', image_folder=str(root), cache_dir=str(cache))
  assert _cache_files(cache) == []  # neither the final name nor a tmp file
  monkeypatch.undo()
  ds = datasets.load('train', image_folder=str(root), cache_dir=str(cache))
  assert len(ds) == 3 * N_TRAIN and len(_cache_files(cache)) == 1


def test_corrupt_cache_is_rebuilt(tree, tmp_path):
  root, _ = tree
  cache = tmp_path / 'cache'
  first = datasets.load('test', image_folder=str(root), cache_dir=str(cache))
  (path,) = cache.iterdir()
  path.write_bytes(path.read_bytes()[:100])
  second = datasets.load('test', image_folder=str(root), cache_dir=str(cache))
  np.testing.assert_array_equal(second.images, first.images)


def test_bad_image_writes_no_cache(tree, tmp_path):
  root, _ = tree
  cache = tmp_path / 'cache'
  (root / 'train' / 'ant' / '0001.png').write_bytes(b'junk')
  with pytest.raises(DataError):
    datasets.load('train', image_folder=str(root), cache_dir=str(cache))
  assert _cache_files(cache) == []


# ----------------------------------------------------------------------------
# channel_stats, ArrayDataset, import hygiene.


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_channel_stats_matches_numpy(dtype):
  rng = np.random.default_rng(1)
  images = (rng.integers(0, 256, (37, 5, 6, 3)) * [1.0, 0.5, 0.2]).astype(dtype)
  mean, std = datasets.channel_stats(images, chunk_size=4)  # several uneven chunks
  expected = images.astype(np.float64) / 255.0
  assert mean.dtype == np.float32 and std.dtype == np.float32
  np.testing.assert_allclose(mean, expected.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, expected.std(axis=(0, 1, 2)), rtol=1e-6)


def test_import_does_not_load_tensorflow():
  code = ('import jaxtransfer.data.datasets, sys; '
          "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, '-c', code], check=True)


def _tamper(path, digest: bool, **arrays) -> None:
  """Rewrite a cache file with some arrays replaced (a valid npz); `digest`: with the digest of
  the new arrays, as a tool that knew the format would write it."""
  with np.load(path) as npz:
    content = {k: npz[k] for k in npz.files}
  content.update(arrays)
  if digest:
    content['digest'] = np.array(
        datasets._digest(
            datasets.ArrayDataset(content['images'], content['labels'],
                                  tuple(str(n) for n in content['class_names']))))
  with open(path, 'wb') as f:
    np.savez(f, **content)


@pytest.mark.parametrize('change, digest, problem', [
    ('shuffle', True, "labels are not the folder's: the same counts per class, in another order"),
    ('names', True, 'class names'),
    ('range', True, 'outside the 3 classes'),
    ('images', False, 'do not match the digest'),
])
def test_a_bad_cache_is_rebuilt_not_trusted(tree, tmp_path, caplog, change, digest, problem):
  """A valid npz whose labels are shuffled or out of range, whose class names are swapped or
  whose pixels changed is rebuilt with one log line naming the file and the problem."""
  root, _ = tree
  cache = tmp_path / 'cache'
  first = datasets.load('train', image_folder=str(root), cache_dir=str(cache))
  (path,) = cache.iterdir()
  arrays = {
      'shuffle': {'labels': first.labels[::-1].copy()},
      'names': {'class_names': np.array(first.class_names[::-1], dtype=str)},
      'range': {'labels': np.where(first.labels == 2, 3, first.labels).astype(np.int32)},
      'images': {'images': 255 - first.images},
  }[change]
  _tamper(path, digest, **arrays)
  with caplog.at_level(logging.WARNING):
    second = datasets.load('train', image_folder=str(root), cache_dir=str(cache))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and str(path) in warnings[0] and problem in warnings[0], warnings
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.labels, first.labels)
  assert second.class_names == first.class_names
  caplog.clear()
  third = datasets.load('train', image_folder=str(root), cache_dir=str(cache))  # rebuilt: trusted
  assert not caplog.records and np.array_equal(third.labels, first.labels)


def test_a_same_size_edit_with_its_mtime_restored_is_seen(tree, tmp_path):
  """cp -p and rsync restore mtimes: the cache follows the bytes, not the (size, mtime)."""
  root, _ = tree
  cache = str(tmp_path / 'cache')
  changed = root / 'train' / 'ant' / '0000.png'
  Image.fromarray(np.full((SIZE, SIZE, 3), 7, np.uint8)).save(changed, compress_level=0)
  first = datasets.load('train', image_folder=str(root), cache_dir=cache)
  st = os.stat(changed)
  Image.fromarray(np.full((SIZE, SIZE, 3), 42, np.uint8)).save(changed, compress_level=0)
  os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.stat(changed).st_size == st.st_size
  second = datasets.load('train', image_folder=str(root), cache_dir=cache)
  np.testing.assert_array_equal(first.images[0], 7)
  np.testing.assert_array_equal(second.images[0], 42)
