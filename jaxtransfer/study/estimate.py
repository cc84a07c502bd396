"""What a study costs before it runs (`--dry_run`): stacks, models, model-epochs, training FLOPs
and the wall time on this backend, from a probe of a few seconds on the trainer's own programs.

The time model, printed with every estimate:

  stack seconds = overhead
                + epochs * slots * train images per member * train FLOPs/image * s_per_flop
                + slots * test images per member * forward FLOPs/image * s_per_flop
  slots = ceil(K / devices)

* `s_per_flop`: the probe trains a base stack (every layer trained) with `trainer.train_stack`
  itself on this backend for three short epochs (16 batches plus the real epoch's partial one),
  and divides its faster steady-state epoch by its member-slots, images and training FLOPs.
  Under 'map' (CPU) a device runs its members in turn, so the probe uses one member per device
  and time grows with `slots`; under 'vmap' (accelerators) it uses the largest stack's K, and
  smaller stacks are charged as if time grew linearly with K (an upper bound: a GPU is less
  busy at small K).
* Time is proportional to training FLOPs (`jaxtransfer.nets.flops`: frozen layers pruned): a frozen
  stack costs its share of the full net's FLOPs. A frozen prefix under `fixed` whose output fits
  `--feature_budget_mb` is computed once (`features`): its forward pass is charged once per
  image, not per step (the small trained rest runs below the probe's FLOP rate, so these
  stacks are the least exact). Measured on CPU this holds to about 20% per
  structure (benchmarks/README.md).
* `overhead`: the probe stack's wall time less its epochs (compiling init, epoch and evaluate,
  initialising, one evaluation batch, copying results back), charged to every stack (the dry
  run keeps the persistent compilation cache off, so these are first-run compile times). Where
  stacks carry their structure as data (`trainer.structure_as_data`: on accelerators), later
  stacks reuse the first's programs, so there this is an upper bound.
* Not counted: checkpoint writes, results, figures, report and CKA at the end (about 20 s on 2
  CPU cores in the smoke study).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxtransfer.nets import flops
from jaxtransfer.train import trainer

PROBE_BATCHES = 16
PROBE_EPOCHS = 3  # the first compiles; the faster of the other two counts


class Probe(NamedTuple):
  """What the probe measured on this backend."""

  member_map: str
  devices: int
  members: int  # K of the probed stack (a multiple of `devices`)
  images: int  # training images per member in the probed epoch
  flops_per_image: int  # training FLOPs per image of the probed (base) structure
  epoch_seconds: float  # the faster of the steady-state epochs
  overhead: float  # the rest of the stack's wall time: compiling, initialising, evaluating
  load: float = 0.0  # the host's 1-minute load average just before the probe

  @property
  def seconds_per_flop(self) -> float:
    """Seconds per training FLOP of one member-slot (a device's members run in turn)."""
    slots = self.members // self.devices
    return self.epoch_seconds / (slots * self.images * self.flops_per_image)


def probe(model, config: trainer.TrainConfig, data: trainer.DeviceData, *, k: int, n_train: int,
          mesh: Mesh, member_map: str) -> Probe:
  """Train a stack of `k` members (rounded up to the devices) of `model`, every layer trained,
  with `trainer.train_stack` itself, for PROBE_EPOCHS short epochs: PROBE_BATCHES full batches
  plus the partial batch of an `n_train`-image epoch, then one evaluation batch."""
  devices = mesh.size
  k = -(-k // devices) * devices
  b = config.batch_size
  images = min(n_train, PROBE_BATCHES * b + n_train % b)
  num_classes = int(data.train_labels.max()) + 1
  tile = lambda row: jnp.tile(row, (k, 1))
  members = trainer.Members(
      init_keys=jax.random.split(jax.random.key(0),
                                 k), shuffle_keys=jax.random.split(jax.random.key(1), k),
      train_idx=tile(jnp.arange(images, dtype=jnp.int32)), test_idx=tile(
          jnp.arange(min(config.eval_batch_size, data.test_labels.shape[0]), dtype=jnp.int32)),
      label_map=tile(jnp.arange(num_classes, dtype=jnp.int32) % model.num_classes))
  stamps = []
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
  start = time.perf_counter()
  trainer.train_stack(model, trainer.Structure(), dataclasses.replace(config, epochs=PROBE_EPOCHS),
                      data, members, mesh=mesh, member_map=member_map,
                      on_epoch=lambda epoch, metrics: stamps.append(time.perf_counter()))
  total = time.perf_counter() - start
  epoch_seconds = min(b - a for a, b in zip(stamps, stamps[1:]))
  try:
    per_image = flops.training_flops_per_image(flops.layer_macs(model, data.train_images.shape[1:]))
  except ValueError:  # its layers cannot be counted one by one: the whole model's step
    per_image = flops.whole_model_flops(model, data.train_images.shape[1:])[0]
  return Probe(member_map, devices, k, images, per_image, epoch_seconds,
               total - PROBE_EPOCHS * epoch_seconds, load)


class StackCost(NamedTuple):
  """One stack of the plan, with what it costs."""

  name: str
  k: int
  trained_layers: int  # of `layers`: the rest are frozen
  layers: int
  train_images: int  # per member and epoch
  test_images: int  # per member
  train_flops_per_image: int
  train_flops: float  # the whole stack, every epoch
  eval_flops: float
  seconds: float
  done: bool  # finished in the workdir already: a run skips it, the estimate leaves it out


def member_flops_per_image(macs: Sequence[int], frozen: int,
                           prefix_once: bool = False) -> tuple[int, int, int]:
  """(training step, evaluation, prefix computed once) FLOPs per image of a stack's member whose
  first `frozen` layers are frozen; with `prefix_once` (`features`) the steps skip the prefix."""
  per_image = flops.training_flops_per_image(macs, frozen)
  forward = flops.forward_flops_per_image(macs)
  if not prefix_once:
    return per_image, forward, 0
  prefix = flops.forward_flops_per_image(macs[:frozen])
  return per_image - prefix, forward - prefix, prefix


class StackShape(NamedTuple):
  """What a stack's cost follows from (`driver.stack_shapes`)."""

  name: str
  k: int  # members
  frozen: int  # frozen layers, of `macs`
  macs: Sequence[int]  # per layer of its model (`flops.layer_macs`)
  train_images: int  # per member and epoch
  test_images: int  # per member
  prefix_once: bool = False  # the frozen prefix's output computed once (`features`)
  # A model whose layers cannot be counted one by one (`flops.layer_macs`): its layer count and
  # the whole model's (training step, forward) FLOPs per image (`flops.whole_model_flops`), by
  # which every stack is charged as a base stack (frozen layers not pruned: an upper bound).
  layers: int = 0
  whole: tuple[int, int] | None = None


def shape_flops(shape: StackShape) -> tuple[int, int, int]:
  """`member_flops_per_image` of a stack's shape, for either kind of count."""
  if shape.whole is not None:
    return shape.whole[0], shape.whole[1], 0
  return member_flops_per_image(shape.macs, shape.frozen, shape.prefix_once)


def whole_model_note(model: str) -> str:
  """What the estimate of a model counted as a whole leaves out."""
  return (f'note: the model `{model}` does not run slices of its layers (modelspec.runs_slices), '
          'so its FLOPs are the whole model\'s, from one traced forward and backward pass: '
          'frozen layers are not pruned, and frozen stacks are charged as base stacks (an upper '
          'bound)')


def stack_cost(shape: StackShape, *, epochs: int, probe_: Probe, done: bool) -> StackCost:
  """A stack's FLOPs and estimated seconds (the time model above). With `shape.prefix_once` the
  steps skip the frozen prefix's forward pass, computed once per image instead."""
  per_image, forward, prefix = shape_flops(shape)
  once = (shape.train_images + shape.test_images) * prefix
  slots = math.ceil(shape.k / probe_.devices)
  seconds = probe_.overhead + probe_.seconds_per_flop * slots * (
      epochs * shape.train_images * per_image + shape.test_images * forward + once)
  layers = shape.layers or len(shape.macs)
  return StackCost(shape.name, shape.k, layers - shape.frozen, layers, shape.train_images,
                   shape.test_images, per_image,
                   float(shape.k) * epochs * shape.train_images * per_image,
                   float(shape.k) * shape.test_images * forward, seconds, done)


def format_flops(x: float) -> str:
  """3 significant digits in the largest fitting unit: '2.95 PFLOP', '40.1 MFLOP'."""
  unit, scale = next(
      ((u, s) for u, s in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6)) if x >= s), ('', 1.0))
  return f'{x / scale:.3g} {unit}FLOP'


