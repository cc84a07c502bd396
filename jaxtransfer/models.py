"""The seed seminar's two CIFAR networks, as flax.linen modules.

Every weight layer (a conv with its BatchNorm, or the dense head) is one named top-level
submodule, called in order, so "the first n layers" is well defined and can be found by
`jaxtransfer.transfer.layer_order`. Both nets take NHWC float images and are called as
`model.apply(variables, x, train=bool)`; `start`/`stop` run a contiguous slice of the layers,
which lets the trainer compute a frozen prefix once and train only the rest on its features.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2/2 max-pool as reshape + max.

  Same values as `nn.max_pool(x, (2, 2), (2, 2))`; its gradient avoids XLA's select-and-scatter,
  which is slow on CPU (see shared notes: ~1,530 vs ~2,000 img/s).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvBlock(nn.Module):
  """conv3x3 (pad 1, stride 1) [-> BatchNorm] -> ReLU [-> 2x2 max-pool]: one transferable layer."""

  features: int
  batch_norm: bool = True
  pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (3, 3), padding=1, name='conv')(x)
    if self.batch_norm:
      # PyTorch's BatchNorm2d defaults (momentum 0.1 -> flax 0.9, eps 1e-5), as in the seed.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn')(x)
    x = nn.relu(x)
    return max_pool_2x2(x) if self.pool else x


class Head(nn.Module):
  """Flatten -> Dense(num_classes)."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return nn.Dense(self.num_classes, name='dense')(x.reshape(x.shape[0], -1))


class _LayerStack(nn.Module):
  """Runs `self.layer_specs()` in order: (name, module factory) pairs that subclasses define."""

  def layer_specs(self) -> list[tuple[str, Callable[..., nn.Module]]]:
    raise NotImplementedError

  @property
  def num_layers(self) -> int:
    return len(self.layer_specs())

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, start: int = 0,
               stop: int | None = None) -> jax.Array:
    for name, make_layer in self.layer_specs()[start:stop]:
      x = make_layer(name=name)(x, train)
    return x


class InitialNet(_LayerStack):
  """The seed's first net: 8 x [conv3x3 (3 filters) -> ReLU], flatten 32*32*3 -> Dense (9 layers)."""

  num_classes: int
  depth: int = 8
  width: int = 3

  def layer_specs(self) -> list[tuple[str, Callable[..., nn.Module]]]:
    convs = [(f'conv{i + 1}', functools.partial(ConvBlock, self.width, batch_norm=False))
             for i in range(self.depth)]
    return convs + [('head', functools.partial(Head, self.num_classes))]


class FinalNet(_LayerStack):
  """The seed's final net: 3 blocks of [conv3x3 -> BN -> ReLU] x 2 + max-pool 2x2, then a Dense head.

  7 layers: conv1..conv6 and head. `widths` are the three blocks' filter counts; the default
  (8, 16, 32) gives the seed's 4*4*32 = 512 features into the head (see README on the ambiguity).
  """

  num_classes: int
  widths: Sequence[int] = (8, 16, 32)

  def layer_specs(self) -> list[tuple[str, Callable[..., nn.Module]]]:
    specs = []
    for b, w in enumerate(self.widths):
      specs.append((f'conv{2 * b + 1}', functools.partial(ConvBlock, w)))
      specs.append((f'conv{2 * b + 2}', functools.partial(ConvBlock, w, pool=True)))
    return specs + [('head', functools.partial(Head, self.num_classes))]


def make_model(name: str, num_classes: int, widths: Sequence[int] = (8, 16, 32)) -> _LayerStack:
  """Model by flag value: 'initial' or 'final'."""
  if name == 'initial':
    return InitialNet(num_classes)
  if name == 'final':
    return FinalNet(num_classes, tuple(widths))
  raise ValueError(f"unknown model {name!r}: expected 'initial' or 'final'")


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
