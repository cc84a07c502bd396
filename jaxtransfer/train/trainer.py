"""Stacked trainer: K models with a leading model axis, trained by one jitted epoch function.

A stack's members share a model, an optimizer and a batch size, and differ in data: each
member has its own training and test indices into the shared image arrays, its own label map
(its half's classes -> 0..k-1), its own PRNG keys and its own grafting source. Which layers are
grafted and which are trained is either static (a `Structure` compiled into the programs: a
frozen prefix gets no backward pass) or data too (`LayerFlags`: one init and one epoch program
serve every structure, frozen layers' updates dropped by a mask); `structure_as_data` chooses.

The dataset's uint8 arrays go to the device once; shuffling, batching, normalisation and the
whole epoch (a `lax.scan` of one step body; the last batch padded and masked) run on
device with no host round-trip per step. The model axis is sharded over all local devices
with `shard_map`; inside a shard, members run under `jax.vmap` (accelerators: one big batched
kernel) or `lax.map` (CPU: XLA turns vmapped convolutions into grouped ones, several times
slower there, while a loop over members keeps the fast native convolutions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtransfer import config as config_lib, transfer
from jaxtransfer.config import MEMBER_MAPS, OPTIMIZERS  # MEMBER_MAPS: see _over_members
from jaxtransfer.data.datasets import normalize
from jaxtransfer.nets import flops, modelspec
from jaxtransfer.train import programs as programs_lib

PyTree = Any
MODEL_AXIS = 'models'
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}
_STUDY, _RUN = config_lib.StudyConfig(), config_lib.RunOptions()
PROGRAMS = programs_lib.Cache()  # this process's compiled stack programs (see train_stack)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation hyper-parameters shared by a stack (by default, a default study's)."""

  epochs: int = _STUDY.epochs
  batch_size: int = _STUDY.batch_size
  optimizer: str = _STUDY.optimizer  # one of OPTIMIZERS: 'adam' (AdamW) | 'sgd' (with momentum)
  learning_rate: float = _STUDY.learning_rate
  weight_decay: float = _STUDY.weight_decay
  momentum: float = _STUDY.momentum  # sgd's
  lr_schedule: str = _STUDY.lr_schedule  # one of config.LR_SCHEDULES
  warmup_epochs: int = _STUDY.warmup_epochs
  augment: str = _STUDY.augment  # one of config.AUGMENTATIONS
  eval_batch_size: int = _RUN.eval_batch_size


@dataclasses.dataclass(frozen=True)
class Structure:
  """What a stack's members share: which top-level layers are grafted from the source, which
  are frozen, and how BatchNorm behaves inside frozen layers (see `transfer.batchnorm_policy`)."""

  graft_layers: tuple[str, ...] = ()
  frozen_layers: tuple[str, ...] = ()
  batchnorm: str = 'update'


class LayerFlags(NamedTuple):
  """A structure as data: top-level layer name -> bool, per member (a leading model axis when
  stacked). `graft`: the layer's variables come from the source; `train`: its params train."""

  graft: dict[str, jax.Array]
  train: dict[str, jax.Array]


def layer_flags(structure: Structure, layer_names: Sequence[str]) -> LayerFlags:
  """One member's `LayerFlags` of `structure`, over the model's top-level `layer_names`."""
  flag = lambda on: {name: jnp.asarray(name in on) for name in layer_names}
  return LayerFlags(flag(structure.graft_layers),
                    flag(set(layer_names) - set(structure.frozen_layers)))


class DeviceData(NamedTuple):
  """The whole dataset as uint8 images + global int labels, plus normalisation statistics."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array  # per channel, of images / 255
  std: jax.Array


class Members(NamedTuple):
  """Per-member inputs, each with a leading model axis of size K."""

  init_keys: jax.Array  # [K] PRNG keys for the fresh initialisation
  shuffle_keys: jax.Array  # [K] PRNG keys for the epoch permutations
  train_idx: jax.Array  # [K, N] int32 indices into train_images
  test_idx: jax.Array  # [K, M] int32 indices into test_images
  label_map: jax.Array  # [K, num_global_classes] int32: global label -> member label
  sources: PyTree | None = None  # stacked variables to graft from, or None


class TrainState(NamedTuple):
  """One member's training state (a leading model axis on every leaf when stacked)."""

  params: PyTree
  model_state: PyTree  # the other variable collections, e.g. {'batch_stats': ...}
  opt_state: optax.OptState
  trainable: dict[str, jax.Array] | None = None  # `LayerFlags.train` where structure is data

  def variables(self) -> dict:
    return {'params': self.params, **self.model_state}


