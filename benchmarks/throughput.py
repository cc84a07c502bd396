r"""Training throughput of the stacked trainer (steady state, compilation excluded).

Times the trainer's jitted epoch function -- the one `trainer.train_stack` builds: shard_map over
the model axis, members under `lax.map` ('map') or `jax.vmap` ('vmap'), each member's epoch a
`lax.scan` of optimiser steps -- on random uint8 images of CIFAR shape, FinalNet, batch 64,
Adam. Variants (K members, member map, frozen prefix depth) are compiled first, then run in
interleaved rounds; each figure is the best of the rounds (the median is printed too).

Per variant: images/s, seconds per 25,000-image model-epoch, GFLOP/s against the analytic
count of `jaxtransfer.nets.flops` (~15.06 MFLOP for FinalNet (8, 16, 32) fine-tuning all layers), the
speed-up over one model at a time (K=1) of the same structure, and on a GPU/TPU whose
`device_kind` is in PEAK_TFLOPS, the fraction of its peak FLOP/s.

  python benchmarks/throughput.py --quick   # < 60 s: K=1 vs stacked K=2, 4 ('map')
  python benchmarks/throughput.py           # minutes: K=1, 2, 4, 8 x map/vmap, frozen 2, 4, 6

On a GPU or TPU the same commands time K=1 against map and vmap at K = 10, 20, 40 (quick:
vmap at K = 20), 6,400 images per member per timed epoch, frozen variants under vmap.
  python benchmarks/throughput.py --baseline --ks=2 --maps=map --frozen=  # + stock flax conv
  python benchmarks/throughput.py --env='' --env='XLA_FLAGS=--xla_cpu_multi_thread_eigen=false'

The last line is `stacked_s_per_model_epoch=<float>`: the fastest stacked setting (K > 1) of
the headline configuration (fine-tuning all layers). With --env, each setting runs in its own
child process (XLA flags and device counts are per process), alternating, --env_rounds times.

Method: by default the trainer's internals (`Trainer`, `stack_functions`), exactly as
`train_stack` compiles them; if they are missing or their signatures changed, it falls back to
timing whole `train_stack` calls (consecutive epochs, via `on_epoch` timestamps; the first epoch,
which compiles, is dropped), where variants cannot be interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import time

MODEL_EPOCH = 25_000  # images in one model-epoch (half of CIFAR-10's training set)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true', help='< 60 s: few variants, small epochs')
  p.add_argument(
      '--n_per_member', type=int, default=None,
      help='training images per member per timed epoch (default 1280; quick 640; '
      'GPU/TPU 6400)')
  p.add_argument('--ks', default=None,
                 help='stacked K values (default 2,4,8; quick 2,4; GPU/TPU 10,20,40; quick 20)')
  p.add_argument('--maps', default=None,
                 help="member maps (default map,vmap; quick map; GPU/TPU quick vmap)")
  p.add_argument(
      '--frozen', default=None,
      help='frozen prefix depths n (graft + freeze conv1..conv_n) (default 2,4,6; '
      "quick none); timed at K=1 and at the largest K with the platform's member map")
  p.add_argument('--rounds', type=int, default=None, help='interleaved timing rounds (default 3)')
  p.add_argument('--widths', default='8,16,32')
  p.add_argument('--num_classes', type=int, default=5)
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument(
      '--cpu_devices', type=int, default=0,
      help='set jax_num_cpu_devices (0: leave as is); with >1 devices, stacked variants '
      'are also timed with the model axis sharded over all devices')
  p.add_argument(
      '--fixed', default='6',
      help="frozen depths timed under --frozen_batchnorm=fixed, where the study trains "
      "on the frozen prefix's output computed once ('' for none)")
  p.add_argument('--baseline', action='store_true',
                 help='also time the same net with stock flax convolutions (autodiff VJP)')
  p.add_argument('--method', choices=('auto', 'internal', 'api'), default='auto')
  p.add_argument('--env', action='append', default=None,
                 help="'VAR=VALUE VAR2=VALUE2' settings, each run in child processes (repeatable)")
  p.add_argument('--env_rounds', type=int, default=2)
  p.add_argument('--json', action='store_true', help=argparse.SUPPRESS)  # child output
  args = p.parse_args(argv)
  args.rounds = args.rounds or 3
  args.widths = tuple(_ints(args.widths))
  args.fixed = _ints(args.fixed)
  return args


def resolve_defaults(args, backend: str) -> None:
  """The per-platform defaults of the options left unset (after JAX picked its backend)."""
  quick, cpu = args.quick, backend == 'cpu'
  args.n_per_member = args.n_per_member or (640 if quick else 1280 if cpu else 6400)
  ks = ('2,4' if quick else '2,4,8') if cpu else ('20' if quick else '10,20,40')
  args.ks = _ints(args.ks if args.ks is not None else ks)
  maps = ('map' if quick else 'map,vmap') if cpu else ('vmap' if quick else 'map,vmap')
  args.maps = [m for m in (args.maps or maps).split(',') if m]
  args.frozen = _ints(args.frozen if args.frozen is not None else ('' if quick else '2,4,6'))
  args.frozen_map = 'map' if cpu else 'vmap'


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(',') if t.strip()]


# ----------------------------------------------------------------------------- FLOP count


@functools.lru_cache(maxsize=None)
def flops_per_image(widths=(8, 16, 32), num_classes=5, frozen=0, fixed=False) -> int:
  """Training FLOPs per image of FinalNet, a frozen prefix pruned (see `jaxtransfer.nets.flops`);
  `fixed`: the prefix's forward pass too (its output is computed once, outside the steps)."""
  from jaxtransfer.nets import flops, models
  macs = flops.layer_macs(models.FinalNet(num_classes, tuple(widths)))
  return flops.training_flops_per_image(macs, frozen) - (2 * sum(macs[:frozen]) if fixed else 0)