def duration(seconds: float) -> str:
  if seconds < 120:
    return f'{seconds:.0f} s'
  return f'{seconds / 60:.1f} min' if seconds < 7200 else f'{seconds / 3600:.1f} h'


def render_stacks(costs: Sequence[StackCost], epochs: int) -> list[str]:
  """The plan's table and its totals."""
  lines = [
      f'  {"#":>3s}  {"stack":24s} {"K":>3s}  {"trained":>7s}  {"img/member":>10s}  '
      f'{"MFLOP/img":>9s}  {"model-epochs":>12s}  {"training":>11s}  {"estimate":>9s}'
  ]
  for i, c in enumerate(costs):
    lines.append(f'  {i + 1:3d}  {c.name:24s} {c.k:3d}  {c.trained_layers:3d} of {c.layers:<1d}  '
                 f'{c.train_images:10,d}  {c.train_flops_per_image / 1e6:9.2f}  '
                 f'{c.k * epochs:12,d}  {format_flops(c.train_flops):>11s}  '
                 f'{"done" if c.done else duration(c.seconds):>9s}')
  todo = [c for c in costs if not c.done]
  lines.append(
      f'  {sum(c.k for c in costs)} models in {len(costs)} stacks, '
      f'{sum(c.k for c in costs) * epochs:,} model-epochs, '
      f'{format_flops(sum(c.train_flops for c in costs))} training (frozen layers pruned) + '
      f'{format_flops(sum(c.eval_flops for c in costs))} evaluation' +
      (f'; {len(costs) - len(todo)} stacks done already' if len(todo) < len(costs) else ''))
  return lines