class StackResult(NamedTuple):
  variables: PyTree  # stacked final variables (params, batch_stats, ...) on host
  train_accuracy: np.ndarray  # [K] running accuracy over the last epoch
  train_loss: np.ndarray  # [K] mean loss over the last epoch
  test_accuracy: np.ndarray  # [K]
  seconds: float  # wall time of the whole stack, compilation included
  timings: dict[str, float]  # seconds by phase: compile, init, train, evaluate (where time goes)
  members_per_program: int  # the chunk size it ran in (all its members, padded, if one chunk)
  footprint: Footprint | None  # its device bytes, measured where the device has a limit


def steps_per_epoch(train_images: int, batch_size: int) -> int:
  """Optimiser steps in an epoch of `train_images`: the full batches and a partial last one."""
  return -(-train_images // batch_size)


def learning_rate(config: TrainConfig, steps: int) -> float | optax.Schedule:
  """The rate at each optimiser step (its update count), for `steps` steps an epoch: a linear
  warm-up from 0 over `warmup_epochs`, then constant or cosine-decayed to 0 at the last step.
  The seed's recipe (constant, no warm-up) is the plain float, as it always was."""
  warmup, total = config.warmup_epochs * steps, config.epochs * steps
  lr = config.learning_rate
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), 0.0)
  if config.lr_schedule != 'constant':
    raise ValueError(f'unknown lr_schedule {config.lr_schedule!r}: expected one of '
                     f'{config_lib.LR_SCHEDULES}')
  if not warmup:
    return lr
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                               optax.constant_schedule(lr)], [warmup])


def make_optimizer(config: TrainConfig, steps: int = 1) -> optax.GradientTransformation:
  """The optimiser of `config`, for `steps` optimiser steps an epoch (its schedule's unit)."""
  lr = learning_rate(config, steps)
  if config.optimizer == 'adam':
    return optax.adamw(lr, weight_decay=config.weight_decay)
  if config.optimizer == 'sgd':
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum))
  raise ValueError(f'unknown optimizer {config.optimizer!r}: expected one of {OPTIMIZERS}')


def to_device(train, test, mean, std) -> DeviceData:
  """`data.ArrayDataset`s -> DeviceData (one host-to-device copy of the uint8 arrays)."""
  return DeviceData(jnp.asarray(train.images), jnp.asarray(train.labels, jnp.int32),
                    jnp.asarray(test.images), jnp.asarray(test.labels, jnp.int32),
                    jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))


class Features(NamedTuple):
  """A frozen prefix's output, computed once per member instead of at every step.

  Under the `fixed` BatchNorm policy, frozen layers are a fixed function of the image: layers
  [0, start) applied to each member's own examples give `data` with a leading model axis
  (train_images [K, N, ...] float32, train_labels [K, N] already member labels, test_* alike;
  mean/std unused), and training runs layers start.. only (`model.apply(..., start=start)`).
  Built by `jaxtransfer.train.features`."""

  start: int
  data: DeviceData


