"""TFDS builders for CIFAR-10/100 that prepare and read without TensorFlow.

TFDS's own `cifar10` builder needs TensorFlow to prepare. These builders write
array_record files with a uint8 `Tensor` image feature (no image encoding at
all), which TFDS prepares and reads back with `as_data_source` using numpy
only. Configs:

* `download` (default): the official python archive, via `dl_manager.download`;
* `manual`: the same archive, placed by hand in the manual dir.

Image folders do not come through here: `datasets.load(image_folder=...)` decodes them with PIL
(`imagefolder`).

Archives are sha256-checked against the published checksum before anything is
unpickled. Unpickling is restricted to numpy arrays besides.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxtransfer.data import network
from jaxtransfer.data.cifar import ARCHIVES, BUILDER_VERSION, Archive
from jaxtransfer.data.types import DataError

# ----------------------------------------------------------------------------
# Archive checking and parsing (plain functions, testable without TFDS).


def file_sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def verify_archive(path: str | os.PathLike, archive: Archive) -> None:
  """Refuses any file but the official archive, before anything is unpickled."""
  digest = file_sha256(path)
  if digest != archive.sha256:
    raise DataError(f'{os.fspath(path)} ({os.path.getsize(path)} bytes) has sha256 {digest}, '
                    f'which does not match the registered checksum {archive.sha256} of '
                    f'{archive.filename} ({archive.size} bytes); get it from {archive.url}')


class _NumpyUnpickler(pickle.Unpickler):
  """Unpickles dicts/lists/strings and numpy arrays only, nothing executable."""

  _ALLOWED = {
      ('numpy', 'ndarray'),
      ('numpy', 'dtype'),
      ('numpy._core.multiarray', '_reconstruct'),
      ('numpy._core.multiarray', 'scalar'),
      ('numpy._core.numeric', '_frombuffer'),
      ('_codecs', 'encode'),  # how Python 3 writes bytes into protocol-2 pickles
  }

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith('numpy.core'):  # numpy 1 name of numpy 2's numpy._core
      module = 'numpy._core' + module[len('numpy.core'):]
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name}')
    return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict[str, Any]:
  try:
    obj = _NumpyUnpickler(io.BytesIO(blob), encoding='bytes').load()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'cannot unpickle {where}: {e}') from e
  if not isinstance(obj, dict):
    raise DataError(f'{where} does not hold a dict')
  # Python 2 pickles give bytes keys and names; normalise to str.
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_archive(path: str | os.PathLike, archive: Archive,
                 split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, 32, 32, 3] images, int32 [N] labels) of one split, in file order.

  Also checks that the archive's class names are the ones the builder declares.
  Call `verify_archive` first: this unpickles the archive's contents.
  """
  wanted = [archive.meta_member, *archive.members[split]]
  blobs = {}
  try:
    with tarfile.open(path, 'r:gz') as tar:
      for member in tar:
        if member.name in wanted and member.isfile():
          blobs[member.name] = tar.extractfile(member).read()
  except (OSError, tarfile.TarError, EOFError) as e:
    raise DataError(f'cannot read archive {os.fspath(path)}: {e}') from e
  missing = [m for m in wanted if m not in blobs]
  if missing:
    raise DataError(f'archive {os.fspath(path)} lacks {missing}')
  where = lambda m: f'{os.fspath(path)}:{m}'
  meta = _unpickle(blobs[archive.meta_member], where(archive.meta_member))
  names = tuple(
      n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(archive.names_key, ()))
  if names != archive.class_names:
    raise DataError(f'{where(archive.meta_member)} lists classes {names}, '
                    f'expected {archive.class_names}')
  images, labels = [], []
  for member in archive.members[split]:
    batch = _unpickle(blobs[member], where(member))
    try:
      x = np.asarray(batch['data'], np.uint8).reshape(-1, 3, 32, 32)
      y = np.asarray(batch[archive.labels_key], np.int32).reshape(-1)
    except (KeyError, ValueError) as e:
      raise DataError(f'{where(member)} is not a CIFAR batch: {e}') from e
    if len(x) != len(y) or y.min() < 0 or y.max() >= len(names):
      raise DataError(f'{where(member)} has {len(x)} images but {len(y)} labels '
                      f'in [{y.min()}, {y.max()}]')
    images.append(x.transpose(0, 2, 3, 1))  # stored planar (NCHW)
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------
# Builders.

