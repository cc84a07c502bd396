"""Tests of jaxtransfer.data on tiny generated image trees (no TFDS, no real data)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxtransfer import data

CLASSES = ('cat', 'ant', 'bee')  # deliberately not sorted on disk creation
N_TRAIN, N_TEST, SIZE = 3, 2, 8


def make_tree(root, classes=CLASSES, n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=0):
  """root/{train,test}/<class>/NNNN.{png,jpg}; returns {path: pixels} of the PNGs."""
  rng = np.random.default_rng(seed)
  pngs = {}
  for split, n in (('train', n_train), ('test', n_test)):
    for c in classes:
      os.makedirs(root / split / c)
      for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        ext = 'jpg' if i == n - 1 else 'png'  # mixed formats in one class
        path = str(root / split / c / f'{i:04d}.{ext}')
        Image.fromarray(pixels).save(path)
        if ext == 'png':
          pngs[path] = pixels
  return pngs


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / 'images'
  return root, make_tree(root)


def assert_one_line_naming(excinfo, name):
  message = str(excinfo.value)
  assert '\n' not in message
  assert str(name) in message, message


# ----------------------------------------------------------------------------
# scan_image_folder / load_image_folder.


def test_scan_lists_sorted_classes_and_files(tree):
  root, _ = tree
  splits = data.scan_image_folder(root)
  assert set(splits) == {'train', 'test'}
  assert len(splits['train']) == 3 * N_TRAIN and len(splits['test']) == 3 * N_TEST
  assert [label for _, label in splits['train']] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert os.path.basename(os.path.dirname(splits['train'][0][0])) == 'ant'
  assert data.folder_class_names(splits) == ('ant', 'bee', 'cat')


def test_load_image_folder_shapes_labels_pixels(tree):
  root, pngs = tree
  for split, n in (('train', N_TRAIN), ('test', N_TEST)):
    ds = data.load_image_folder(root, split)
    assert ds.images.shape == (3 * n, SIZE, SIZE, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and len(ds) == 3 * n
    assert ds.class_names == ('ant', 'bee', 'cat')  # sorted folder names
    np.testing.assert_array_equal(ds.labels, np.repeat([0, 1, 2], n))
  train = data.load_image_folder(root, 'train')
  paths = [p for p, _ in data.scan_image_folder(root)['train']]
  for i, path in enumerate(paths):
    if path in pngs:  # PNG is lossless: exact pixels
      np.testing.assert_array_equal(train.images[i], pngs[path])


def test_grey_image_is_converted_to_rgb(tree):
  root, _ = tree
  Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(root / 'train' / 'ant' / '0000.png')
  ds = data.load_image_folder(root, 'train')
  np.testing.assert_array_equal(ds.images[0], 7)


def test_parallel_decode_matches_serial(tree, monkeypatch):
  root, _ = tree
  serial = data.load_image_folder(root, 'train', num_workers=1)
  monkeypatch.setattr(data, '_MIN_IMAGES_PER_WORKER', 1)
  parallel = data.load_image_folder(root, 'train', num_workers=2)
  np.testing.assert_array_equal(parallel.images, serial.images)
  np.testing.assert_array_equal(parallel.labels, serial.labels)


def test_parallel_decode_reports_bad_file(tree, monkeypatch):
  root, _ = tree
  bad = root / 'train' / 'cat' / '0001.png'
  bad.write_bytes(b'not an image')
  monkeypatch.setattr(data, '_MIN_IMAGES_PER_WORKER', 1)
  with pytest.raises(data.DataError) as excinfo:
    data.load_image_folder(root, 'train', num_workers=2)
  assert_one_line_naming(excinfo, bad)


# ----------------------------------------------------------------------------
# Bad inputs: one-line DataError naming the file or folder.


def test_missing_root(tmp_path):
  with pytest.raises(data.DataError) as excinfo:
    data.load_image_folder(tmp_path / 'nope', 'train')
  assert_one_line_naming(excinfo, tmp_path / 'nope')


def test_missing_split_folder(tmp_path):
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  with pytest.raises(data.DataError) as excinfo:
    data.scan_image_folder(tmp_path)
  assert_one_line_naming(excinfo, tmp_path / 'test')


def test_empty_class_folder(tree):
  root, _ = tree
  (root / 'test' / 'dog').mkdir()
  (root / 'train' / 'dog').mkdir()
  (root / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  with pytest.raises(data.DataError) as excinfo:
    data.load_image_folder(root, 'test')
  assert_one_line_naming(excinfo, root / 'train' / 'dog')


def test_train_test_classes_differ(tree):
  root, _ = tree
  (root / 'test' / 'bee').rename(root / 'test' / 'wasp')
  with pytest.raises(data.DataError) as excinfo:
    data.scan_image_folder(root)
  assert_one_line_naming(excinfo, root / 'train')
  assert "only in train: ['bee']" in str(excinfo.value)
  assert "only in test: ['wasp']" in str(excinfo.value)


def test_unreadable_image(tree):
  root, _ = tree
  bad = root / 'test' / 'bee' / '0001.jpg'
  bad.write_bytes(b'\xff\xd8 garbage, not a jpeg')
  with pytest.raises(data.DataError) as excinfo:
    data.load_image_folder(root, 'test')
  assert_one_line_naming(excinfo, bad)


def test_wrongly_sized_image(tree):
  root, _ = tree
  bad = root / 'train' / 'bee' / '0001.png'
  Image.fromarray(np.zeros((SIZE, SIZE + 1, 3), np.uint8)).save(bad)
  with pytest.raises(data.DataError) as excinfo:
    data.load_image_folder(root, 'train')
  assert_one_line_naming(excinfo, bad)
  assert '(8, 9, 3)' in str(excinfo.value)


def test_unknown_split_and_dataset(tree):
  root, _ = tree
  with pytest.raises(data.DataError, match='validation'):
    data.load('validation', image_folder=str(root))
  with pytest.raises(data.DataError, match='mnist'):
    data.load('train', dataset='mnist')


# ----------------------------------------------------------------------------
# Caching.


def _cache_files(cache_dir):
  return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def test_second_load_comes_from_cache(tree, tmp_path, monkeypatch):
  root, _ = tree
  cache = tmp_path / 'cache'
  first = data.load('train', image_folder=str(root), cache_dir=str(cache))
  files = _cache_files(cache)
  assert len(files) == 1 and files[0].endswith('.npz') and 'train' in files[0]

  def no_decode(path):
    raise AssertionError(f'decoded {path} despite the cache')

  monkeypatch.setattr(data, 'decode_image', no_decode)
  second = data.load('train', image_folder=str(root), cache_dir=str(cache))
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.labels, first.labels)
  assert second.class_names == first.class_names
  assert second.labels.dtype == np.int32 and second.images.dtype == np.uint8


def test_cache_invalidated_when_a_file_changes(tree, tmp_path):
  root, _ = tree
  cache = str(tmp_path / 'cache')
  first = data.load('train', image_folder=str(root), cache_dir=cache)
  changed = root / 'train' / 'ant' / '0000.png'
  st = os.stat(changed)
  Image.fromarray(np.full((SIZE, SIZE, 3), 42, np.uint8)).save(changed)
  os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  second = data.load('train', image_folder=str(root), cache_dir=cache)
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
    data.load('train', image_folder=str(root), cache_dir=str(cache))
  assert _cache_files(cache) == []  # neither the final name nor a tmp file
  monkeypatch.undo()
  ds = data.load('train', image_folder=str(root), cache_dir=str(cache))
  assert len(ds) == 3 * N_TRAIN and len(_cache_files(cache)) == 1


def test_corrupt_cache_is_rebuilt(tree, tmp_path):
  root, _ = tree
  cache = tmp_path / 'cache'
  first = data.load('test', image_folder=str(root), cache_dir=str(cache))
  (path,) = cache.iterdir()
  path.write_bytes(path.read_bytes()[:100])
  second = data.load('test', image_folder=str(root), cache_dir=str(cache))
  np.testing.assert_array_equal(second.images, first.images)


def test_bad_image_writes_no_cache(tree, tmp_path):
  root, _ = tree
  cache = tmp_path / 'cache'
  (root / 'train' / 'ant' / '0001.png').write_bytes(b'junk')
  with pytest.raises(data.DataError):
    data.load('train', image_folder=str(root), cache_dir=str(cache))
  assert _cache_files(cache) == []


# ----------------------------------------------------------------------------
# channel_stats, ArrayDataset, import hygiene.


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_channel_stats_matches_numpy(dtype):
  rng = np.random.default_rng(1)
  images = (rng.integers(0, 256, (37, 5, 6, 3)) * [1.0, 0.5, 0.2]).astype(dtype)
  mean, std = data.channel_stats(images, chunk_size=4)  # several uneven chunks
  expected = images.astype(np.float64) / 255.0
  assert mean.dtype == np.float32 and std.dtype == np.float32
  np.testing.assert_allclose(mean, expected.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, expected.std(axis=(0, 1, 2)), rtol=1e-6)


def test_array_dataset_checks_dtypes():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  with pytest.raises(data.DataError):
    data.ArrayDataset(images.astype(np.float32), np.zeros(2, np.int32), ('a',))
  with pytest.raises(data.DataError):
    data.ArrayDataset(images, np.zeros(3, np.int32), ('a',))
  assert len(data.ArrayDataset(images, np.zeros(2, np.int32), ('a',))) == 2


def test_import_does_not_load_tensorflow():
  code = ('import jaxtransfer.data, sys; '
          "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, '-c', code], check=True)