class Trainer:
  """The per-member functions of one stack; `train_stack` maps them over members.

  `structure`: which layers are grafted and frozen, or None where each member's `LayerFlags`
  say (BatchNorm then behaves as the 'update' policy says in every layer); `example`: an input
  image batch of the model (for `init`); `start` > 0: the inputs of `step` and `evaluate` are
  the outputs of layer start-1 (see `Features`), else uint8 images. `train_images`: each
  member's training examples (the unit of the learning-rate schedule is an epoch of them)."""
  def __init__(self, model: nn.Module, structure: Structure | None, config: TrainConfig,
               example: jax.Array, start: int = 0, train_images: int = 1):
    self.model, self.structure, self.config, self.example = model, structure, config, example
    self.layers = {'start': start} if start else {}
    if start and config.augment != 'none':
      raise ValueError('augmented images have no precomputed prefix features: train a stack '
                       'with --augment the plain way (features.planned_nbytes(augment=True))')
    steps = steps_per_epoch(train_images, config.batch_size)
    self.tx = make_optimizer(config, steps)
    self._frozen_slice = {}
    if structure is not None:
      shapes = _variable_shapes(model, example.shape[1:])
      self.labels = transfer.freeze_labels(shapes['params'], structure.frozen_layers)
      self.tx = transfer.masked_optimizer(self.tx, self.labels)
      if structure.batchnorm == 'target':
        if start:
          raise ValueError("the 'target' BatchNorm policy measures its statistics on images: "
                           'a stack on precomputed prefix features cannot use it')
        frozen = tuple(structure.frozen_layers)
        if (modelspec.runs_slices(model) and
            tuple(transfer.layer_order(model, example, train=False)[:len(frozen)]) == frozen):
          self._frozen_slice = {'stop': len(frozen)}

  def init(self, key: jax.Array, source: PyTree | None, flags: LayerFlags | None = None,
           train_idx: jax.Array | None = None, data: DeviceData | None = None) -> TrainState:
    """A fresh member with its grafted layers from `source`: the structure's, or `flags`'. Under
    the 'target' BatchNorm policy its frozen layers' statistics are then measured on its
    training images `train_idx` of `data` (`transfer.batchnorm_statistics`)."""
    variables = dict(self.model.init(key, self.example, train=False))
    if flags is not None:
      variables = transfer.graft_where(source, variables, flags.graft)
    elif self.structure.graft_layers:
      variables = transfer.graft(source, variables, self.structure.graft_layers)
    if self.structure is not None and self.structure.batchnorm == 'target':
      variables = self._target_statistics(variables, train_idx, data)
    params = variables.pop('params')
    return TrainState(params, variables, self.tx.init(params),
                      None if flags is None else flags.train)

  def _target_statistics(self, variables, train_idx, data: DeviceData):
    """The frozen layers' BatchNorm statistics over the member's training images, in batches of
    the evaluation size (the last padded and masked), through the frozen layers alone where the
    model runs a slice of its layers and they are its first ones."""
    n = train_idx.shape[0]
    eb = min(self.config.eval_batch_size, n)
    batches = -(-n // eb)
    idx = jnp.pad(train_idx, (0, batches * eb - n)).reshape(batches, eb)
    mask = (jnp.arange(batches * eb) < n).reshape(batches, eb)
    forward = lambda v, i: self.model.apply(v, _inputs(data.train_images[i], data), train=False, **
                                            self._frozen_slice)
    return transfer.batchnorm_statistics(forward, variables, idx, self.structure.frozen_layers,
                                         mask)

  def loss(self, params, model_state, images, labels, mask=None):
    policy = (contextlib.nullcontext() if self.structure is None else transfer.batchnorm_policy(
        self.structure.frozen_layers, self.structure.batchnorm))
    with policy, _masked_batchnorm(mask):
      logits, model_state = self.model.apply({'params': params, **model_state}, images, train=True,
                                             mutable=list(model_state), **self.layers)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hits = logits.argmax(-1) == labels
    if mask is not None:
      losses, hits = jnp.where(mask, losses, 0.0), hits & mask
    return losses.sum(), (model_state, hits.sum())

  def step(self, state: TrainState, batch_idx, label_map, data: DeviceData, key=None, mask=None):
    """One optimiser step on the examples `batch_idx` (augmented with `key` under --augment), of
    which only those where `mask` is true count (in the loss, the gradient and BatchNorm's
    statistics). A static structure takes gradients only w.r.t. trainable leaves, so no backward
    pass runs through a frozen prefix; flags take every gradient and drop the frozen updates."""
    images = data.train_images[batch_idx]
    if key is not None:
      images = augment(key, images, self.config.augment)
    images = _inputs(images, data)
    labels = label_map[data.train_labels[batch_idx]]
    if self.structure is None:
      return self._flagged_step(state, images, labels, mask)
    trainable, frozen = transfer.partition(state.params, self.labels)
    loss_fn = lambda trainable, *args: self.loss(transfer.combine(trainable, frozen), *args)
    (loss, (model_state, correct)), grads = jax.value_and_grad(loss_fn,
                                                               has_aux=True)(trainable,
                                                                             state.model_state,
                                                                             images, labels, mask)
    n = _examples(batch_idx.shape[0], mask)
    grads = transfer.combine(jax.tree.map(lambda g: g / n, grads),
                             jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    new_trainable, _ = transfer.partition(optax.apply_updates(state.params, updates), self.labels)
    # Frozen leaves are carried over as they were: bit-for-bit, whatever the optimizer does.
    params = transfer.combine(new_trainable, frozen)
    return TrainState(params, model_state,
                      opt_state), jnp.stack([loss, correct.astype(jnp.float32)])

  def _flagged_step(self, state: TrainState, images, labels, mask):
    """`step` with the structure as data: frozen leaves (and their optimizer moments) keep their
    values bit for bit, so they get no update, no weight decay and no moment change."""
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (loss, (model_state, correct)), grads = grad_fn(state.params, state.model_state, images, labels,
                                                    mask)
    n = _examples(images.shape[0], mask)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    keep = transfer.layer_leaves(state.params, state.trainable)
    params = jax.tree.map(jnp.where, keep, optax.apply_updates(state.params, updates), state.params)
    opt_state = transfer.where_params(keep, opt_state, state.opt_state)
    return TrainState(params, model_state, opt_state,
                      state.trainable), jnp.stack([loss, correct.astype(jnp.float32)])

  def epoch(self, state: TrainState, key, train_idx, label_map, data: DeviceData):
    """A shuffled pass over `train_idx` in batches, all in one `lax.scan` over one step body.
    Where the batch size does not divide the examples, the last batch is padded to the full
    size and the padding masked out (`step`), rather than compiling a second, smaller step."""
    n = train_idx.shape[0]
    b = min(self.config.batch_size, n)
    steps = steps_per_epoch(n, b)
    order = train_idx[jax.random.permutation(key, n)]
    xs = {'batch_idx': order[jnp.arange(steps * b) % n].reshape(steps, b)}
    if steps * b != n:
      xs['mask'] = (jnp.arange(steps * b) < n).reshape(steps, b)
    if self.config.augment != 'none':
      # Each step's own key, from the member's epoch key alone (not the stack's other members);
      # the permutation above keeps `key` itself.
      # The stream is split into (full batches + 1) keys, its definition; a step takes its own.
      draws = n // self.config.batch_size + 1
      xs['key'] = jax.random.split(jax.random.fold_in(key, _AUGMENT_STREAM), draws)[:steps]
    step = lambda state, x: self.step(state, label_map=label_map, data=data, **x)
    state, sums = lax.scan(step, state, xs)
    return state, sums.sum(0) / n  # (mean loss, accuracy)

  def evaluate(self, variables: PyTree, test_idx, label_map, data: DeviceData):
    """Accuracy on `test_idx`, in padded batches (eval mode: padding cannot leak into stats).
    It reads the variables alone, not the optimiser state, so stacks of any structure share it."""
    m = test_idx.shape[0]
    eb = min(self.config.eval_batch_size, m)
    batches = -(-m // eb)
    padded = jnp.pad(test_idx, (0, batches * eb - m))
    valid = jnp.arange(batches * eb) < m

    def correct(args):
      idx, ok = args
      logits = self.model.apply(variables, _inputs(data.test_images[idx], data), train=False,
                                **self.layers)
      return ((logits.argmax(-1) == label_map[data.test_labels[idx]]) & ok).sum()

    hits = lax.map(correct, (padded.reshape(batches, eb), valid.reshape(batches, eb)))
    return hits.sum() / m


def _examples(batch: int, mask: jax.Array | None):
  """The examples a step's loss sums over: the batch, or its masked-in part."""
  return batch if mask is None else mask.sum().astype(jnp.float32)


_AUGMENT_STREAM = 0x617567  # folded into a member's epoch key: its augmentation stream


@contextlib.contextmanager
def _masked_batchnorm(mask: jax.Array | None):
  """BatchNorm's batch statistics over the examples where `mask` [batch] is true: every
  `nn.BatchNorm` of the model (the researcher's too) gets it, unless its caller passes one."""
  if mask is None:
    yield
    return

  def add_mask(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__' and
        kwargs.get('mask') is None):
      x = args[0]
      kwargs = {**kwargs, 'mask': mask.reshape(mask.shape + (1,) * (x.ndim - 1))}
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(add_mask):
    yield


def augment(key: jax.Array, images: jax.Array, kind: str = 'crop_flip') -> jax.Array:
  """uint8 images [B, H, W, C] augmented as `kind` (one of config.AUGMENTATIONS) says, each by
  its own draw from `key`: 'crop_flip' is a random H x W crop of the image zero-padded by
  CROP_PADDING pixels on every side (black, as torchvision's RandomCrop(padding=4) pads before
  normalising) and a horizontal flip with p = 0.5."""
  if kind == 'none':
    return images
  if kind != 'crop_flip':
    raise ValueError(f'unknown augment {kind!r}: expected one of {config_lib.AUGMENTATIONS}')
  pad = config_lib.CROP_PADDING
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(key, image):
    k_crop, k_flip = jax.random.split(key)
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
    crop = lax.dynamic_slice(image, (dy, dx, 0), (h, w, c))
    return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), padded)


def _inputs(x: jax.Array, data: DeviceData) -> jax.Array:
  """Model inputs: uint8 images normalised; a prefix's float features (`Features`) as they are."""
  return normalize(x, data.mean, data.std) if x.dtype == jnp.uint8 else x


def _over_members(fn: Callable, member_map: str, shared_data: bool = True) -> Callable:
  """Map `fn` over the leading model axis of every argument, `data` (the last one) included
  unless `shared_data`."""
  def mapped(*args):
    *per_member, data = args
    if not shared_data:
      return _map(fn, member_map, *args)
    return _map(lambda *a: fn(*a, data=data), member_map, *per_member)

  return mapped


def _map(fn: Callable, member_map: str, *args):
  if member_map == 'vmap':
    return jax.vmap(fn)(*args)
  return lax.map(lambda a: fn(*a), args)


def default_member_map() -> str:
  return 'map' if jax.default_backend() == 'cpu' else 'vmap'


def resolve_member_map(member_map: str | None) -> str:
  """'auto' (or None) -> this platform's default; 'map' and 'vmap' as they are."""
  if member_map in (None, 'auto'):
    return default_member_map()
  if member_map not in MEMBER_MAPS:
    raise ValueError(f'unknown member map {member_map!r}: expected one of {", ".join(MEMBER_MAPS)}')
  return member_map


class StackFunctions(NamedTuple):
  """A stack's three programs, each jit(shard_map(member map)) over the mesh's model axis."""

  init: Callable  # (init_keys, sources, flags, train_idx, data) -> TrainState
  epoch: Callable  # (state, shuffle_keys, train_idx, label_map, data) -> (state, [K, 2] metrics)
  evaluate: Callable  # (variables, test_idx, label_map, data) -> [K] test accuracy


def stack_functions(trainer: Trainer, mesh: Mesh, member_map: str,
                    shared_data: bool = True) -> StackFunctions:
  """What `train_stack` runs, built without any data: member arguments split over `mesh`'s
  model axis, data (the last argument) replicated, or split too when it is per member
  (precomputed features: not `shared_data`). So they can also be lowered from shapes alone, for
  any platform (`jax.export`), or timed on a few batches (the dry run's probe)."""
  def compile_(fn, n_member_args):
    in_specs = (P(MODEL_AXIS),) * n_member_args + (P() if shared_data else P(MODEL_AXIS),)
    return jax.jit(
        jax.shard_map(_over_members(fn, member_map, shared_data), mesh=mesh, in_specs=in_specs,
                      out_specs=P(MODEL_AXIS)))

  return StackFunctions(compile_(trainer.init, 4), compile_(trainer.epoch, 4),
                        compile_(trainer.evaluate, 3))


# On a CPU a program costs seconds to compile, and training with the structure as data costs a
# frozen prefix's backward pass at every step. A stack of fewer training FLOPs than this trains
# in less time than one program compiles (the seed study's base stack on 2 AMD EPYC cores
# compiled its 3 programs in 7.8 s and trained at 17.6 GFLOP/s:
# results/cifar10/seed_fixed_3seeds-split0/log.txt), so it shares the programs of every other
# structure; a real study's stacks are 10^4 times larger and keep their pruned programs.
CPU_SHARED_FLOPS = 5e10


def structure_as_data(model: nn.Module, structure: Structure, config: TrainConfig,
                      image_shape: Sequence[int], member_map: str, members: int, train_images: int,
                      features: Features | None = None) -> bool:
  """Whether a stack trains with its structure as data (`LayerFlags`: programs shared by every
  structure) rather than compiled in (a frozen prefix pruned from the backward pass).

  Where it `can_be_data`: on accelerators (members under 'vmap') always, as compiling dominates
  there; on a CPU for stacks below CPU_SHARED_FLOPS."""
  if not can_be_data(structure, features):
    return False
  if member_map == 'vmap':
    return True
  return config.epochs * members * train_images * _step_flops(model, image_shape) < CPU_SHARED_FLOPS


def _per_model(fn: Callable) -> Callable:
  """`fn(model, image_shape)` computed once per model and image shape in a process, as a trace
  of the model costs a tenth of a second at every stack (an unhashable model: every time)."""
  cached = functools.lru_cache(maxsize=16)(fn)

  def call(model: nn.Module, image_shape: Sequence[int]):
    try:
      return cached(model, tuple(image_shape))
    except TypeError:
      return fn(model, tuple(image_shape))

  return call


@_per_model
def _step_flops(model: nn.Module, image_shape: tuple[int, ...]) -> int:
  return flops.whole_model_flops(model, image_shape)[0]


@_per_model
def _variable_shapes(model: nn.Module, image_shape: tuple[int, ...]) -> PyTree:
  """The model's variables as shapes (read-only: shared by every caller)."""
  example = jnp.zeros((1,) + image_shape, jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), example, train=False))


