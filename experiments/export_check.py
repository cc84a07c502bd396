r"""Compiles the trainer for GPU and TPU without either: the seed stack's programs, exported.

  python -m experiments.export_check          # ~20 s on 2 CPU cores; tests/test_export.py runs it

The real stack functions (`trainer.stack_functions`: init, epoch, evaluate, as `train_stack` runs
them) of a seed-sized stack -- FinalNet (8, 16, 32), 5 classes, K = 20, batch 64, 25,000
training indices per member, CIFAR-shaped uint8 data -- are lowered from shapes alone with
`jax.export` for `cuda` and for `tpu`, members under `vmap` (the accelerators' member map), the
model axis sharded over a mesh of 4 (CPU) devices. In the exported StableHLO it checks:

* sharding: the module declares the 4-device `models` mesh and every member argument is split
  along it;
* batching: every convolution has `feature_group_count` (or `batch_group_count`) = K / devices
  = 5, i.e. one kernel computes all of a device's members, and the only loops are the
  program's own (epoch: the scan over batches; evaluate: the batches of the test set) -- no
  loop over members (the `lax.map` build, checked as a control, has one more and ungrouped
  convolutions);
* no CPU-only code: `models.conv_general_dilated` routes CPU through a hand-written VJP behind
  `lax.platform_dependent`. An accelerator program must hold exactly the convolutions of the
  same stack built on stock `lax.conv_general_dilated` (same dimension numbers, shapes and group
  counts), including XLA's own kernel gradients (`[f, 0, 1, b]x[i, 0, 1, o]->[0, 1, b, f]`) and
  none of the hand-written ones (canonical `[b, 0, 1, f]` convolutions whose output is a 3x3
  kernel). The `cpu` export, as a control, must show the opposite.

Prints one line per platform and program; exits 1 with `error: ...` on the first failed check.
"""

from __future__ import annotations

import collections
import contextlib
import re
import sys
import time
from typing import NamedTuple
from unittest import mock

K, DEVICES, BATCH, TRAIN_PER_MEMBER, TEST_PER_MEMBER = 20, 4, 64, 25_000, 5_000
WIDTHS, CLASSES, GLOBAL_CLASSES = (8, 16, 32), 5, 10
PLATFORMS = ('cuda', 'tpu')
KERNEL_GRAD_AUTODIFF = '[f, 0, 1, b]x[i, 0, 1, o]->[0, 1, b, f]'
CANONICAL = '[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]'


class Conv(NamedTuple):
  """One `stablehlo.convolution` of a module's text."""

  dims: str
  feature_groups: int
  batch_groups: int
  types: str  # '(lhs, rhs) -> out' tensor types
  out_shape: tuple[int, ...]

  @property
  def handwritten_kernel_grad(self) -> bool:
    """The CPU VJP's kernel gradient: canonical labels, a 3x3 'image' out (the kernel)."""
    return self.dims == CANONICAL and self.out_shape[1:3] == (3, 3)


class Summary(NamedTuple):
  convs: list[Conv]
  loops: int
  text: str


def convolutions(text: str) -> list[Conv]:
  out = []
  for line in text.splitlines():
    if 'stablehlo.convolution' not in line:
      continue
    dims = re.search(r'dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])', line).group(1)
    groups = {k: int(v) for k, v in re.findall(r'(\w+_group_count) = (\d+)', line)}
    types = re.search(r' : (\(tensor<.*?>\) -> tensor<[^>]*>)', line).group(1)
    out_shape = tuple(
        int(d) for d in re.search(r'-> tensor<([\dx]+)x\w+>$', types).group(1).split('x'))
    out.append(
        Conv(dims, groups['feature_group_count'], groups['batch_group_count'], types, out_shape))
  return out


def summarize(text: str) -> Summary:
  return Summary(convolutions(text), len(re.findall(r'stablehlo\.while', text)), text)


class CheckError(AssertionError):
  pass


def check(ok: bool, message: str) -> None:
  if not ok:
    raise CheckError(message)


def abstract_inputs(mesh):
  """ShapeDtypeStructs of a seed stack's arguments: member args split over the mesh."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxtransfer.train import trainer
  sharded, replicated = NamedSharding(mesh, P(trainer.MODEL_AXIS)), NamedSharding(mesh, P())
  s = lambda shape, dtype, sh=sharded: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  data = trainer.DeviceData(s((50_000, 32, 32, 3), jnp.uint8, replicated),
                            s((50_000,), jnp.int32, replicated),
                            s((10_000, 32, 32, 3), jnp.uint8, replicated),
                            s((10_000,), jnp.int32, replicated), s((3,), jnp.float32, replicated),
                            s((3,), jnp.float32, replicated))
  keys = s((K,), jax.random.key(0).dtype)
  return data, keys, s((K, TRAIN_PER_MEMBER), jnp.int32), s((K, TEST_PER_MEMBER), jnp.int32), s(
      (K, GLOBAL_CLASSES), jnp.int32)


def export_stack(
    platform: str, member_map: str = 'vmap', stock_conv: bool = False,
    programs=('init', 'epoch', 'evaluate')
) -> dict[str, tuple[Summary, float]]:
  """{program: (summary, seconds)} of the seed stack's programs exported for `platform`.
  `stock_conv`: build the net on plain `lax.conv_general_dilated` (the reference)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jaxtransfer.nets import models
  from jaxtransfer.train import trainer
  mesh = jax.make_mesh((DEVICES,), (trainer.MODEL_AXIS,), devices=jax.devices('cpu')[:DEVICES])
  patch = (mock.patch.object(models, 'conv_general_dilated', lax.conv_general_dilated)
           if stock_conv else contextlib.nullcontext())
  data, keys, train_idx, test_idx, label_map = abstract_inputs(mesh)
  out = {}
  with patch:
    stack_trainer = trainer.Trainer(models.FinalNet(CLASSES, WIDTHS), trainer.Structure(),
                                    trainer.TrainConfig(batch_size=BATCH), jnp.zeros(
                                        (1, 32, 32, 3)))
    fns = trainer.stack_functions(stack_trainer, mesh, member_map)
    state = jax.eval_shape(fns.init, keys, None, data)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=keys.sharding),
                         state)
    args = {
        'init': (fns.init, (keys, None, data)),
        'epoch': (fns.epoch, (state, keys, train_idx, label_map, data)),
        'evaluate': (fns.evaluate, (state, test_idx, label_map, data)),
    }
    for name in programs:
      fn, fn_args = args[name]
      start = time.perf_counter()
      exported = jax.export.export(fn, platforms=(platform,))(*fn_args)
      check(
          exported.platforms == (platform,) and exported.nr_devices == DEVICES,
          f'{platform} {name}: exported for {exported.platforms} on {exported.nr_devices} '
          'devices')
      out[name] = summarize(exported.mlir_module()), time.perf_counter() - start
  return out


