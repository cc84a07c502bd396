"""Class splits: random halves A/B of the label set, and per-half index sets with re-indexed labels."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxtransfer.config import ConfigError, half_names
from jaxtransfer.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from jaxtransfer.data.types import ArrayDataset

Split = tuple[tuple[int, ...], tuple[int, ...]]


def max_splits(num_classes: int) -> int:
  """Number of distinct unordered halvings {A, B} of `num_classes` classes (A the smaller)."""
  half = num_classes // 2
  n = math.comb(num_classes, half)
  return n // 2 if 2 * half == num_classes else n


def random_halves(num_classes: int, num_splits: int, seed: int) -> list[Split]:
  """`num_splits` distinct random splits of range(num_classes) into halves (A, B).

  Algorithm (reproducible from `seed` alone): with `np.random.default_rng(seed)`, draw a
  permutation of the classes; A is its first floor(C/2) entries and B the rest, each sorted.
  A draw whose unordered pair {A, B} was already drawn is rejected and drawn again, so the
  splits are distinct. For an odd C, A has one class fewer than B.
  """
  if num_classes < 2:
    raise ValueError(f'need at least 2 classes to split, got {num_classes}')
  if not 1 <= num_splits <= max_splits(num_classes):
    raise ValueError(f'{num_splits} splits requested, but {num_classes} classes allow 1 to '
                     f'{max_splits(num_classes)} distinct halvings')
  rng = np.random.default_rng(seed)
  half = num_classes // 2
  splits: list[Split] = []
  seen: set[frozenset] = set()
  while len(splits) < num_splits:
    perm = rng.permutation(num_classes)
    a, b = tuple(sorted(perm[:half].tolist())), tuple(sorted(perm[half:].tolist()))
    key = frozenset([a, b])
    if key not in seen:
      seen.add(key)
      splits.append((a, b))
  return splits


def label_map(classes: Sequence[int], num_classes: int) -> np.ndarray:
  """[num_classes] int32: global label -> index in sorted `classes` (0..k-1), -1 elsewhere."""
  out = np.full(num_classes, -1, np.int32)
  out[np.asarray(sorted(classes), int)] = np.arange(len(classes), dtype=np.int32)
  return out


def class_indices(labels: np.ndarray, classes: Sequence[int],
                  per_class: int | None = None) -> np.ndarray:
  """Sorted int32 indices of the examples of `classes`; with `per_class`, the first that many
  of each class, or all of a class that has fewer (a cap: deterministic, so data-size sweeps are
  nested subsets)."""
  parts = []
  for c in classes:
    idx = np.flatnonzero(labels == c)
    parts.append(idx if per_class is None else idx[:per_class])
  return np.sort(np.concatenate(parts)).astype(np.int32)


def subset(images: np.ndarray, labels: np.ndarray, classes: Sequence[int],
           per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The examples of `classes` with labels re-indexed 0..k-1 in sorted class order."""
  idx = class_indices(labels, classes, per_class)
  return images[idx], label_map(classes, int(labels.max()) + 1)[labels[idx]]


# Dissimilar halves (the paper's Fig. 3 upper panel split ImageNet into man-made / natural).
MAN_MADE = {
    'cifar10': ('airplane', 'automobile', 'ship', 'truck'),
    # CIFAR-100 superclasses food containers, household electrical devices, household
    # furniture, large man-made outdoor things, vehicles 1 and vehicles 2.
    'cifar100': ('bottle', 'bowl', 'can', 'cup', 'plate', 'clock', 'keyboard', 'lamp', 'telephone',
                 'television', 'bed', 'chair', 'couch', 'table', 'wardrobe', 'bridge', 'castle',
                 'house', 'road', 'skyscraper', 'bicycle', 'bus', 'motorcycle', 'pickup_truck',
                 'train', 'lawn_mower', 'rocket', 'streetcar', 'tank', 'tractor'),
}
_CLASSES = {'cifar10': CIFAR10_CLASSES, 'cifar100': CIFAR100_CLASSES}


def named_halves(class_names: Sequence[str], group_a: Sequence[str]) -> Split:
  """(A, B) with A the classes named in `group_a` and B all the others; sizes may differ."""
  missing = sorted(set(group_a) - set(class_names))
  if missing:
    raise ValueError(f'classes {missing} are not in this dataset ({len(class_names)} classes)')
  a = tuple(i for i, name in enumerate(class_names) if name in set(group_a))
  b = tuple(i for i in range(len(class_names)) if i not in a)
  return a, b


def dissimilar_halves(class_names: Sequence[str]) -> Split:
  """Man-made (A) against natural (B) classes, for CIFAR-10 or CIFAR-100 class names, or some
of either's (--classes) holding both kinds."""
  for group in MAN_MADE.values():
    if set(group) <= set(class_names):
      return named_halves(class_names, group)
  for name, group in MAN_MADE.items():
    if set(class_names) <= set(_CLASSES[name]):
      a = [c for c in group if c in class_names]
      if not a or len(a) == len(class_names):
        raise ValueError(f'dissimilar halves of {", ".join(class_names)}: need both man-made '
                         f'({", ".join(group[:4])}, ...) and natural classes')
      return named_halves(class_names, a)
  raise ValueError('dissimilar halves need CIFAR-10 or CIFAR-100 class names; got '
                   f'{", ".join(class_names[:5])}...')


def class_ids(names: Sequence[str], class_names: Sequence[str], flag: str) -> tuple[int, ...]:
  """The indices of the classes `names` (sorted), checked against the data's `class_names`:
  where a flag naming classes (`flag`) meets the data it names them in."""
  missing = sorted(set(names) - set(class_names))
  if missing:
    raise ConfigError(f'--{flag}: no class {", ".join(missing)} in this data; its classes are '
                      f'{", ".join(class_names)}')
  return tuple(sorted(class_names.index(n) for n in names))


def restrict(ds: ArrayDataset, names: Sequence[str]) -> ArrayDataset:
  """The examples of the classes `names` (--classes) only, re-indexed 0..k-1 in the dataset's
  class order, so the study sees a dataset of those k classes."""
  ids = class_ids(names, ds.class_names, 'classes')
  idx = class_indices(ds.labels, ids)
  labels = label_map(ids, len(ds.class_names))[ds.labels[idx]]
  return ArrayDataset(ds.images[idx], labels, tuple(ds.class_names[i] for i in ids))


def explicit_halves(class_names: Sequence[str], half_classes: str) -> Split:
  """(A, B) as --half_classes names them (`config.half_names`), checked against the data."""
  a, b = half_names(half_classes)
  return (class_ids(a, class_names, 'half_classes'), class_ids(b, class_names, 'half_classes'))