def can_be_data(structure: Structure, features: Features | None = None) -> bool:
  """Not with a precomputed prefix, whose start is compiled in, nor with a BatchNorm policy
  other than 'update' in frozen layers, which is the program's."""
  return features is None and (not structure.frozen_layers or structure.batchnorm == 'update')


def data_inputs(model: nn.Module, structure: Structure, sources: PyTree | None, k: int,
                image_shape: Sequence[int]) -> tuple[PyTree, LayerFlags]:
  """What the init program takes where a stack's structure is data, for `k` members: every
  layer's sources (the stack's grafted layers from `sources`, zeros for the rest), so that
  stacks of every structure pass one tree, and the structure's `LayerFlags`."""
  shapes = _variable_shapes(model, image_shape)
  sources = sources or {}
  zeros = lambda sub: jax.tree.map(lambda x: jnp.zeros((k,) + x.shape, x.dtype), sub)
  full = {
      c: {n: sources.get(c, {}).get(n, zeros(sub)) for n, sub in layers.items()}
      for c, layers in shapes.items()
  }
  names = sorted({n for layers in shapes.values() for n in layers})
  return full, jax.tree.map(lambda f: jnp.tile(f, k), layer_flags(structure, names))


def _program_config(config: TrainConfig) -> TrainConfig:
  """`config` as the init and epoch programs see it: the number of epochs is the host's loop,
  and enters a program only as the length of a cosine schedule; without one, studies that
  differ in their epochs alone (a sweep over them) share every program."""
  return config if config.lr_schedule == 'cosine' else dataclasses.replace(config, epochs=0)


