"""Your own network in a transferability study: a small VGG-style CNN, as an example.

  python -m experiments.main --model=examples/small_vgg.py:SmallVGG --image_folder=PATH \
      --workdir=DIR

The contract (jaxtransfer/nets/modelspec.py): `SmallVGG(num_classes)` is a flax.linen Module called
as `model.apply(variables, x, train=bool)` on normalised NHWC images; its top-level submodules,
in the order they are called, are the layers a study transfers: block1, block2, block3 and head,
so depths n = 1..3. The head's shape depends on the class count; only blocks are ever copied.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class Block(nn.Module):
  """conv 3x3 [-> BatchNorm] -> ReLU -> 2x2 max-pool: one transferable layer."""

  features: int
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (3, 3))(x)
    if self.batch_norm:  # flax's BatchNorm: --frozen_batchnorm applies to it
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.max_pool(nn.relu(x), (2, 2), (2, 2))


class Head(nn.Module):
  """Global average pool -> Dense: works for any image size."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class SmallVGG(nn.Module):
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = Block(width, self.batch_norm, name=f'block{i + 1}')(x, train)
    return Head(self.num_classes, name='head')(x, train)


def without_batchnorm(num_classes: int) -> SmallVGG:
  """The same net without BatchNorm (`--model=examples/small_vgg.py:without_batchnorm`): any
  callable of the class count will do."""
  return SmallVGG(num_classes, batch_norm=False)