# Dense peak TFLOP/s by `device_kind` prefix: (fp32 on the vector units, the unit XLA uses for
# fp32 convolutions at JAX's default precision). NVIDIA Ampere and later run fp32 convolutions
# as TF32 on tensor cores by default; TPUs as bf16 passes on the MXU. Vendor datasheets, no
# sparsity; a GPU not listed (or any CPU) gets no fraction of peak.
PEAK_TFLOPS = {
    'NVIDIA H100 PCIe': (51.2, 378.0),  # TF32
    'NVIDIA H100': (66.9, 494.7),  # SXM; TF32
    'NVIDIA H200': (66.9, 494.7),  # TF32
    'NVIDIA A100': (19.5, 156.0),  # TF32
    'NVIDIA L4': (30.3, 60.0),  # TF32
    'Tesla V100': (15.7, 15.7),  # no TF32: fp32
    'TPU v4': (275.0, 275.0),  # bf16 passes
    'TPU v5 lite': (197.0, 197.0),  # v5e, bf16
    'TPU v5': (459.0, 459.0),  # v5p, bf16
    'TPU v6 lite': (918.0, 918.0),  # v6e, bf16
}


def peak_tflops(device_kind: str) -> tuple[float, float] | None:
  """(fp32, default-precision) dense peak of the first PEAK_TFLOPS entry `device_kind` starts
  with (the table lists the more specific kinds first)."""
  return next((v for k, v in PEAK_TFLOPS.items() if device_kind.startswith(k)), None)


# ----------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
  k: int
  member_map: str = 'map'
  frozen: int = 0
  block: str = 'fast'  # 'fast': jaxtransfer.nets.models as is; 'flax': stock nn.Conv (autodiff VJP)
  devices: int = 1  # devices the model axis is sharded over
  fixed: bool = False  # frozen prefix under `fixed`, computed once (`jaxtransfer.train.features`)

  @property
  def name(self) -> str:
    s = f'K={self.k:<2d} {self.member_map:4s} frozen={self.frozen}'
    if self.fixed:
      s += ' fixed'
    if self.block != 'fast':
      s += f' {self.block}-conv'
    if self.devices > 1:
      s += f' {self.devices}dev'
    return s