def _pad_members(tree: PyTree, k_padded: int) -> PyTree:
  """Repeat the last member so that K divides evenly over devices; results are cut back to K."""
  def pad(x):
    extra = k_padded - x.shape[0]
    return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])

  return jax.tree.map(pad, tree)


def _to_global(tree: PyTree, sharding: NamedSharding) -> PyTree:
  """Place arrays with `sharding`. Across processes (`jax.distributed`), every process holds
  the same full values, and each builds its own shards from them."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# Of a device's allocator limit, what a stack's programs may plan to use: the rest is slack for
# fragmentation and for what the process holds besides (other stacks' results on their way out).
MEMORY_FRACTION = 0.9


def device_memory(mesh: Mesh) -> int | None:
  """Bytes a stack may use on each device of `mesh`: MEMORY_FRACTION of the allocator's limit,
  or None where a device reports none (a CPU, whose programs share the host's memory)."""
  limit = (mesh.local_devices[0].memory_stats() or {}).get('bytes_limit')  # this process's
  return int(limit * MEMORY_FRACTION) if limit else None


def program_bytes(compiled: Any) -> int:
  """Bytes a compiled program holds on a device while it runs (`memory_analysis()`): arguments,
  outputs not aliased to them, temporaries and code; 0 where the backend does not say."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
          m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def _device_bytes(tree: PyTree) -> int:
  """Bytes of `tree`'s arrays on one device (each array's first shard there)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    total += x.addressable_shards[0].data.nbytes
  return total