_CITATION = """\
@techreport{krizhevsky2009learning,
  title={Learning multiple layers of features from tiny images},
  author={Krizhevsky, Alex},
  year={2009},
  institution={University of Toronto}
}"""


class JaxtransferCifar10(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 from the official python archive."""

  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {BUILDER_VERSION: 'Initial release.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='download', description='Official python archive, downloaded.'),
      tfds.core.BuilderConfig(name='manual', description='Official python archive in manual_dir.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place {ARCHIVES["cifar10"].filename} in the manual dir.'
  _DATASET = 'cifar10'

  @classmethod
  def _archive(cls) -> Archive:
    return ARCHIVES[cls._DATASET]

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> dict[str, Any]:
    # Lets tfds's download manager check the download too (no checksums.tsv).
    archive = cls._archive()
    return {
        archive.url: tfds.core.download.checksums.UrlInfo(size=tfds.core.utils.Size(archive.size),
                                                          checksum=archive.sha256,
                                                          filename=archive.filename)
    }

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    """array_record by default."""
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self._DATASET.upper()} as uint8 arrays, in source order.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=self._archive().class_names),
        }),
        supervised_keys=('image', 'label'),
        # Keep source order: index i of a split is image i of the archive.
        disable_shuffling=True,
        homepage='https://www.cs.toronto.edu/~kriz/cifar.html',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    archive = self._archive()
    if self.builder_config.name == 'manual':
      path = _manual_archive_path(dl_manager, archive)
    else:
      reason = network.unreachable(archive.url)  # before tfds's retries
      if reason:
        raise DataError(f'cannot download {archive.filename}: {reason}. Offline? Give '
                        f'--manual_dir=DIR with {archive.filename} in it, or --image_folder=PATH '
                        'of a {train,test}/<class>/*.png|jpg tree')
      path = dl_manager.download(archive.url)
    verify_archive(path, archive)
    return {
        split: self._generate_examples(_archive_examples(path, archive, split))
        for split in archive.members
    }

  def _generate_examples(
      self, examples: Iterator[tuple[np.ndarray, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
    # Integer keys + disable_shuffling: records are written in source order.
    for i, (image, label) in enumerate(examples):
      yield i, {'image': image, 'label': label}


class JaxtransferCifar100(JaxtransferCifar10):
  """CIFAR-100 (fine labels) from the official python archive."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place {ARCHIVES["cifar100"].filename} in the manual dir.'
  _DATASET = 'cifar100'


BUILDERS = {'cifar10': JaxtransferCifar10, 'cifar100': JaxtransferCifar100}


def _manual_archive_path(dl_manager: tfds.download.DownloadManager, archive: Archive) -> str:
  try:
    manual_dir = dl_manager.manual_dir
  except AssertionError as e:
    raise DataError(f'manual dir does not exist or is empty; place {archive.filename} '
                    f'there ({e.args[0].splitlines()[0]})') from e
  path = os.path.join(os.fspath(manual_dir), archive.filename)
  if not os.path.isfile(path):
    raise DataError(f'{path} not found: place {archive.filename} ({archive.url}) there')
  return path


def _archive_examples(path, archive: Archive, split: str) -> Iterator[tuple[np.ndarray, int]]:
  images, labels = read_archive(path, archive, split)
  yield from zip(images, labels.tolist())


def builder(
    dataset: str = 'cifar10',
    *,
    config: str | None = None,
    data_dir: str | os.PathLike | None = None,
) -> JaxtransferCifar10:
  """Our builder for `dataset` ('cifar10' or 'cifar100')."""
  if dataset not in BUILDERS:
    raise DataError(f'unknown dataset {dataset!r}, expected one of {sorted(BUILDERS)}')
  return BUILDERS[dataset](config=config, data_dir=data_dir)


def prepare(
    dataset: str = 'cifar10',
    *,
    config: str | None = None,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> JaxtransferCifar10:
  """Prepares (once) and returns the builder; read it with `as_data_source`.

  TFDS generates into a temporary directory and renames it on success, so an
  interrupted or failed prepare leaves nothing that reads as complete. A download is preceded
  by a probe of the archive's host (`_split_generators`): offline, it fails in seconds, naming
  the offline sources.
  """
  b = builder(dataset, config=config, data_dir=data_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir)))
  return b