def make_variants(args, n_devices: int) -> list[Variant]:
  vs = [Variant(1)]
  for m in args.maps:
    vs += [Variant(k, m) for k in args.ks]
  if args.frozen:
    k_big = max(args.ks, default=1)
    for n in args.frozen:
      vs += [Variant(1, frozen=n)
            ] + ([Variant(k_big, args.frozen_map, frozen=n)] if k_big > 1 else [])
  for n in args.fixed:  # what a `fixed` study's frozen stacks cost (trained on prefix features)
    vs += [Variant(max(args.ks, default=1), 'map', frozen=n, fixed=True)]
  if args.baseline:
    vs += [Variant(1, block='flax')] + [Variant(k, 'map', block='flax') for k in args.ks[:1]]
  if n_devices > 1:
    vs += [
        Variant(k, m, devices=n_devices) for m in args.maps for k in args.ks if k % n_devices == 0
    ] + [dataclasses.replace(v, devices=n_devices) for v in vs if v.fixed and v.k % n_devices == 0]
  return vs


# ----------------------------------------------------------------------------- setup


def _make_model(args, block: str):
  from jaxtransfer.nets import models
  model = models.FinalNet(args.num_classes, args.widths)
  if block == 'fast':
    return model
  import flax.linen as nn

  class FlaxConvBlock(models.ConvBlock):
    """The pre-change ConvBlock: stock nn.Conv, XLA's own convolution VJP."""
    @nn.compact
    def __call__(self, x, train):
      x = nn.Conv(self.features, (3, 3), padding=1, name='conv')(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn')(x)
      x = nn.relu(x)
      return models.max_pool_2x2(x) if self.pool else x

  class BaselineNet(models.FinalNet):
    def layer_specs(self):
      return [(name, functools.partial(FlaxConvBlock, *f.args, **f.keywords)
               if isinstance(f, functools.partial) and f.func is models.ConvBlock else f)
              for name, f in super().layer_specs()]

  return BaselineNet(args.num_classes, args.widths)


def _layer_names(args):
  from jaxtransfer.nets import models
  return [name for name, _ in models.FinalNet(args.num_classes, args.widths).layer_specs()]


def _structure(args, frozen: int, fixed: bool = False):
  from jaxtransfer.train import trainer
  names = tuple(_layer_names(args)[:frozen])
  return trainer.Structure(graft_layers=names, frozen_layers=names,
                           batchnorm='fixed' if fixed and frozen else 'update')


def make_data(n_images: int, seed: int = 0):
  import jax.numpy as jnp
  import numpy as np
  from jaxtransfer.train import trainer
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n_images).astype(np.int32)
  return trainer.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(images[:256]),
                            jnp.asarray(labels[:256]), jnp.asarray([0.49, 0.48, 0.45], jnp.float32),
                            jnp.asarray([0.25, 0.24, 0.26], jnp.float32))


def _member_inputs(k: int, n: int, n_images: int, seed: int = 1):
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  train_idx = np.stack([rng.permutation(n_images)[:n] for _ in range(k)]).astype(np.int32)
  label_map = np.tile(np.arange(10, dtype=np.int32) % 5, (k, 1))
  return jnp.asarray(train_idx), jnp.asarray(label_map)


def _compile_fast(fn, *args):
  """jit at LLVM -O1 on CPU: initialisation code (random numbers) compiles ~5x faster, same
  values (other backends: their defaults)."""
  import jax
  options = {'xla_backend_optimization_level': 1} if jax.default_backend() == 'cpu' else {}
  return jax.jit(fn).lower(*args).compile(options)(*args)


# ----------------------------------------------------------------------------- internal method


