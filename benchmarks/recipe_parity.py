r"""Recipe parity: base nets trained by jaxtransfer under each layer-defaults variant, and by the
seed's PyTorch loop, on the same half of the same data, several seeds each.

  python benchmarks/recipe_parity.py --image_folder=PATH/cifar10-jpeg --seeds=6 --torch

Variants (FinalNet fields `param_init`, `running_var`): 'pytorch' (PyTorch's initialisation and
unbiased BatchNorm running variance: jaxtransfer's default), 'pytorch-init' (PyTorch's
initialisation, flax's biased running variance), 'flax' (flax's defaults: the recipe of the
studies published before 2026-11-26). `--torch` adds the PyTorch reference (`torch_seed.py`).
Prints every run's final test accuracy, then mean +- 95% CI per variant and the difference of
each variant from the PyTorch reference (Welch's t interval).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    'pytorch': {'param_init': 'pytorch', 'running_var': 'unbiased'},
    'pytorch-init': {'param_init': 'pytorch', 'running_var': 'biased'},
    'flax': {'param_init': 'flax', 'running_var': 'biased'},
}
# The halves of the side-by-side PyTorch measurement in issue 13.
HALF_A = ('automobile', 'bird', 'deer', 'ship', 'truck')
HALF_B = ('airplane', 'cat', 'dog', 'frog', 'horse')


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--image_folder', required=True)
  p.add_argument('--cache_dir', default=None)
  p.add_argument('--seeds', type=int, default=6)
  p.add_argument('--epochs', type=int, default=10)
  p.add_argument('--variants', default='pytorch,pytorch-init,flax')
  p.add_argument('--torch', action='store_true', help='also train the PyTorch reference')
  p.add_argument('--train_per_class', type=int, default=0)
  p.add_argument('--cpu_devices', type=int, default=min(os.cpu_count() or 1, 8))
  return p.parse_args(argv)


def welch(a, b) -> tuple[float, float]:
  """mean(a) - mean(b) and its 95% CI half-width (Welch)."""
  from scipy import stats
  a, b = np.asarray(a, float), np.asarray(b, float)
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  dof = (va + vb)**2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
  return float(a.mean() - b.mean()), float(stats.t.ppf(0.975, dof) * np.sqrt(va + vb))


def main(argv=None) -> None:
  args = parse(argv)
  import jax
  jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  from jaxtransfer.data import datasets
  from jaxtransfer.nets import models
  from jaxtransfer.study import plan, driver
  from jaxtransfer.analysis import stats
  from jaxtransfer.train import trainer

  load = lambda split: datasets.load(split, image_folder=args.image_folder, cache_dir=args.cache_dir
                                    )
  train_ds, test_ds = load('train'), load('test')
  names = list(train_ds.class_names)
  halves = [(tuple(names.index(c) for c in HALF_A), tuple(names.index(c) for c in HALF_B))]
  classes = halves[0][1]
  per_class = args.train_per_class or None
  mean, std = datasets.channel_stats(train_ds.images)
  accuracy: dict[str, list[float]] = {}
  seconds: dict[str, float] = {}
  print(
      f'base nets on B = {", ".join(HALF_B)}; {args.seeds} seeds, {args.epochs} epochs, '
      f'{jax.device_count()} {jax.default_backend()} device(s)', flush=True)

  runs = [plan.Run(0, 'B', 'base', 0, seed) for seed in range(args.seeds)]
  members = driver.stack_members(runs, [classes] * len(runs), train_ds.labels, test_ds.labels,
                                 per_class, None)
  device_data = trainer.to_device(train_ds, test_ds, mean, std)
  config = trainer.TrainConfig(epochs=args.epochs)
  for variant in args.variants.split(','):
    model = models.FinalNet(len(classes), **VARIANTS[variant])
    result = trainer.train_stack(model, trainer.Structure(), config, device_data, members)
    accuracy[variant] = [float(a) for a in result.test_accuracy]
    seconds[variant] = result.seconds
    print(
        f'{variant:>13}: ' + ' '.join(f'{a:.4f}' for a in accuracy[variant]) +
        f'  ({result.seconds:.0f} s)', flush=True)

  if args.torch:
    import torch
    from benchmarks import torch_seed
    torch.set_num_threads(os.cpu_count() or 1)
    lookup = {c: i for i, c in enumerate(classes)}
    pick = lambda ds, idx: (torch_seed.to_tensor(ds.images[idx], mean, std),
                            torch.tensor([lookup[int(y)] for y in ds.labels[idx]]))
    from jaxtransfer.data import splits
    train_x, train_y = pick(train_ds, splits.class_indices(train_ds.labels, classes, per_class))
    test_x, test_y = pick(test_ds, splits.class_indices(test_ds.labels, classes))
    start = time.perf_counter()
    accuracy['torch'], per_epoch = [], []
    for seed in range(args.seeds):
      acc, s = torch_seed.train(seed, train_x, train_y, test_x, test_y, len(classes), args.epochs)
      accuracy['torch'].append(acc)
      per_epoch.append(s)
    seconds['torch'] = time.perf_counter() - start
    print(
        f'{"torch":>13}: ' + ' '.join(f'{a:.4f}' for a in accuracy['torch']) +
        f'  ({seconds["torch"]:.0f} s, {np.median(per_epoch) * 25000 / len(train_y):.2f} s per '
        '25,000-image model-epoch)', flush=True)

  print('\n| variant | test accuracy, mean ± 95% CI | − PyTorch (Welch 95% CI) |')
  print('|---|---|---|')
  for name, values in accuracy.items():
    mean_acc, half = stats.mean_ci(values)
    diff = ''
    if 'torch' in accuracy and name != 'torch':
      d, h = welch(values, accuracy['torch'])
      diff = f'{d:+.4f} ± {h:.4f}'
    print(f'| {name} | {mean_acc:.4f} ± {half:.4f} (n={len(values)}) | {diff} |')


if __name__ == '__main__':
  main()
