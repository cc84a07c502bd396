"""Image folders decoded with PIL alone (tiny generated trees; no TFDS, no real data)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from jaxtransfer.data import datasets, imagefolder
from jaxtransfer.data.types import ArrayDataset, DataError
from tests.conftest import N_TEST, N_TRAIN, SIZE


def assert_one_line_naming(excinfo, name):
  message = str(excinfo.value)
  assert '\n' not in message
  assert str(name) in message, message


def load(root, split):
  """One split the way a study loads it (`datasets.load`), with a cache of the test's own."""
  return datasets.load(split, image_folder=str(root), cache_dir=str(root) + '-cache')


def decode(root, split, num_workers):
  """One split decoded by `num_workers` processes, as `datasets.load` decodes it (no cache)."""
  splits = imagefolder.scan_image_folder(root)
  return imagefolder.folder_split(splits, split, imagefolder.folder_class_names(splits),
                                  num_workers)


# ----------------------------------------------------------------------------
# scan_image_folder, and loading a split.


def test_scan_lists_sorted_classes_and_files(tree):
  root, _ = tree
  splits = imagefolder.scan_image_folder(root)
  assert set(splits) == {'train', 'test'}
  assert len(splits['train']) == 3 * N_TRAIN and len(splits['test']) == 3 * N_TEST
  assert [label for _, label in splits['train']] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert os.path.basename(os.path.dirname(splits['train'][0][0])) == 'ant'
  assert imagefolder.folder_class_names(splits) == ('ant', 'bee', 'cat')


def test_load_shapes_labels_pixels(tree):
  root, pngs = tree
  for split, n in (('train', N_TRAIN), ('test', N_TEST)):
    ds = load(root, split)
    assert ds.images.shape == (3 * n, SIZE, SIZE, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and len(ds) == 3 * n
    assert ds.class_names == ('ant', 'bee', 'cat')  # sorted folder names
    np.testing.assert_array_equal(ds.labels, np.repeat([0, 1, 2], n))
  train = load(root, 'train')
  paths = [p for p, _ in imagefolder.scan_image_folder(root)['train']]
  for i, path in enumerate(paths):
    if path in pngs:  # PNG is lossless: exact pixels
      np.testing.assert_array_equal(train.images[i], pngs[path])


def test_grey_image_is_converted_to_rgb(tree):
  root, _ = tree
  Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(root / 'train' / 'ant' / '0000.png')
  ds = load(root, 'train')
  np.testing.assert_array_equal(ds.images[0], 7)


def test_parallel_decode_matches_serial(tree, monkeypatch, caplog):
  root, _ = tree
  serial = decode(root, 'train', num_workers=1)
  monkeypatch.setattr(imagefolder, '_MIN_IMAGES_PER_WORKER', 1)
  with caplog.at_level(logging.WARNING):
    parallel = decode(root, 'train', num_workers=2)
  assert 'Decode workers failed' not in caplog.text  # the workers did decode
  np.testing.assert_array_equal(parallel.images, serial.images)
  np.testing.assert_array_equal(parallel.labels, serial.labels)


def test_parallel_decode_reports_bad_file(tree, monkeypatch, caplog):
  root, _ = tree
  bad = root / 'train' / 'cat' / '0001.png'
  bad.write_bytes(b'not an image')
  monkeypatch.setattr(imagefolder, '_MIN_IMAGES_PER_WORKER', 1)
  with pytest.raises(DataError) as excinfo, caplog.at_level(logging.WARNING):
    decode(root, 'train', num_workers=2)
  assert 'Decode workers failed' not in caplog.text  # a worker's own one-line error
  assert_one_line_naming(excinfo, bad)


# ----------------------------------------------------------------------------
# Bad inputs: one-line DataError naming the file or folder.


def test_missing_root(tmp_path):
  with pytest.raises(DataError) as excinfo:
    load(tmp_path / 'nope', 'train')
  assert_one_line_naming(excinfo, tmp_path / 'nope')


def test_missing_split_folder(tmp_path):
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  with pytest.raises(DataError) as excinfo:
    imagefolder.scan_image_folder(tmp_path)
  assert_one_line_naming(excinfo, tmp_path / 'test')


def test_empty_class_folder(tree):
  root, _ = tree
  (root / 'test' / 'dog').mkdir()
  (root / 'train' / 'dog').mkdir()
  (root / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  with pytest.raises(DataError) as excinfo:
    load(root, 'test')
  assert_one_line_naming(excinfo, root / 'train' / 'dog')


def test_train_test_classes_differ(tree):
  root, _ = tree
  (root / 'test' / 'bee').rename(root / 'test' / 'wasp')
  with pytest.raises(DataError) as excinfo:
    imagefolder.scan_image_folder(root)
  assert_one_line_naming(excinfo, root / 'train')
  assert "only in train: ['bee']" in str(excinfo.value)
  assert "only in test: ['wasp']" in str(excinfo.value)


def test_unreadable_image(tree):
  root, _ = tree
  bad = root / 'test' / 'bee' / '0001.jpg'
  bad.write_bytes(b'\xff\xd8 garbage, not a jpeg')
  with pytest.raises(DataError) as excinfo:
    load(root, 'test')
  assert_one_line_naming(excinfo, bad)


def test_dangling_symlink_is_refused(tree):
  """Skipping it would train on fewer images than the folder claims, without a word."""
  root, _ = tree
  link = root / 'test' / 'bee' / '0009.png'
  os.symlink(root / 'gone.png', link)
  with pytest.raises(
      DataError, match=f'image {link} is a symbolic link to '
      f'{root}/gone.png, which does not exist'):
    imagefolder.scan_image_folder(root)


def test_wrongly_sized_image(tree):
  root, _ = tree
  bad = root / 'train' / 'bee' / '0001.png'
  Image.fromarray(np.zeros((SIZE, SIZE + 1, 3), np.uint8)).save(bad)
  with pytest.raises(DataError) as excinfo:
    load(root, 'train')
  assert_one_line_naming(excinfo, bad)
  assert '(8, 9, 3)' in str(excinfo.value)


def test_array_dataset_checks_dtypes():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  with pytest.raises(DataError):
    ArrayDataset(images.astype(np.float32), np.zeros(2, np.int32), ('a',))
  with pytest.raises(DataError):
    ArrayDataset(images, np.zeros(3, np.int32), ('a',))
  assert len(ArrayDataset(images, np.zeros(2, np.int32), ('a',))) == 2


def test_content_fingerprint_follows_the_data_not_its_place(tree, tmp_path):
  """A copy elsewhere (new paths, new mtimes) is the same data; a renamed or resized file is not."""
  import shutil
  root, _ = tree
  fingerprint, shape = imagefolder.identify(root)
  assert shape == (SIZE, SIZE, 3) and fingerprint.startswith('v2:') and len(fingerprint) == 67
  copy = tmp_path / 'elsewhere' / 'copy'
  shutil.copytree(root, copy, copy_function=shutil.copy)  # fresh mtimes
  assert imagefolder.identify(copy)[0] == fingerprint
  splits = imagefolder.scan_image_folder(copy)
  first = splits['train'][0][0]
  os.rename(first, first.replace('0000', '0009'))
  renamed = imagefolder.identify(copy)[0]
  assert renamed != fingerprint
  with open(splits['test'][0][0], 'ab') as f:
    f.write(b'\0')  # one byte more
  assert imagefolder.identify(copy)[0] not in (fingerprint, renamed)


def test_content_fingerprint_sees_every_byte_not_just_sizes(tree):
  """An image replaced by another of the same size is other data: the earlier names-and-sizes
  kind cannot tell them apart, today's content fingerprint can."""
  root, pngs = tree
  path = sorted(pngs)[0]
  rng = np.random.default_rng(7)
  write = lambda: Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8)).save(
      path, compress_level=0)  # stored, not deflated: the size follows the shape alone
  write()
  splits = imagefolder.scan_image_folder(root)
  before = imagefolder.content_fingerprint(splits), imagefolder.sizes_fingerprint(splits)
  size, mtime = os.path.getsize(path), os.stat(path).st_mtime_ns
  write()
  os.utime(path, ns=(mtime, mtime))  # as cp -p or rsync leave it
  assert os.path.getsize(path) == size
  after = imagefolder.content_fingerprint(splits), imagefolder.sizes_fingerprint(splits)
  assert after[1] == before[1] and imagefolder.is_sizes_fingerprint(after[1])
  assert after[0] != before[0] and not imagefolder.is_sizes_fingerprint(after[0])