class InternalRunner:
  """Compiles the trainer's epoch function per variant as `train_stack` does, then times it."""
  def __init__(self, args, data, n_images):
    from jaxtransfer.train import trainer
    self.args, self.data, self.n_images = args, data, n_images
    self.trainer_cls = trainer.Trainer
    self.stack_functions = trainer.stack_functions
    self.axis = trainer.MODEL_AXIS
    self.config = trainer.TrainConfig(batch_size=args.batch_size)
    self._init_cache = {}

  def _trainer(self, v: Variant, start: int = 0):
    import jax.numpy as jnp
    example = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return self.trainer_cls(_make_model(self.args, v.block),
                            _structure(self.args, v.frozen, v.fixed), self.config, example, start)

  def _member_state(self, v: Variant, trainer):
    """One member's initial state (for frozen variants grafted from a fresh full-net init)."""
    import jax
    key = (v.block, v.frozen)
    if key not in self._init_cache:
      source = None
      if v.frozen:
        full = self._member_state(dataclasses.replace(v, frozen=0),
                                  self._trainer(dataclasses.replace(v, frozen=0)))
        source = full.variables()
      self._init_cache[key] = _compile_fast(trainer.init, jax.random.key(0), source)
    return self._init_cache[key]

  def build(self, v: Variant):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    trainer = self._trainer(v)
    one = self._member_state(v, trainer)
    state = jax.tree.map(lambda x: jnp.repeat(x[None], v.k, axis=0), one)
    keys = jax.random.split(jax.random.key(2), v.k)
    train_idx, label_map = _member_inputs(v.k, self.args.n_per_member, self.n_images)
    mesh = Mesh(np.array(jax.devices()[:v.devices]), (self.axis,))
    data, shared = self.data, True
    if v.fixed:  # as the study trains these: on each member's prefix output, computed once
      from jaxtransfer.train import features, trainer
      members = trainer.Members(keys, keys, train_idx, train_idx[:, :64] % 256, label_map,
                                state.variables())
      computed, members = features.compute(trainer.model, members, self.data, v.frozen)
      trainer = self._trainer(v, start=v.frozen)
      train_idx, label_map, data, shared = members.train_idx, members.label_map, computed.data, False
    fn = self.stack_functions(trainer, mesh, v.member_map, shared_data=shared).epoch
    member_args = jax.device_put((state, keys, train_idx, label_map),
                                 NamedSharding(mesh, P(self.axis)))
    data = jax.device_put(data, NamedSharding(mesh, P() if shared else P(self.axis)))
    t = time.perf_counter()
    compiled = fn.lower(*member_args, data).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*member_args, data))  # warm-up

    def run() -> float:
      t = time.perf_counter()
      jax.block_until_ready(compiled(*member_args, data))
      return time.perf_counter() - t

    return run, compile_s

  def measure(self, variants, log):
    runs, compile_s = {}, {}
    for v in variants:
      runs[v], compile_s[v] = self.build(v)
      log(f'  compiled {v.name}: {compile_s[v]:.1f} s')
    times = {v: [] for v in variants}
    for _ in range(self.args.rounds):
      for v in variants:
        times[v].append(runs[v]())
    return times, compile_s


# ----------------------------------------------------------------------------- api method