def busy(load: float, cores: int | None) -> bool:
  """A host already this loaded shares its cores with the probe, which then measures a slower
  machine than the study may get: half the cores in use is where the two start to differ."""
  return load >= 0.5 * (cores or 1)


def render_probe(p: Probe, model_epoch_images: int) -> list[str]:
  """What was measured, and the time model's terms."""
  slots = p.members // p.devices
  per_model_epoch = p.seconds_per_flop * model_epoch_images * p.flops_per_image
  cores = os.cpu_count()
  warning = [
      f'note: the host was busy when the probe ran (load average {p.load:.1f} on {cores} cores): '
      'its rate, and so the estimate, reflect the shared machine; the FLOP counts above do not '
      'depend on it'
  ] if busy(p.load, cores) else []
  return warning + [
      f'probe (measured now on this backend): a base stack, K={p.members} over {p.devices} '
      f'device(s) under {p.member_map} ({slots} per device), {p.images:,} images per member: '
      f'{p.epoch_seconds:.2f} s per epoch -> {per_model_epoch:.2f} s per '
      f'{model_epoch_images:,}-image model-epoch per device-slot '
      f'({1 / p.seconds_per_flop / 1e9:.1f} GFLOP/s)',
      f'overhead per stack: {p.overhead:.1f} s (compiling, initialising, evaluating: the probe '
      'stack\'s wall time less its epochs)',
      'time model: stack = overhead + ceil(K / devices) x (epochs x train images x train '
      'FLOPs/image + test images x forward FLOPs/image) x seconds per FLOP of a slot; time '
      'proportional to FLOPs (frozen layers pruned); every stack compiles anew; not counted: '
      'checkpoints, results, figures, report, CKA (~20 s on 2 CPU cores)' +
      ('; under vmap, stacks smaller than the probe are charged linearly in K (an upper bound)'
       if p.member_map == 'vmap' else ''),
  ]


def total_seconds(costs: Sequence[StackCost]) -> float:
  return sum(c.seconds for c in costs if not c.done)
