"""Class splits: random halves, dissimilar halves, per-half indices and label maps."""

import numpy as np
import pytest

from jaxtransfer.data import cifar, splits


def test_random_halves_are_reproducible_and_distinct():
  a = splits.random_halves(10, 5, seed=0)
  assert a == splits.random_halves(10, 5, seed=0) != splits.random_halves(10, 5, seed=1)
  assert len({frozenset(p) for p in a}) == 5
  for half_a, half_b in a:
    assert len(half_a) == len(half_b) == 5 and sorted(half_a + half_b) == list(range(10))
    assert list(half_a) == sorted(half_a)
  assert splits.max_splits(10) == 126 and splits.max_splits(5) == 10
  with pytest.raises(ValueError, match='allow 1 to 126'):
    splits.random_halves(10, 127, seed=0)


def test_class_indices_and_label_map_reindex_a_half():
  """How a member's examples are picked and relabelled (`driver.stack_members`)."""
  labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
  idx = splits.class_indices(labels, [9, 1, 5])
  assert idx.tolist() == [1, 3, 4, 5, 8]
  label_map = splits.label_map([9, 1, 5], 10)
  assert label_map[labels[idx]].tolist() == [0, 0, 1, 2, 1]  # sorted classes 1, 5, 9 -> 0, 1, 2
  assert label_map[[0, 2, 3]].tolist() == [-1, -1, -1]  # classes of the other half
  assert splits.class_indices(labels, [1, 5], per_class=1).tolist() == [1, 4]


def test_dissimilar_halves_are_exactly_man_made_and_natural():
  a, b = splits.dissimilar_halves(cifar.CIFAR10_CLASSES)
  assert [cifar.CIFAR10_CLASSES[i] for i in a] == ['airplane', 'automobile', 'ship', 'truck']
  assert [cifar.CIFAR10_CLASSES[i] for i in b] == ['bird', 'cat', 'deer', 'dog', 'frog', 'horse']
  a, b = splits.dissimilar_halves(cifar.CIFAR100_CLASSES)
  assert len(a) == 30 and len(b) == 70 and not set(a) & set(b)
  assert {cifar.CIFAR100_CLASSES[i] for i in a} == set(splits.MAN_MADE['cifar100'])
  with pytest.raises(ValueError, match='CIFAR-10 or CIFAR-100 class names'):
    splits.dissimilar_halves(['x', 'y', 'z'])