class ApiRunner:
  """Times whole `train_stack` calls: epochs 2.. via `on_epoch` timestamps (epoch 1 compiles)."""
  def __init__(self, args, data, n_images):
    self.args, self.data, self.n_images = args, data, n_images

  def measure(self, variants, log):
    import jax
    import numpy as np
    from jaxtransfer.train import trainer
    times, compile_s = {}, {}
    sources = {}
    for v in variants:
      model = _make_model(self.args, v.block)
      train_idx, label_map = _member_inputs(v.k, self.args.n_per_member, self.n_images)
      source = None
      if v.frozen:
        if v.k not in sources:
          init = lambda k: model.init(k, np.zeros((1, 32, 32, 3), np.float32), train=False)
          sources[v.k] = _compile_fast(jax.vmap(init), jax.random.split(jax.random.key(3), v.k))
        source = sources[v.k]
      members = trainer.Members(init_keys=jax.random.split(jax.random.key(0), v.k),
                                shuffle_keys=jax.random.split(jax.random.key(1), v.k),
                                train_idx=train_idx, test_idx=train_idx[:, :64] % 256,
                                label_map=label_map, sources=source)
      stamps = []
      config = trainer.TrainConfig(epochs=1 + self.args.rounds, batch_size=self.args.batch_size)
      mesh = jax.make_mesh((v.devices,), (trainer.MODEL_AXIS,), devices=jax.devices()[:v.devices])
      t0 = time.perf_counter()
      trainer.train_stack(model, _structure(self.args, v.frozen, v.fixed), config, self.data,
                          members, mesh=mesh, member_map=v.member_map,
                          on_epoch=lambda e, m: stamps.append(time.perf_counter()))
      compile_s[v] = stamps[0] - t0  # includes initialisation and one epoch
      times[v] = list(np.diff(stamps))
      log(f'  ran {v.name}: first epoch (compiling) {compile_s[v]:.1f} s')
    return times, compile_s


# ----------------------------------------------------------------------------- report


def summarize(args, variants, times, peak_tflops: float | None = None):
  """Rows of the table; `peak_tflops`: the device's peak, for a fraction of it (else NaN)."""
  import numpy as np
  rows = []
  for v in variants:
    imgs = v.k * args.n_per_member
    best, med = min(times[v]), float(np.median(times[v]))
    ips = imgs / best
    flops = flops_per_image(args.widths, args.num_classes, v.frozen, v.fixed)
    rows.append(
        dict(variant=v.name, k=v.k, member_map=v.member_map, frozen=v.frozen, fixed=v.fixed,
             block=v.block, devices=v.devices, img_s=ips, img_s_median=imgs / med,
             s_per_model_epoch=MODEL_EPOCH / ips, gflop_s=ips * flops / 1e9,
             mflop_per_image=flops / 1e6,
             peak_fraction=ips * flops / 1e12 / peak_tflops if peak_tflops else float('nan')))
  for r in rows:  # speed-up over K=1 of the same structure and block
    base = [
        b for b in rows if b['k'] == 1 and b['frozen'] == (
            0 if r['fixed'] else r['frozen']) and b['block'] == r['block'] and not b['fixed']
    ]
    r['vs_k1'] = r['img_s'] / base[0]['img_s'] if base else float('nan')
  return rows


def print_table(rows, title=''):
  """The table; a '% of peak' column only where the device's peak is known (not on CPU)."""
  if title:
    print(title)
  peak = any(not math.isnan(r.get('peak_fraction', math.nan)) for r in rows)
  print(f"  {'variant':32s} {'img/s':>7s} {'(median)':>8s} {'s/model-epoch':>13s} "
        f"{'MFLOP/img':>9s} {'GFLOP/s':>7s} {'vs K=1':>6s}" + (f" {'% peak':>7s}" if peak else ''))
  for r in rows:
    print(f"  {r['variant']:32s} {r['img_s']:7.0f} {r['img_s_median']:8.0f} "
          f"{r['s_per_model_epoch']:13.2f} {r['mflop_per_image']:9.2f} {r['gflop_s']:7.1f} "
          f"{r['vs_k1']:6.2f}" + (f" {100 * r['peak_fraction']:7.3f}" if peak else ''))


def headline(rows, frozen: int = 0, fixed: bool = False) -> float:
  """The fastest stacked (K > 1) seconds per model-epoch of one structure (default: the
  headline, every layer trained)."""
  stacked = [
      r for r in rows
      if r['k'] > 1 and r['frozen'] == frozen and r['fixed'] == fixed and r['block'] == 'fast'
  ]
  return min(r['s_per_model_epoch'] for r in stacked) if stacked else float('nan')


