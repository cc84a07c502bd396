"""Tests of the TFDS builders (no network, no real data, no TensorFlow)."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip('tensorflow_datasets')

from jaxtransfer.data import cifar_builder  # pylint: disable=g-import-not-at-top
from jaxtransfer.data import cifar, datasets, imagefolder
from jaxtransfer.data.imagefolder import DataError
from tests.conftest import make_image_folder


def make_tree(root):
  """Classes 'b' and 'a' (created unsorted), 3 images each per split, the last a JPEG."""
  make_image_folder(root, ('b', 'a'), 3, 3, jpeg_last=True)
  return root


def _pickled(obj) -> bytes:
  return pickle.dumps(obj, protocol=2)  # the archives are Python 2 pickles


def make_archive(path, archive: cifar.Archive, n_per_batch=4, seed=0, class_names=None):
  """A tiny tar.gz with the official layout; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  names = class_names or archive.class_names
  expected = {}
  with tarfile.open(path, 'w:gz') as tar:

    def add(name, blob):
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))

    add(archive.meta_member, _pickled({archive.names_key.encode(): [n.encode() for n in names]}))
    for split, members in archive.members.items():
      images, labels = [], []
      for member in members:
        x = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, len(names), n_per_batch).tolist()
        planar = x.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)  # CIFAR's row layout
        add(member, _pickled({b'data': planar, archive.labels_key.encode(): y}))
        images.append(x)
        labels.extend(y)
      expected[split] = (np.concatenate(images), np.array(labels, np.int32))
  return expected


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
  """A fake official archive in a manual dir, registered with its own checksum."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  archive = cifar.ARCHIVES['cifar10']
  path = manual / archive.filename
  expected = make_archive(path, archive)
  monkeypatch.setitem(
      cifar.ARCHIVES, 'cifar10',
      dataclasses.replace(archive, sha256=cifar_builder.file_sha256(path),
                          size=os.path.getsize(path)))
  return manual, expected


def prepared_leftovers(data_dir):
  """Anything that could read as a prepared dataset: version dirs, info, records."""
  return [
      p for p in data_dir.rglob('*')
      if p.name in ('1.0.0', 'dataset_info.json') or 'array_record' in p.name
  ]


# ----------------------------------------------------------------------------
# Archive checking and parsing.


def test_wrong_manual_archive_is_refused_by_checksum(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  bad = manual / 'cifar-10-python.tar.gz'
  bad.write_bytes(b'certainly not the CIFAR-10 archive')
  with pytest.raises(DataError) as excinfo:
    cifar_builder.prepare(config='manual', manual_dir=manual, data_dir=tmp_path / 'tfds')
  message = str(excinfo.value)
  assert 'checksum' in message and str(bad) in message and '\n' not in message
  assert prepared_leftovers(tmp_path / 'tfds') == []


def test_missing_manual_archive(tmp_path):
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / 'other.txt').write_text('x')
  with pytest.raises(DataError, match='cifar-10-python.tar.gz'):
    cifar_builder.prepare(config='manual', manual_dir=tmp_path / 'manual',
                          data_dir=tmp_path / 'tfds')


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
def test_read_archive_official_layout(tmp_path, dataset):
  archive = cifar.ARCHIVES[dataset]
  path = tmp_path / archive.filename
  expected = make_archive(path, archive, n_per_batch=3)
  for split, (images, labels) in expected.items():
    got_images, got_labels = cifar_builder.read_archive(path, archive, split)
    np.testing.assert_array_equal(got_images, images)  # NCHW rows -> NHWC
    np.testing.assert_array_equal(got_labels, labels)
  assert len(expected['train'][0]) == 3 * len(archive.members['train'])


def test_verify_archive(tmp_path):
  archive = cifar.ARCHIVES['cifar10']
  path = tmp_path / 'a.tar.gz'
  path.write_bytes(b'abc')
  ok = dataclasses.replace(archive, sha256=cifar_builder.file_sha256(path))
  cifar_builder.verify_archive(path, ok)
  with pytest.raises(DataError, match='checksum'):
    cifar_builder.verify_archive(path, archive)


def test_archive_with_other_class_names_is_refused(tmp_path):
  archive = cifar.ARCHIVES['cifar10']
  path = tmp_path / archive.filename
  make_archive(path, archive, class_names=[f'c{i}' for i in range(10)])
  with pytest.raises(DataError, match='batches.meta'):
    cifar_builder.read_archive(path, archive, 'test')


def test_unpickling_refuses_code(tmp_path):
  archive = cifar.ARCHIVES['cifar10']
  path = tmp_path / archive.filename
  with tarfile.open(path, 'w:gz') as tar:
    blob = b'cos\nsystem\n(S"echo pwned"\ntR.'  # the classic os.system payload
    for member in (archive.meta_member, *archive.members['test']):
      info = tarfile.TarInfo(member)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  with pytest.raises(DataError, match='refusing to unpickle'):
    cifar_builder.read_archive(path, archive, 'test')


# ----------------------------------------------------------------------------
# Preparing and reading through TFDS.


def test_manual_config_end_to_end(fake_cifar10, tmp_path, monkeypatch):
  manual, expected = fake_cifar10
  kwargs = dict(manual_dir=str(manual), data_dir=str(tmp_path / 'tfds'),
                cache_dir=str(tmp_path / 'cache'))
  for split, (images, labels) in expected.items():
    ds = datasets.load(split, **kwargs)
    np.testing.assert_array_equal(ds.images, images)  # source order kept
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names == cifar.CIFAR10_CLASSES
  builder = cifar_builder.builder(config='manual', data_dir=tmp_path / 'tfds')
  assert builder.info.splits['train'].num_examples == len(expected['train'][1])

  def no_prepare(*args, **kwargs):
    raise AssertionError('prepared again despite the cache')

  monkeypatch.setattr(cifar_builder, 'prepare', no_prepare)
  again = datasets.load('test', **kwargs)
  np.testing.assert_array_equal(again.images, expected['test'][0])


def test_image_folder_config_matches_pil_loader(tmp_path):
  root = make_tree(tmp_path / 'images')
  data_dir = tmp_path / 'tfds'
  builder = cifar_builder.prepare(image_folder=root, data_dir=data_dir)
  assert builder.info.features['label'].names == ['a', 'b']
  for split in ('train', 'test'):
    source = tfds.data_source('jaxtransfer_cifar10/image_folder', split=split, data_dir=data_dir,
                              builder_kwargs={'image_folder': root}, download=False)
    from_tfds = datasets.data_source_to_arrays(source, builder.info.features['label'].names)
    from_pil = imagefolder.load_image_folder(root, split)
    np.testing.assert_array_equal(from_tfds.images, from_pil.images)
    np.testing.assert_array_equal(from_tfds.labels, from_pil.labels)
    assert from_tfds.class_names == from_pil.class_names


def test_changed_image_folder_is_prepared_afresh(tmp_path):
  root = make_tree(tmp_path / 'images')
  first = cifar_builder.prepare(image_folder=root, data_dir=tmp_path / 'tfds')
  Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(root / 'train' / 'a' / '0000.png')
  second = cifar_builder.prepare(image_folder=root, data_dir=tmp_path / 'tfds')
  assert second.data_path != first.data_path
  source = second.as_data_source(split='train')
  np.testing.assert_array_equal(source[0]['image'], 9)


def test_corrupt_image_leaves_no_prepared_dataset(tmp_path):
  root = make_tree(tmp_path / 'images')
  bad = root / 'test' / 'b' / '0002.jpg'
  bad.write_bytes(b'\xff\xd8 truncated garbage')
  data_dir = tmp_path / 'tfds'
  with pytest.raises(DataError) as excinfo:
    cifar_builder.prepare(image_folder=root, data_dir=data_dir)
  assert str(bad) in str(excinfo.value)
  assert prepared_leftovers(data_dir) == []
  builder = cifar_builder.builder(image_folder=root, data_dir=data_dir)
  assert not builder.data_path.exists()
  with pytest.raises(DataError):  # a retry fails the same way, not silently
    cifar_builder.prepare(image_folder=root, data_dir=data_dir)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad, format='JPEG')
  fixed = cifar_builder.prepare(image_folder=root, data_dir=data_dir)
  assert len(fixed.as_data_source(split='test')) == 6


def test_image_folder_config_needs_a_folder(tmp_path):
  with pytest.raises(DataError, match='image_folder'):
    cifar_builder.builder(config='image_folder', data_dir=tmp_path)
  with pytest.raises(DataError, match='image_folder'):
    cifar_builder.builder(config='manual', image_folder=make_tree(tmp_path / 'x'),
                          data_dir=tmp_path)


def test_download_config_registers_the_archive_checksum(tmp_path):
  infos = cifar_builder.JaxtransferCifar10.url_infos
  archive = cifar.ARCHIVES['cifar10']
  assert infos[archive.url].checksum == archive.sha256
  assert int(infos[archive.url].size) == 170_498_071
  assert cifar_builder.builder(data_dir=tmp_path).builder_config.name == 'download'


@pytest.mark.parametrize('dataset, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_load_tfds_path_under_mock_data(tmp_path, monkeypatch, dataset, num_classes):
  # The mock's __getitems__ is broken: read one index at a time under it.
  monkeypatch.setattr(datasets, '_read_chunk', lambda source, idx: [source[i] for i in idx])
  with tfds.testing.mock_data(num_examples=5):
    ds = datasets.load('train', dataset=dataset, data_dir=str(tmp_path / 'tfds'),
                       cache_dir=str(tmp_path / 'cache'))
  assert ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ((0 <= ds.labels) & (ds.labels < num_classes)).all()
  assert len(ds.class_names) == num_classes
  assert len(list((tmp_path / 'cache').iterdir())) == 1


def test_offline_download_fails_fast_naming_the_offline_sources(tmp_path, monkeypatch):
  # No network here: the real URL fails the probe; so does a host that cannot resolve anywhere.
  archive = cifar.ARCHIVES['cifar10']
  monkeypatch.setitem(cifar.ARCHIVES, 'cifar10',
                      dataclasses.replace(archive, url='https://cifar.invalid/cifar.tar.gz'))
  start = time.perf_counter()
  with pytest.raises(DataError) as e:
    datasets.load('train', dataset='cifar10', data_dir=str(tmp_path / 'tfds'),
                  cache_dir=str(tmp_path / 'cache'))
  assert time.perf_counter() - start < 30
  message = str(e.value)
  assert message.startswith('cannot download cifar.tar.gz: cannot reach cifar.invalid:443 (')
  assert '--manual_dir=DIR' in message and '--image_folder=PATH' in message
  assert '\n' not in message and not prepared_leftovers(tmp_path / 'tfds')


def test_network_probe_sees_a_listening_host_and_times_out_on_silence():
  import socket

  from jaxtransfer.data import network
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    port = server.getsockname()[1]
    assert network.unreachable(f'http://127.0.0.1:{port}/x', timeout=2) == ''
  assert network.unreachable(f'http://127.0.0.1:{port}/x',
                             timeout=2).startswith(f'cannot reach 127.0.0.1:{port}')


def test_tensorflow_is_never_imported():
  assert 'tensorflow' not in sys.modules