class Footprint(NamedTuple):
  """A stack's device bytes measured with `members` per program (`memory_analysis()`)."""

  members: int
  program: int  # the largest of its compiled programs' `program_bytes`
  held: int  # what each chunk keeps on the device while another runs (its states and inputs)

  def total(self, size: int) -> int:
    """Bytes per device for a stack of `size` in chunks of `members`."""
    return self.program + (-(-size // self.members) - 1) * self.held


def between(low: Footprint, high: Footprint, size: int, devices: int, limit: int) -> int | None:
  """The most members per program, a multiple of `devices` strictly between `low`'s and `high`'s,
  that the line through their programs' bytes predicts to fit in `limit` for a stack of `size`
  (memory grows linearly with the members a program trains at once); None if none does."""
  slope = (high.program - low.program) / (high.members - low.members)
  for members in range(high.members - devices, low.members, -devices):
    predicted = Footprint(members, low.program + slope * (members - low.members),
                          low.held * members / low.members)
    if predicted.total(size) <= limit:
      return members
  return None


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class _Trial(NamedTuple):
  """A stack laid out in chunks of one size, ready to train (see `train_stack`)."""

  chunks: _Chunks
  first: TrainState  # the first chunk's, initialised
  programs: tuple[Any, Any, Any]  # init, epoch, evaluate, compiled
  footprint: Footprint | None


class _Chunks(NamedTuple):
  """A stack's members on the devices, in chunks of one shape."""

  members: list[Members]
  flags: list[LayerFlags | None]
  data: list[Any]  # per chunk: the replicated `DeviceData`, or that chunk's `Features.data`


def train_stack(model: nn.Module, structure: Structure, config: TrainConfig, data: DeviceData,
                members: Members, *, mesh: Mesh | None = None, member_map: str | None = None,
                on_epoch: Callable[[int, np.ndarray], None] | None = None,
                features: Features | None = None, eval_every_epoch: bool = False,
                programs: programs_lib.Cache | None = PROGRAMS, as_data: bool | None = None,
                pad_to: int = 0, chunk: int = 0, memory: int | None = None) -> StackResult:
  """Initialise, graft, train for `config.epochs` and evaluate a stack of K members.

  `mesh`: a 1-D mesh with axis `MODEL_AXIS` (default: all local devices; with several
  processes under `jax.distributed`, all global devices). `member_map`: one of MEMBER_MAPS,
  how members run inside a device ('auto'/None: `default_member_map()`; results agree up to
  float noise). `on_epoch(epoch, metrics)` gets the [K, 2] (mean loss, running accuracy) of
  every finished epoch, and with `eval_every_epoch` [K, 3], the test accuracy after that epoch
  third: the one evaluation function, compiled once, runs after every epoch instead of after
  the last only (read-only: the same training, and the last epoch's value is the result's test
  accuracy). With `features`, steps and evaluation read each member's precomputed prefix output
  instead of `data` (then used only for the image shape), and `members` index into it.
  `programs`: where compiled programs are found and kept (default: this process's `PROGRAMS`;
  None compiles every program afresh), so a stack that computes what an earlier one did, with
  arguments of the same shapes and placements, compiles nothing. `as_data`: train with the
  structure as data (`LayerFlags`) or compiled in; None: as `structure_as_data` chooses.
  `pad_to`: with the structure as data, members are padded to this many (a study's largest
  stack), so that stacks of every size share programs too; the padding is cut from the results.
  `chunk`: members per program; a larger stack runs as chunks of that many (the last padded),
  each epoch of each in turn, so device memory holds one chunk's activations at a time. 0: as
  many as fit in `memory` bytes per device (None: `device_memory(mesh)`; 0 or a device that
  reports no limit, such as a CPU: all), judged from the compiled programs' `memory_analysis()`
  (`Footprint`), which chunks of every size are checked against before they run.
  """
  start = time.perf_counter()
  timings = dict.fromkeys(('compile', 'init', 'train', 'evaluate'), 0.0)
  member_map = resolve_member_map(member_map)
  mesh = mesh or jax.make_mesh((jax.device_count(),), (MODEL_AXIS,))
  k = members.init_keys.shape[0]
  image_shape = data.train_images.shape[1:]
  start_layer, train_images = (features.start if features else 0), members.train_idx.shape[1]
  shared = features is None  # data replicated to every member, or each member's own features
  example = jnp.zeros((1,) + image_shape, jnp.float32)
  if as_data is None:
    as_data = structure_as_data(model, structure, config, image_shape, member_map, k, train_images,
                                features)
  elif as_data and not can_be_data(structure, features):
    raise ValueError('a structure with a precomputed prefix or a BatchNorm policy other than '
                     "'update' in frozen layers is compiled in: train it with as_data=False")
  size = max(k, pad_to if as_data else 0)
  limit = device_memory(mesh) if memory is None else memory
  sharded, replicated = NamedSharding(mesh, P(MODEL_AXIS)), NamedSharding(mesh, P())
  # Everything a phase's program is built from; with the arguments' signature, its key.
  common = (model, image_shape, start_layer, mesh, member_map, shared)
  program_structure = None if as_data else structure
  trained = common + (program_structure, _program_config(config), train_images)
  built_from = {
      'init': trained,
      'epoch': trained,
      'evaluate': common + (config.eval_batch_size,),  # what `Trainer.evaluate` reads
  }

  @functools.cache
  def fns() -> StackFunctions:
    trainer = Trainer(model, program_structure, config, example, start_layer, train_images)
    return stack_functions(trainer, mesh, member_map, shared_data=shared)

  def compile_(phase, *args, options=None):
    """Compiled ahead of time for `args`, so that compilation is timed apart from running."""
    t = time.perf_counter()
    build = lambda: getattr(fns(), phase).lower(*args).compile(options)
    key = (built_from[phase], phase, programs_lib.signature(args))
    compiled = build() if programs is None else programs.get(key, build)
    timings['compile'] += time.perf_counter() - t
    return compiled

  def timed(phase, fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    timings[phase] += time.perf_counter() - t
    return out

  def layout(per_program: int) -> _Chunks:
    """The members in chunks of `per_program` on the devices: every chunk has one shape, so
    one program each phase."""
    k_padded = _round_up(k, per_program)  # chunks of padding alone would be wasted
    padded, flags = _pad_members(members, k_padded), None
    if as_data:
      sources, flags = data_inputs(model, structure, padded.sources, k_padded, image_shape)
      padded = padded._replace(sources=sources)
    chunked = lambda tree: [
        jax.tree.map(lambda x, i=i: x[i:i + per_program], tree)
        for i in range(0, k_padded, per_program)
    ]
    parts = [_to_global(part, sharded) for part in chunked((padded, flags))]
    datas = [_to_global(data, replicated)] * len(parts) if shared else [
        _to_global(part, sharded) for part in chunked(_pad_members(features.data, k_padded))
    ]
    return _Chunks([m for m, _ in parts], [f for _, f in parts], datas)

  fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
  init_args = lambda c, i: (c.members[i].init_keys, c.members[i].sources, c.flags[i], c.members[i].
                            train_idx, c.data[i])
  epoch_args = lambda c, state, i, epoch: (state, fold(c.members[i].shuffle_keys, epoch), c.members[
      i].train_idx, c.members[i].label_map, c.data[i])
  eval_args = lambda c, state, i: (state.variables(), c.members[i].test_idx, c.members[i].label_map,
                                   c.data[i])

  def trial(per_program: int) -> _Trial:
    """The members laid out in chunks of `per_program`, the first initialised, its programs
    compiled and their device bytes measured where the device has a limit."""
    chunks = layout(per_program)
    # Initialisation is random-number code that XLA optimises slowly and runs once: compiled at
    # LLVM -O1 it takes a fifth of the time, with the same values.
    init_fn = compile_('init', *init_args(chunks, 0), options=INIT_COMPILER_OPTIONS)
    first = timed('init', init_fn, *init_args(chunks, 0))
    args = epoch_args(chunks, first, 0, 0)
    fns = (init_fn, compile_('epoch', *args), compile_('evaluate', *eval_args(chunks, first, 0)))
    held = (args[:-1], () if shared else chunks.data[0])
    footprint = Footprint(per_program, max(map(program_bytes, fns)),
                          _device_bytes(held)) if limit else None
    return _Trial(chunks, first, fns, footprint)

  fits = lambda t: t.footprint.total(k) <= limit
  # Members per program: `chunk`, or as many as the device's memory holds, judged from the
  # compiled programs (a CPU reports no limit: a whole stack at once).
  run = trial(_round_up(min(chunk, size) if chunk else size, mesh.size))
  if not chunk and limit and not fits(run):
    low, high = trial(mesh.size), run
    if not fits(low):
      raise ValueError(f'one member per device needs {low.footprint.total(k) / 2**30:.2f} '
                       f'GiB of device memory, more than the {limit / 2**30:.2f} GiB a stack may '
                       'use: try a smaller --batch_size or --eval_batch_size, or a larger device')
    while (n := between(low.footprint, high.footprint, k, mesh.size, limit)):
      t = trial(n)
      low, high = (t, high) if fits(t) else (low, t)
    run = low
  chunks, first, (init_fn, epoch_fn, eval_fn), footprint = run
  per_program = chunks.members[0].init_keys.shape[0]
  states = [first] + [
      timed('init', init_fn, *init_args(chunks, i)) for i in range(1, len(chunks.members))
  ]
  parts = range(len(chunks.members))

  host = lambda xs: np.concatenate([_to_host(x) for x in xs])[:k]
  evaluate = lambda: host(
      [timed('evaluate', eval_fn, *eval_args(chunks, states[i], i)) for i in parts])
  metrics = np.zeros((k, 2), np.float32)
  test_acc = None
  for epoch in range(config.epochs):
    states, epoch_metrics = zip(
        *[timed('train', epoch_fn, *epoch_args(chunks, states[i], i, epoch)) for i in parts])
    metrics = host(epoch_metrics)
    if eval_every_epoch:
      test_acc = evaluate()
      metrics = np.concatenate([metrics, test_acc[:, None].astype(metrics.dtype)], 1)
    if on_epoch is not None:
      on_epoch(epoch, metrics)
  if test_acc is None:
    test_acc = evaluate()
  variables = jax.tree.map(lambda *xs: host(xs), *[s.variables() for s in states])
  return StackResult(variables, metrics[:, 1], metrics[:, 0], test_acc,
                     time.perf_counter() - start, timings, per_program, footprint)