# Loops a program has of its own, whatever the member map: the epoch's scan over batches, the
# evaluation's batches of the test set.
OWN_LOOPS = {'init': 0, 'epoch': 1, 'evaluate': 1}


def check_accelerator(platform: str, name: str, got: Summary, stock: Summary) -> str:
  per_device = K // DEVICES
  main = re.search(r'func\.func public @main\((.*?)\) ->', got.text).group(1)
  args = re.split(r'%arg\d+: ', main)[1:]
  # Shardy ('sdy.sharding<@mesh, [{"models"}, ...') or GSPMD ('{devices=[4,...') annotations.
  split = lambda arg: '{"models"}' in arg or f'devices=[{DEVICES},' in arg
  unsplit = [i for i, arg in enumerate(args) if arg.startswith(f'tensor<{K}x') and not split(arg)]
  check(
      args and not unsplit, f'{platform} {name}: member arguments {unsplit} not split over '
      f'the {DEVICES}-device models axis')
  check(got.loops == OWN_LOOPS[name],
        f'{platform} {name}: {got.loops} loops, expected {OWN_LOOPS[name]}: a loop over members?')
  ungrouped = [c for c in got.convs if per_device not in (c.feature_groups, c.batch_groups)]
  check(
      not ungrouped, f'{platform} {name}: {len(ungrouped)} convolutions not batched over the '
      f'{per_device} members of a device, e.g. {ungrouped[:1]}')
  handwritten = [c for c in got.convs if c.handwritten_kernel_grad]
  check(not handwritten, f'{platform} {name}: {len(handwritten)} hand-written (CPU) kernel '
        'gradients')
  same = collections.Counter(c[:4] for c in got.convs) == collections.Counter(
      c[:4] for c in stock.convs)
  check(same, f'{platform} {name}: convolutions differ from the stock lax.conv build')
  forms = collections.Counter(
      'kernel-grad' if c.dims == KERNEL_GRAD_AUTODIFF else 'forward' if c.dims ==
      CANONICAL else 'input-grad' for c in got.convs)
  detail = ', '.join(f'{n} {form}' for form, n in sorted(forms.items()))
  convs = (f'{len(got.convs)} convolutions ({detail}), each grouped by the {per_device} members '
           'of a device, the same as on stock lax.conv' if got.convs else 'no convolutions')
  return f'{convs}; {got.loops} loop(s); member arguments split over {DEVICES} devices'


def main() -> int:
  import jax
  jax.config.update('jax_num_cpu_devices', DEVICES)  # before any device is touched
  print(
      f'export check: FinalNet{WIDTHS} {CLASSES} classes, K={K} over {DEVICES} devices, batch '
      f'{BATCH}, {TRAIN_PER_MEMBER:,} training indices per member, members under vmap; '
      f'jax {jax.__version__}', flush=True)
  start = time.perf_counter()
  try:
    stock = export_stack('cuda', stock_conv=True, programs=('epoch', 'evaluate'))
    for platform in PLATFORMS:
      for name, (got, seconds) in export_stack(platform).items():
        ref = stock.get(name, (Summary([], 0, ''),))[0]
        print(
            f'{platform:5s} {name:8s} exported in {seconds:4.1f} s: '
            f'{check_accelerator(platform, name, got, ref)}', flush=True)
    # Controls: the checks above can fail. The CPU program holds the hand-written VJP; the
    # loop build ('map') loops over members with ungrouped convolutions.
    cpu, _ = export_stack('cpu', programs=('epoch',))['epoch']
    handwritten = sum(c.handwritten_kernel_grad for c in cpu.convs)
    autodiff = sum(c.dims == KERNEL_GRAD_AUTODIFF for c in cpu.convs)
    check(
        handwritten > 0 and autodiff == 0, f'control: the cpu epoch has {handwritten} '
        f'hand-written and {autodiff} autodiff kernel gradients')
    print(
        f'control cpu   epoch: {handwritten} hand-written kernel gradients, {autodiff} of '
        "XLA's: the CPU VJP is there, and only there", flush=True)
    looped, _ = export_stack('cuda', member_map='map', programs=('epoch',))['epoch']
    grouped = sum(c.feature_groups > 1 or c.batch_groups > 1 for c in looped.convs)
    check(looped.loops == OWN_LOOPS['epoch'] + 1 and grouped == 0,
          f'control: the map build has {looped.loops} loops, {grouped} grouped convolutions')
    print(
        f'control cuda  epoch with member_map=map: {looped.loops} loops, {grouped} grouped '
        'convolutions: members in turn', flush=True)
  except CheckError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'ok: {" and ".join(PLATFORMS)} export in {time.perf_counter() - start:.0f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