def run_here(args) -> list[dict]:
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (
      lambda s: print(s, flush=True))
  import jax
  if args.cpu_devices:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  backend = jax.default_backend()
  resolve_defaults(args, backend)
  n_devices = jax.device_count() if backend == 'cpu' else 1
  variants = make_variants(args, n_devices)
  n_images = max(4096, 2 * args.n_per_member) if args.quick else max(MODEL_EPOCH, args.n_per_member)
  data = make_data(n_images)
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind) if backend != 'cpu' else None
  log(f'jax {jax.__version__} {backend} x{jax.device_count()} ({kind}), '
      f'FinalNet{args.widths} batch {args.batch_size} Adam, {args.n_per_member} images per '
      f'member per timed epoch, {args.rounds} rounds, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'
     )
  if peak:
    log(f'  peak of a {kind}: {peak[0]:.1f} TFLOP/s fp32, {peak[1]:.1f} TFLOP/s at the default '
        'precision of fp32 convolutions (TF32 / bf16 passes); "% peak" is of the latter')
  runner = None
  args.method_used = 'api'
  if args.method in ('auto', 'internal'):
    try:
      runner = InternalRunner(args, data, n_images)
      times, _ = runner.measure(variants, log)
      args.method_used = 'internal'

    except (AttributeError, TypeError) as e:  # the trainer's internals changed
      if args.method == 'internal':
        raise
      log(f'  internals unusable ({type(e).__name__}: {e}); timing train_stack instead')
      runner = None
  if runner is None:
    times, _ = ApiRunner(args, data, n_images).measure(variants, log)
  return summarize(args, variants, times, peak[1] if peak else None)


def run_envs(args, argv) -> list[dict]:
  """Each --env setting in child processes, alternating; best img/s per variant over rounds."""
  child_argv = [a for a in argv if not a.startswith('--env')]
  best: dict[tuple[str, str], dict] = {}
  for rnd in range(args.env_rounds):
    for env_text in args.env:
      env = dict(os.environ)
      env.update(dict(kv.split('=', 1) for kv in shlex.split(env_text)))
      print(f'round {rnd + 1}: {env_text or "(no extra env)"}', flush=True)
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__), *child_argv, '--json'], env=env,
          capture_output=True, text=True, check=True).stdout
      for r in json.loads(out.strip().splitlines()[-1]):
        key = (env_text, r['variant'])
        if key not in best or r['img_s'] > best[key]['img_s']:
          best[key] = dict(r, env=env_text)
  rows = list(best.values())
  same = lambda r: (r['k'], r['member_map'], r['frozen'], r['fixed'], r['block'])
  ref = {same(r): r['img_s'] for r in rows if r['env'] == args.env[0] and r['devices'] == 1}
  for env_text in args.env:
    sub = [r for r in rows if r['env'] == env_text]
    for r in sub:  # here: ratio to the same variant on one device under the first --env setting
      r['vs_k1'] = r['img_s'] / ref.get(same(r), float('nan'))
    print_table(
        sub, f'env {env_text or "(none)"!s} (last column: img/s ratio to the same '
        f'variant on 1 device in the first env)')
  return [r for r in rows if r['env'] == args.env[0]] if len(args.env) == 1 else rows


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  t0 = time.perf_counter()
  if args.env:
    rows = run_envs(args, argv)
  else:
    rows = run_here(args)
    if args.json:
      print(json.dumps(rows))
      return
    how = ('interleaved rounds'
           if args.method_used == 'internal' else 'consecutive epochs of train_stack')
    print_table(
        rows, f'steady-state training throughput (best of {args.rounds} {how}; analytic '
        f'{flops_per_image(args.widths, args.num_classes) / 1e6:.2f} MFLOP/image '
        f'fine-tuning all layers)')
  print(f'total {time.perf_counter() - t0:.0f} s')
  for n in args.fixed:
    print(f'fixed_frozen{n}_s_per_model_epoch={headline(rows, n, fixed=True):.4f}')
  print(f'stacked_s_per_model_epoch={headline(rows):.4f}')


if __name__ == '__main__':
  main()
