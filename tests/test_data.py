"""Loading with the array cache, channel statistics, import hygiene (no TFDS, no real data)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxtransfer.data import datasets, imagefolder
from tests.conftest import N_TRAIN, SIZE

# ----------------------------------------------------------------------------
# Loading and caching.


def test_unknown_split_and_dataset(tree):
  root, _ = tree
  with pytest.raises(imagefolder.DataError, match='validation'):
    datasets.load('validation', image_folder=str(root))
  with pytest.raises(imagefolder.DataError, match='mnist'):
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
  with pytest.raises(imagefolder.DataError):
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