def test_the_real_folder_has_the_published_sizes_fingerprint():
  """The published studies recorded e8ae1be3... (names and sizes) for the real CIFAR-10 folder:
  `sizes_fingerprint` still computes it, so they migrate when given that folder."""
  root = '/work/data/cifar10-jpeg'
  if not os.path.isdir(root):
    pytest.skip('no real CIFAR-10 image folder here')
  assert imagefolder.sizes_fingerprint(imagefolder.scan_image_folder(root)) == (
      'e8ae1be30bd6e776705bb4a9a328b8dcc6e3115abf3ea682b830b5719fdd1293')


def _png16(path, values: np.ndarray) -> None:
  """A 16-bit PNG written by hand (grey for [H, W], RGB for [H, W, 3]): PIL saves none itself."""
  import struct
  import zlib
  h, w = values.shape[:2]
  color = 0 if values.ndim == 2 else 2
  raw = b''.join(b'\0' + values[y].astype('>u2').tobytes() for y in range(h))
  chunk = lambda kind, data: (struct.pack('>I', len(data)) + kind + data + struct.pack(
      '>I', zlib.crc32(kind + data)))
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' +
            chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, color, 0, 0, 0)) +
            chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


@pytest.mark.parametrize('channels', [1, 3])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, channels):
  """16-bit grey (PIL mode I;16, which its RGB conversion clips at 255) and 48-bit RGB decode to
  value >> 8."""
  values = np.random.default_rng(0).integers(0, 65536, (5, 6, 3)[:2 if channels == 1 else 3])
  path = str(tmp_path / 'wide.png')
  _png16(path, values)
  with Image.open(path) as image:
    assert image.mode == ('I;16' if channels == 1 else 'RGB')
  decoded = imagefolder.decode_image(path)
  expected = (values >> 8).astype(np.uint8)
  if channels == 1:
    expected = np.repeat(expected[..., None], 3, axis=-1)
  assert decoded.dtype == np.uint8 and decoded.shape == (5, 6, 3)
  np.testing.assert_array_equal(decoded, expected)
  assert (decoded == 255).mean() < 0.05  # clipped, nearly every pixel would be 255


def test_values_beyond_16_bits_are_refused():
  with pytest.raises(DataError, match=r'x.png has I pixel values in 0..70000, outside'):
    imagefolder._wide_grey_to_rgb(np.array([[0, 70000]], np.int32), 'I', 'x.png')
