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
  `lax.platform_dependent` (kernel gradients as canonical `[b, 0, 1, f]` convolutions whose
  output is a 3x3 kernel); none may be in an accelerator program, and the `cpu` export, as a
  control, must show them;
* no convolution computes a weight gradient: on accelerators the kernel gradient is a GEMM
  (`models.conv_same_gemm`), because XLA:GPU turns a grouped backward-filter convolution into a
  forward one with the whole image as its window. Every convolution must be a forward 3x3
  convolution of activations (canonical dimension numbers, a 3x3 kernel operand, as many output
  features per member as a layer's width), the stock `lax.conv_general_dilated` build's forward
  convolutions must all be among them (the rest are input gradients, one fewer per step than
  layers), and the weight gradients must be there as batched dot_generals with a `9 x Cin x
  Cout` result, one per conv layer and step body.

With `--study_programs` it then exports every stack of each study in STUDY_PROGRAMS (one
device, as on one GPU) for `cuda`, prints how many distinct programs the study compiles (module
text without `loc(...)`, hashed) and fails where that exceeds the study's limit: with every
structure as data (`trainer.structure_as_data`) and the stacks padded to the largest, one
program per phase and model. About 30 s of the CPU for `seed.flags` and 100 s for
`dissimilar.flags`, so `.ci/run` runs it apart from the tests.

Prints one line per platform and program; exits 1 with `error: ...` on the first failed check.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
import sys
import time
from typing import NamedTuple
from unittest import mock

K, DEVICES, BATCH, TRAIN_PER_MEMBER, TEST_PER_MEMBER = 20, 4, 64, 25_000, 5_000
WIDTHS, CLASSES, GLOBAL_CLASSES = (8, 16, 32), 5, 10
CONV_LAYERS = 2 * len(WIDTHS)
# Distinct programs a study may compile on one GPU: init, epoch and evaluate for each model
# shape (dissimilar halves have 4 and 6 classes).
STUDY_PROGRAMS = {'experiments/configs/seed.flags': 3, 'experiments/configs/dissimilar.flags': 6}
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

  @property
  def forward_3x3(self) -> bool:
    """A forward convolution of activations by a 3x3 kernel (the kernel operand's window)."""
    return self.dims == CANONICAL and self.rhs_shape[:2] == (3, 3)

  @property
  def rhs_shape(self) -> tuple[int, ...]:
    rhs = re.search(r'^\(tensor<[^>]*>, tensor<([\dx]+)x\w+>\)', self.types).group(1)
    return tuple(int(d) for d in rhs.split('x'))


class Summary(NamedTuple):
  convs: list[Conv]
  loops: int
  text: str

  @property
  def kernel_grad_gemms(self) -> list[str]:
    """dot_generals whose result is a member-batched `[members, 9, Cin, Cout]` kernel gradient."""
    return re.findall(r'stablehlo\.dot_general .* -> (tensor<\d+x9x\d+x\d+xf32>)', self.text)


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


def abstract_inputs(mesh, k: int = K):
  """ShapeDtypeStructs of a seed stack's arguments (`k` members): member args split over the
  mesh."""
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
  keys = s((k,), jax.random.key(0).dtype)
  return data, keys, s((k, TRAIN_PER_MEMBER), jnp.int32), s((k, TEST_PER_MEMBER), jnp.int32), s(
      (k, GLOBAL_CLASSES), jnp.int32)


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
    state = jax.eval_shape(fns.init, keys, None, None, train_idx, data)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=keys.sharding),
                         state)
    args = {
        'init': (fns.init, (keys, None, None, train_idx, data)),
        'epoch': (fns.epoch, (state, keys, train_idx, label_map, data)),
        'evaluate': (fns.evaluate, (state.variables(), test_idx, label_map, data)),
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
  widths = {per_device * w for w in WIDTHS}
  not_forward = [c for c in got.convs if not c.forward_3x3 or c.out_shape[-1] not in widths]
  check(
      not not_forward, f'{platform} {name}: {len(not_forward)} convolutions are not forward 3x3 '
      f'convolutions of activations (a weight gradient?), e.g. {not_forward[:1]}')
  mine, stock_forward = collections.Counter(c[:4] for c in got.convs), collections.Counter(
      c[:4] for c in stock.convs if c.dims == CANONICAL)
  check(not stock_forward - mine,
        f'{platform} {name}: forward convolutions differ from the stock lax.conv build')
  # Per step body (counted, not assumed: a program may hold several), the stock build has a
  # forward convolution per layer, an input gradient for all but the first, and a kernel
  # gradient per layer; here the kernel gradients are GEMMs.
  bodies = sum(c.dims == KERNEL_GRAD_AUTODIFF for c in stock.convs) // CONV_LAYERS
  input_grads = len(got.convs) - sum(stock_forward.values())
  gemms = got.kernel_grad_gemms
  check(
      input_grads == bodies * (CONV_LAYERS - 1) and len(gemms) == bodies * CONV_LAYERS,
      f'{platform} {name}: {input_grads} input-gradient convolutions and {len(gemms)} kernel-'
      f'gradient GEMMs for {bodies} step bodies')
  detail = f'{sum(stock_forward.values())} forward, {input_grads} input-grad'
  convs = (f'{len(got.convs)} convolutions ({detail}), all forward 3x3 convolutions of '
           f'activations grouped by the {per_device} members of a device; {len(gemms)} '
           'kernel-gradient GEMMs' if got.convs else 'no convolutions')
  return f'{convs}; {got.loops} loop(s); member arguments split over {DEVICES} devices'


def program_key(text: str) -> str:
  """sha256 of a module's text without its source locations: equal for the same program."""
  text = '\n'.join(line for line in text.splitlines() if not line.startswith('#loc'))
  return hashlib.sha256(re.sub(r' loc\(#loc\d*\)', '', text).encode()).hexdigest()


def study_programs(flagfile: str, platform: str = 'cuda') -> dict[str, list[str]]:
  """{program: [key per stack]} of init/epoch/evaluate of every stack of the study `flagfile`
  names, exported for `platform` on one device (CIFAR-sized halves, members under vmap)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from experiments import main as cli
  from jaxtransfer import config as config_lib, transfer
  from jaxtransfer.data import cifar
  from jaxtransfer.nets import modelspec
  from jaxtransfer.study import context, plan as plan_lib
  from jaxtransfer.train import trainer
  cli.FLAGS([sys.argv[0], f'--flagfile={flagfile}', '--workdir=unused'])
  config = cli.config_from_flags()  # validated and normalised, as the CLI sees it
  tconfig = context.train_config(config, cli.from_flags(config_lib.RunOptions))
  make = modelspec.factory(config.model, config.widths, config.layer_defaults)
  example = jnp.zeros((1,) + cifar.IMAGE_SHAPE, jnp.float32)
  layer_names = tuple(transfer.layer_order(make(2), example, train=False))
  halves = plan_lib.make_halves(config, cifar.CIFAR10_CLASSES)
  mesh = jax.make_mesh((1,), (trainer.MODEL_AXIS,), devices=jax.devices('cpu')[:1])
  sharded = NamedSharding(mesh, P(trainer.MODEL_AXIS))
  keys = {name: [] for name in ('init', 'epoch', 'evaluate')}
  stacks = plan_lib.plan(config, layer_names, halves)
  for stack in stacks:
    k, classes = len(stack.runs), len(plan_lib.half_classes(halves, 0, stack.runs[0].target))
    model = make(classes)
    as_data = trainer.structure_as_data(model, stack.structure, tconfig, cifar.IMAGE_SHAPE, 'vmap',
                                        k, classes * 5_000)
    if as_data:  # padded to the study's largest stack, as the driver's `train_stack` calls
      k = plan_lib.largest(stacks)
    data, _, train_idx, test_idx, label_map = abstract_inputs(mesh)
    s = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded)
    train_idx, test_idx = s((k, classes * 5_000)), s((k, classes * 1_000))
    init_keys, label_map = s((k,), jax.random.key(0).dtype), s((k, GLOBAL_CLASSES))
    sources = None
    if stack.structure.graft_layers:
      shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example, train=False))
      prefix = {
          c: {n: sub[n] for n in stack.structure.graft_layers if n in sub}
          for c, sub in shapes.items()
      }
      sources = jax.tree.map(lambda x: s((k,) + x.shape, x.dtype), prefix)
    structure, flags = stack.structure, None
    if as_data:
      inputs = jax.eval_shape(
          lambda: trainer.data_inputs(model, structure, sources, k, cifar.IMAGE_SHAPE))
      sources, flags = jax.tree.map(lambda x: s(x.shape, x.dtype), inputs)
      structure = None
    stack_trainer = trainer.Trainer(model, structure, tconfig, example)
    fns = trainer.stack_functions(stack_trainer, mesh, 'vmap')
    state = jax.tree.map(lambda x: s(x.shape, x.dtype),
                         jax.eval_shape(fns.init, init_keys, sources, flags, train_idx, data))
    for name, fn, args in (('init', fns.init, (init_keys, sources, flags, train_idx, data)),
                           ('epoch', fns.epoch, (state, init_keys, train_idx, label_map, data)),
                           ('evaluate', fns.evaluate, (state.variables(), test_idx, label_map,
                                                       data))):
      keys[name].append(
          program_key(jax.export.export(fn, platforms=(platform,))(*args).mlir_module()))
  return keys


class _Done(Exception):
  """The checks are done; the study's program count (slow: every stack exported) was not asked
  for."""


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
    # XLA's kernel gradient: x [f, 0, 1, b] by dy [i, 0, 1, o], so its window is dy's image.
    refused = [c for c in stock['epoch'][0].convs if not c.forward_3x3]
    weight_grads = [c for c in refused if c.dims == KERNEL_GRAD_AUTODIFF]
    windows = sorted({'x'.join(map(str, c.rhs_shape[1:3])) for c in weight_grads})
    check(
        len(weight_grads) == CONV_LAYERS and '3x3' not in windows, f'control: the stock '
        f'cuda epoch has {len(weight_grads)} kernel-gradient convolutions, windows {windows}')
    print(
        f'control cuda  epoch on stock lax.conv: {len(weight_grads)} weight-gradient '
        f'convolutions (windows {", ".join(windows)}); the check above refuses {len(refused)} of '
        'its convolutions', flush=True)
    looped, _ = export_stack('cuda', member_map='map', programs=('epoch',))['epoch']
    grouped = sum(c.feature_groups > 1 or c.batch_groups > 1 for c in looped.convs)
    check(looped.loops == OWN_LOOPS['epoch'] + 1 and grouped == 0,
          f'control: the map build has {looped.loops} loops, {grouped} grouped convolutions')
    print(
        f'control cuda  epoch with member_map=map: {looped.loops} loops, {grouped} grouped '
        'convolutions: members in turn', flush=True)
    if '--study_programs' not in sys.argv[1:]:
      raise _Done
    for flagfile, limit in STUDY_PROGRAMS.items():
      t = time.perf_counter()
      programs = study_programs(flagfile)
      stacks = len(programs['init'])
      total = sum(len(set(v)) for v in programs.values())
      detail = ', '.join(f'{name} {len(set(v))}/{len(v)}' for name, v in programs.items())
      print(
          f'study {flagfile}: {stacks} stacks, {3 * stacks} programs, {total} distinct '
          f'({detail}), exported for cuda on one device in {time.perf_counter() - t:.0f} s',
          flush=True)
      check(total <= limit, f'{flagfile} compiles {total} distinct programs, more than {limit}')
  except _Done:
    pass
  except CheckError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'ok: {" and ".join(PLATFORMS)} export in {time.perf_counter() - start:.0f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
