"""Frozen prefixes computed once per member instead of at every training step.

A stack's frozen first layers under the `fixed` BatchNorm policy normalise with the running
statistics they start with (transferred, or their initialisation's), and under `target` with
statistics measured once at initialisation: either way they never change, a fixed function of
the image. Their output on each member's own training and test images is computed once, in
inference mode, from each member's starting variables, and the stack trains layers n.. on it
(`trainer.Features`). At n = 6 of the seed's net that leaves only the head to train. Stored as
float32 (the values the plain path computes, to float rounding), within a memory budget: a stack
whose features would not fit trains the plain way.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtransfer.data import datasets as data_lib
from jaxtransfer.nets import modelspec
from jaxtransfer.train import trainer

_BATCH = 1000


def applicable(model: Any, structure: trainer.Structure, augment: bool = False) -> bool:
  """Frozen layers, grafted or left at their initialisation, whose BatchNorm statistics do not
  move (`fixed` or `target`), and a model that can run a slice of its layers; and no
  augmentation (`augment`: a prefix of images augmented afresh at every step cannot be computed
  once)."""
  return (not augment and structure.batchnorm in ('fixed', 'target') and
          bool(structure.frozen_layers) and modelspec.runs_slices(model))


def starting_prefix(model: Any, structure: trainer.Structure, config: trainer.TrainConfig,
                    members: trainer.Members,
                    data: trainer.DeviceData) -> tuple[trainer.Structure, trainer.Members]:
  """The structure and members that train a stack on its prefix's features (`compute`) as
  `structure` trains it on images: grafted frozen layers under `fixed` as they are; otherwise
  each member starts as `Trainer.init` starts it (initialised, grafted, and under `target` its
  frozen layers' statistics measured on its training images), and those starting variables
  are the source its frozen layers are grafted from, under `fixed`."""
  if structure.batchnorm == 'fixed' and structure.frozen_layers == structure.graft_layers:
    return structure, members
  example = jnp.zeros((1, *data.train_images.shape[1:]), jnp.float32)
  data = jax.device_put(data)
  member = lambda tree, j: None if tree is None else jax.tree.map(lambda x: x[j], tree)
  args = lambda j: (members.init_keys[j], member(members.sources, j), None, members.train_idx[j],
                    data)
  # Compiled as the trainer compiles its initialisation (`trainer.INIT_COMPILER_OPTIONS`).
  init = jax.jit(trainer.Trainer(model, structure, config, example).init).lower(*args(0)).compile(
      trainer.INIT_COMPILER_OPTIONS)
  starts = [init(*args(j)).variables() for j in range(members.init_keys.shape[0])]
  grafted = tuple(structure.frozen_layers) + tuple(
      n for n in structure.graft_layers if n not in structure.frozen_layers)
  return (trainer.Structure(grafted, structure.frozen_layers, 'fixed'),
          members._replace(sources=jax.tree.map(lambda *xs: jnp.stack(xs), *starts)))


def planned_nbytes(model: Any, structure: trainer.Structure, k: int, train_images: int,
                   test_images: int, image_shape: tuple[int, ...], budget_mb: int,
                   augment: bool = False) -> int | None:
  """Bytes of a stack's prefix features if they are to be computed once: the structure allows
  it and the images are not augmented (`applicable`), and they fit in `budget_mb`; else None
  (the stack trains the plain way). The one decision, for the trainer and for the dry run's
  estimate."""
  if not applicable(model, structure, augment):
    return None
  size = stack_nbytes(model, k, train_images, test_images, image_shape,
                      len(structure.frozen_layers))
  return size if size <= budget_mb * 2**20 else None


def stack_nbytes(model: Any, k: int, train_images: int, test_images: int,
                 image_shape: tuple[int, ...], start: int) -> int:
  """Bytes of float32 features of `k` members' train and test images (what `compute` keeps)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, stop=start), variables, x)
  return k * (train_images + test_images) * int(np.prod(out.shape[1:])) * 4


def compute(model: Any, members: trainer.Members, data: trainer.DeviceData,
            start: int) -> tuple[trainer.Features, trainer.Members]:
  """Every member's prefix output on its own examples, and members that index into it."""
  prefix = jax.jit(functools.partial(_prefix, model, start))
  k, n = members.train_idx.shape
  num_classes = int(np.asarray(members.label_map).max()) + 1

  def outputs(images, labels, idx, source, label_map):
    idx = np.asarray(idx)
    padded = np.pad(idx, (0, -len(idx) % _BATCH))  # one batch shape: one compilation
    parts = [
        prefix(source, images[padded[i:i + _BATCH]], data.mean, data.std)
        for i in range(0, len(padded), _BATCH)
    ]
    return jnp.concatenate(parts)[:len(idx)], jnp.asarray(label_map)[labels[idx]]

  per_member = []
  for j in range(k):
    source = jax.tree.map(lambda x, j=j: x[j], members.sources)
    train_x, train_y = outputs(data.train_images, data.train_labels, members.train_idx[j], source,
                               members.label_map[j])
    test_x, test_y = outputs(data.test_images, data.test_labels, members.test_idx[j], source,
                             members.label_map[j])
    per_member.append((train_x, train_y, test_x, test_y))
  stacked = [jnp.stack(xs) for xs in zip(*per_member)]
  channels = data.mean.shape[-1]
  feature_data = trainer.DeviceData(*stacked, jnp.zeros((k, channels)), jnp.ones((k, channels)))
  m = members.test_idx.shape[1]
  tile = lambda x: jnp.tile(x[None], (k, 1))
  indexed = members._replace(train_idx=tile(jnp.arange(n, dtype=jnp.int32)),
                             test_idx=tile(jnp.arange(m, dtype=jnp.int32)),
                             label_map=tile(jnp.arange(num_classes, dtype=jnp.int32)))
  return trainer.Features(start, feature_data), indexed


def _prefix(model, start, variables, images_u8, mean, std):
  return model.apply(variables, data_lib.normalize(images_u8, mean, std), train=False, stop=start)
