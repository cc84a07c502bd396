"""The CIFAR datasets as this project knows them: class names, the official archives (where they
are, their checksums, their layout) and the version of our TFDS builders (their names, by
`--dataset`, are `config.TFDS_NAMES`).

Facts only, no TFDS import: the data cache keys on them without preparing anything, and
`cifar_builder` builds from them.
"""

from __future__ import annotations

import dataclasses

# Single source of truth for the TFDS builder version: the cache key of a TFDS source is computed
# from it and `config.TFDS_NAMES` without importing TFDS.
BUILDER_VERSION = '1.0.0'
IMAGE_SHAPE = (32, 32, 3)  # H x W x C of every CIFAR image

CIFAR10_CLASSES = (
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
)
CIFAR100_CLASSES = (
    'apple',
    'aquarium_fish',
    'baby',
    'bear',
    'beaver',
    'bed',
    'bee',
    'beetle',
    'bicycle',
    'bottle',
    'bowl',
    'boy',
    'bridge',
    'bus',
    'butterfly',
    'camel',
    'can',
    'castle',
    'caterpillar',
    'cattle',
    'chair',
    'chimpanzee',
    'clock',
    'cloud',
    'cockroach',
    'couch',
    'crab',
    'crocodile',
    'cup',
    'dinosaur',
    'dolphin',
    'elephant',
    'flatfish',
    'forest',
    'fox',
    'girl',
    'hamster',
    'house',
    'kangaroo',
    'keyboard',
    'lamp',
    'lawn_mower',
    'leopard',
    'lion',
    'lizard',
    'lobster',
    'man',
    'maple_tree',
    'motorcycle',
    'mountain',
    'mouse',
    'mushroom',
    'oak_tree',
    'orange',
    'orchid',
    'otter',
    'palm_tree',
    'pear',
    'pickup_truck',
    'pine_tree',
    'plain',
    'plate',
    'poppy',
    'porcupine',
    'possum',
    'rabbit',
    'raccoon',
    'ray',
    'road',
    'rocket',
    'rose',
    'sea',
    'seal',
    'shark',
    'shrew',
    'skunk',
    'skyscraper',
    'snail',
    'snake',
    'spider',
    'squirrel',
    'streetcar',
    'sunflower',
    'sweet_pepper',
    'table',
    'tank',
    'telephone',
    'television',
    'tiger',
    'tractor',
    'train',
    'trout',
    'tulip',
    'turtle',
    'wardrobe',
    'whale',
    'willow_tree',
    'wolf',
    'woman',
    'worm',
)


@dataclasses.dataclass(frozen=True)
class Archive:
  """An official CIFAR python archive: where it is, its checksum, its layout."""

  url: str
  size: int
  sha256: str
  members: dict[str, tuple[str, ...]]  # split -> pickled batches in the tar
  meta_member: str
  labels_key: str
  names_key: str
  class_names: tuple[str, ...]

  @property
  def filename(self) -> str:
    return self.url.rsplit('/', 1)[-1]


# Checksums as published with the archives (keras.datasets pins the same).
# TFDS registers only the *binary* archives' checksums, which we do not read.
ARCHIVES = {
    'cifar10': Archive(
        url='https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
        size=170_498_071,
        sha256='6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce',
        members={
            'train': tuple(f'cifar-10-batches-py/data_batch_{i}' for i in range(1, 6)),
            'test': ('cifar-10-batches-py/test_batch',),
        },
        meta_member='cifar-10-batches-py/batches.meta',
        labels_key='labels',
        names_key='label_names',
        class_names=CIFAR10_CLASSES,
    ),
    'cifar100': Archive(
        url='https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
        size=169_001_437,
        sha256='85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7',
        members={'train': ('cifar-100-python/train',), 'test': ('cifar-100-python/test',)},
        meta_member='cifar-100-python/meta',
        labels_key='fine_labels',
        names_key='fine_label_names',
        class_names=CIFAR100_CLASSES,
    ),
}
