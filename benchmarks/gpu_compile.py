r"""What XLA:GPU makes of the trainer's programs, compiled on this CPU for an H100 and an H200.

Not run in CI: it needs the CUDA plugin (about 480 MB), with jaxlib's version, and no GPU:

  pip install jax-cuda12-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')
  python -m benchmarks.gpu_compile                      # ~3-6 min on 2 CPU cores
  python -m benchmarks.gpu_compile --stock_kernel_grad  # before: lax's own kernel gradients
  python -m benchmarks.gpu_compile --targets=h100_sxm --frozen=0

The seed study's programs (FinalNet (8, 16, 32), 5 classes, batch 64, 25,000 training and 5,000
test indices per member, members under vmap) at its largest stack, K = 20, on one device, are
lowered from shapes and compiled against a compile-only client for each GPU target
(`benchmarks/gpu_targets/*.txtpb`, GpuTargetConfig protos: an H100 SXM as XLA specifies it, an
H200 as the H100 with 4.8 TB/s and 141 GB). Per program it prints:

* kernels per step: the instructions of the epoch's loop body (the scan over batches) that
  launch work (fusions, library calls, copies...; not parameters, tuples, bitcasts, constants),
  and how many of them are GEMMs (Triton GEMM fusions or cuBLAS calls);
* the cuDNN/cuBLAS calls by target, and every cuDNN convolution's window (with the GEMM kernel
  gradient, `models.conv_same_gemm`, all are 3x3; with `--stock_kernel_grad` the vmapped
  weight gradients become forward convolutions with the whole 8x8, 16x16, 32x32 image as window);
* `memory_analysis()`: arguments, outputs and temporaries;
* compile seconds (lowering excluded). No autotuning happens without a GPU, so the kernels a real
  run picks may differ; counts, windows and memory are XLA's own.

The frozen depths are compiled in (`trainer.Structure`: the prefix's backward pass pruned), to
show what pruning saves per step. A study on a GPU trains every structure with one program
(`trainer.structure_as_data`), which computes what `--frozen=0` does plus the masks.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import os
import re
import sys
import time
from unittest import mock

TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')
K, BATCH = 20, 64  # the member count and batch of the programs compiled here
WIDTHS, CLASSES = (8, 16, 32), 5
# Instructions that launch nothing: bookkeeping of the loop's carried tuple and of layouts.
NO_LAUNCH = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'opt-barrier'}


def computation(text: str, name: str) -> list[str]:
  """The instruction lines of computation `name` in compiled HLO text."""
  match = re.search(rf'^(?:ENTRY )?%?{re.escape(name)} .*?\{{\n(.*?)^\}}', text, re.M | re.S)
  return [line.strip() for line in match.group(1).splitlines() if '=' in line] if match else []


def opcode(line: str) -> str:
  """The opcode of an HLO instruction line: `%x = f32[...]{...} fusion(...)` -> 'fusion'."""
  rhs = line.split(' = ', 1)[1]
  # The result type may be a tuple with spaces: skip it by matching the first `word(`.
  return re.search(r'(?:^|[\s)}\]])([a-z][\w-]*)\(', rhs).group(1)


def loop_body(text: str) -> list[str]:
  """The largest while body of the module (the epoch's scan over batches)."""
  bodies = re.findall(r'\bwhile\(.*?body=%?([\w.\-]+)', text)
  return max((computation(text, b) for b in bodies), key=len, default=[])


def summarize(text: str) -> dict:
  body = loop_body(text)
  launches = [line for line in body if opcode(line) not in NO_LAUNCH]
  calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  windows = collections.Counter(
      re.search(r'window=\{size=(\S+?)[ }]', line).group(1)
      for line in text.splitlines()
      if 'custom_call_target="__cudnn$conv' in line and 'window={size=' in line)
  # XLA:GPU's GEMMs: Triton GEMM fusions (`%gemm_fusion...`) or cuBLAS calls.
  gemms = [line for line in launches if line.startswith('%gemm_fusion') or '$cublas' in line]
  return {
      'kernels_per_step': len(launches), 'gemms_per_step': len(gemms),
      'by_opcode': collections.Counter(opcode(line) for line in launches), 'calls': calls,
      'windows': windows
  }


def abstract(mesh, k: int):
  """The seed stack's arguments as `export_check` builds them, plus the members' sharding."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from experiments import export_check
  from jaxtransfer.train import trainer
  return (*export_check.abstract_inputs(mesh, k), NamedSharding(mesh, P(trainer.MODEL_AXIS)))


def compile_programs(target: str, frozen: int | None, programs: tuple[str, ...], k: int):
  """{program: (compiled HLO text, memory analysis, `trainer.program_bytes`, compile seconds)} for
  one target; `frozen`
  None: the structure as data (`trainer.LayerFlags`), the one program a study on a GPU trains
  every structure with."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jaxtransfer.nets import models
  from jaxtransfer.train import trainer
  with open(os.path.join(TARGETS_DIR, f'{target}.txtpb')) as f:
    topo = topologies.get_topology_desc(platform='cuda', target_config=f.read(), topology='1x1x1')
  mesh = topologies.make_mesh(topo=topo, mesh_shape=(1,), axis_names=(trainer.MODEL_AXIS,))
  model = models.FinalNet(CLASSES, WIDTHS)
  layers = [f'conv{i + 1}' for i in range(frozen or 0)]
  structure = trainer.Structure(graft_layers=tuple(layers), frozen_layers=tuple(layers))
  stack_trainer = trainer.Trainer(model, None if frozen is None else structure,
                                  trainer.TrainConfig(batch_size=BATCH), jnp.zeros((1, 32, 32, 3)))
  fns = trainer.stack_functions(stack_trainer, mesh, 'vmap')
  data, keys, train_idx, test_idx, label_map, sharded = abstract(mesh, k)
  sources = flags = None
  if frozen is None:  # every layer's sources and the flags, as `train_stack` passes them
    sources, flags = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded),
        jax.eval_shape(lambda: trainer.data_inputs(model, structure, None, k, (32, 32, 3))))
  elif layers:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), stack_trainer.example))
    sources = {c: {n: sub[n] for n in layers} for c, sub in shapes.items()}
    sources = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((k,) + x.shape, x.dtype, sharding=sharded), sources)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded),
                       jax.eval_shape(fns.init, keys, sources, flags, train_idx, data))
  args = {
      'epoch': (fns.epoch, (state, keys, train_idx, label_map, data)),
      'evaluate': (fns.evaluate, (state.variables(), test_idx, label_map, data)),
  }
  out = {}
  for name in programs:
    fn, fn_args = args[name]
    lowered = fn.lower(*fn_args)
    start = time.perf_counter()
    compiled = lowered.compile()
    out[name] = (compiled.as_text(), compiled.memory_analysis(), trainer.program_bytes(compiled),
                 time.perf_counter() - start)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--targets', default='h100_sxm,h200_sxm',
                      help=f'comma-separated names of {TARGETS_DIR}/*.txtpb')
  parser.add_argument(
      '--frozen', default='0,2,4,6',
      help='frozen prefix depths of the epoch programs (0: every layer trained; "data": the '
      "structure as data, a GPU study's one program)")
  parser.add_argument('--k', type=int, default=K, help='members per stack (the seed\'s largest)')
  parser.add_argument(
      '--stock_kernel_grad', action='store_true',
      help="build the net on stock lax.conv_general_dilated: XLA's own kernel "
      'gradients (before models.conv_same_gemm)')
  args = parser.parse_args(argv)
  # The CPU is the only backend; the CUDA plugin then registers without looking for a driver,
  # and its compiler serves the compile-only topology.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  try:
    import jax
    importlib.import_module('jax.experimental.topologies')  # the compile-only client's
  except ImportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  from jax import lax
  from jaxtransfer.nets import models
  patch = (mock.patch.object(models, 'conv_general_dilated', lax.conv_general_dilated)
           if args.stock_kernel_grad else contextlib.nullcontext())
  grad = ("stock lax kernel gradients"
          if args.stock_kernel_grad else 'GEMM kernel gradients (models.conv_same_gemm)')
  print(
      f'gpu compile: FinalNet{WIDTHS}, K={args.k} under vmap, batch {BATCH}, {grad}; '
      f'jax {jax.__version__}', flush=True)
  depths = [None if d == 'data' else int(d) for d in args.frozen.split(',') if d != '']
  with patch:
    for target in args.targets.split(','):
      if not os.path.exists(os.path.join(TARGETS_DIR, f'{target}.txtpb')):
        print(
            f'error: no GPU target {target}: expected one of '
            f'{sorted(f[:-6] for f in os.listdir(TARGETS_DIR))}', file=sys.stderr)
        return 1
      for i, frozen in enumerate(depths):
        programs = ('epoch', 'evaluate') if i == 0 else ('epoch',)  # evaluate: one structure
        try:
          compiled = compile_programs(target, frozen, programs, args.k)
        except Exception as e:  # noqa: BLE001 -- e.g. no plugin: say so in one line
          print(
              f'error: compiling for {target} failed ({type(e).__name__}: '
              f'{str(e).splitlines()[0] if str(e) else ""}); is jax-cuda12-plugin=='
              f'{jax.__version__} installed?', file=sys.stderr)
          return 1
        for name, (text, memory, held, seconds) in compiled.items():
          got = summarize(text)
          cudnn = {t: n for t, n in got['calls'].items() if 'cudnn' in t or 'cublas' in t}
          windows = ', '.join(f'{w} x{n}' for w, n in sorted(got['windows'].items()))
          mem = (f'args {memory.argument_size_in_bytes / 1e6:.0f} MB, temp '
                 f'{memory.temp_size_in_bytes / 1e6:.0f} MB, out '
                 f'{memory.output_size_in_bytes / 1e6:.0f} MB; {held / 1e6:.0f} MB held while it '
                 'runs (trainer.program_bytes, what chunks are sized by)' if memory else 'n/a')
          kernels = (f'{got["kernels_per_step"]} kernels ({got["gemms_per_step"]} GEMMs) per '
                     f'{"step" if name == "epoch" else "batch"}')
          what = 'as data' if frozen is None else f'frozen {frozen}'
          print(
              f'{target} {name:8s} {what}: compiled in {seconds:5.1f} s; {kernels}; '
              f'conv windows: {windows or "none"}; memory: {mem}', flush=True)
          print(f'    calls: {dict(sorted(cudnn.items()))}', flush=True)
          print(f'    step body by opcode: {dict(got["by_opcode"].most_common())}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
