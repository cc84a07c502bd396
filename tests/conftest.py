"""Shared fixtures: a persistent XLA compilation cache (tests compile the same small steps many
times), the one generator of fake image folders, and the driver's command line in-process.

Under pytest-xdist the workers share the compilation cache and the `finished` study (run by the
first worker that needs it, copied by every worker)."""

import dataclasses
import fcntl
import os
import shutil

# The suite compiles hundreds of small programs and runs each for milliseconds. XLA's CPU
# backend at LLVM -O1 compiles them in ~60% of the time (the tiny epoch program: 3.6 s -> 2.0 s)
# with the same code paths and values up to float rounding; studies keep XLA's default.
# Set before any backend starts, for this process and the subprocesses the tests start.
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from experiments import main as cli
from jaxtransfer.data import splits
from jaxtransfer.data.datasets import normalize
from jaxtransfer.train import trainer
from jaxtransfer.nets.models import FinalNet

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_root(tmp_path_factory):
  """The temporary folder of this whole run: every xdist worker's base folder is inside it."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  path = os.path.join(run_root(tmp_path_factory), 'xla-cache')
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path  # for subprocesses
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return path


# The longest modules first, so that xdist's workers (pyproject.toml: a module at a time, in this
# order) end together rather than one of them starting the longest module last.
SLOWEST_FIRST = ('test_train', 'test_study', 'test_campaigns', 'test_integrity')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.module.__name__.rsplit('.', 1)[-1]
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

  items.sort(key=rank)  # stable: the file order otherwise


def pytest_terminal_summary(terminalreporter):
  """What tests ask to show even under -q, `record_property('shown', text)`, after the run (from
  xdist workers too, whose own output does not reach the terminal)."""
  for reports in terminalreporter.stats.values():
    for report in reports:
      for name, text in getattr(report, 'user_properties', ()):
        if name == 'shown' and getattr(report, 'when', None) == 'call':
          terminalreporter.write_line(text)


def make_image_folder(root, classes=4, train_per_class=8, test_per_class=4, size=8, seed=0,
                      jpeg_last=False) -> dict:
  """root/{train,test}/<class>/NNNN.png with class-dependent brightness, so classes are learnable.

  `classes`: a count (folders class0, class1, ...) or the folder names, in creation order.
  `jpeg_last`: the last image of every class is a JPEG (mixed formats in one folder).
  Returns {path: pixels} of the (lossless) PNG files.
  """
  names = [f'class{c}' for c in range(classes)] if isinstance(classes, int) else list(classes)
  rng = np.random.default_rng(seed)
  pngs = {}
  for split, n in (('train', train_per_class), ('test', test_per_class)):
    for c, name in enumerate(names):
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        pixels = (rng.integers(0, 80, (size, size, 3)) + 40 * c).astype(np.uint8)
        ext = 'jpg' if jpeg_last and i == n - 1 else 'png'
        path = os.path.join(folder, f'{i:04d}.{ext}')
        Image.fromarray(pixels).save(path)
        if ext == 'png':
          pngs[path] = pixels
  return pngs


# A small mixed PNG/JPEG tree for the data tests.
TREE_CLASSES = ('cat', 'ant', 'bee')  # deliberately not sorted on disk creation
N_TRAIN, N_TEST, SIZE = 3, 2, 8


@pytest.fixture
def tree(tmp_path):
  """(root, {png path: pixels}) of a fresh small tree, free to damage."""
  root = tmp_path / 'images'
  return root, make_image_folder(root, TREE_CLASSES, N_TRAIN, N_TEST, SIZE, jpeg_last=True)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  make_image_folder(root)
  return str(root)


def run_cli(*argv: str) -> int:
  """`python -m experiments.main ARGV` in this process; returns the exit status."""
  FLAGS.unparse_flags()
  FLAGS(['main', *map(str, argv)])
  try:
    cli.main(['main'])
  except SystemExit as e:
    return e.code
  return 0


def tiny_args(image_folder, workdir, *extra):
  """A whole study in seconds: 2 splits of 4 classes, widths 2, depths 1 and 2, one epoch."""
  return (f'--image_folder={image_folder}', f'--workdir={workdir}', '--widths=2,2,2',
          '--num_splits=2', '--depths=1,2', '--epochs=1', '--batch_size=8',
          f'--cache_dir={workdir}-cache', '--quiet', *extra)


@pytest.fixture(scope='session')
def finished(image_folder, tmp_path_factory):
  """A finished tiny study (every condition at depths 1, 2 over 2 splits): 36 models."""
  workdir = str(tmp_path_factory.mktemp('study') / 'wd')
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    assert run_cli(*tiny_args(image_folder, workdir)) == 0
    return workdir
  # One run for all workers (their image folders are the same data), a copy for each.
  shared = os.path.join(run_root(tmp_path_factory), 'finished')
  with open(shared + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(shared + '.done'):
      assert run_cli(*tiny_args(image_folder, os.path.join(shared, 'wd'))) == 0
      open(shared + '.done', 'w').close()
  return copy_study(os.path.join(shared, 'wd'), workdir)


def copy_study(finished: str, workdir) -> str:
  """A copy of the `finished` study (and its array cache) at `workdir`, free to damage."""
  workdir = str(workdir)
  shutil.copytree(finished, workdir)
  shutil.copytree(finished + '-cache', workdir + '-cache')
  return workdir


def snapshot(workdir: str, names=('results.csv', 'report.md', 'study.json')) -> dict:
  """The bytes of a workdir's derived files: a refused run must leave them as they were."""
  return {name: open(os.path.join(workdir, name), 'rb').read() for name in names}


# Result rows of a made-up study: 3 splits x 2 targets, base and BnB at n = 1, with BnB paired
# 0.05 (target B) or 0.06 (target A) below its base net.
def row(split, target, condition, depth, acc, seed=0):
  return {
      'split': split, 'classes_A': '0 1', 'classes_B': '2 3', 'source': '', 'target': target,
      'condition': condition, 'depth': depth, 'frozen': condition == 'BnB', 'batchnorm': 'update',
      'seed': seed, 'epochs': 1, 'test_accuracy': acc, 'train_accuracy': 0.5, 'final_loss': 0.25,
      'wall_seconds': 1.5, 'config_hash': 'abc', 'diverged': False
  }


ROWS = [row(s, t, 'base', 0, 0.6 + 0.1 * s) for s in range(3) for t in 'AB'] + [
    row(s, t, 'BnB', 1, 0.6 + 0.1 * s - 0.05 - 0.01 * (t == 'A')) for s in range(3) for t in 'AB'
]

# ----------------------------------------------------------------------------
# The trainer on tiny in-memory data (8x8 images, 4 classes, widths 2): shared by the trainer's
# tests and those built on it.

MODEL = FinalNet(2, widths=(2, 2, 2))
CONFIG = trainer.TrainConfig(epochs=2, batch_size=16, learning_rate=0.03)
NAMES = [f'conv{i}' for i in range(1, 7)]


def tiny_data(num_classes=4, train_per_class=20, test_per_class=6, size=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), train_per_class).astype(np.int32)
  test_labels = np.repeat(np.arange(num_classes), test_per_class).astype(np.int32)
  images = lambda lab: (rng.integers(0, 100, (lab.size, size, size, 3)) + 40 *
                        lab[:, None, None, None]).astype(np.uint8)
  return trainer.DeviceData(jnp.asarray(images(labels)), jnp.asarray(labels),
                            jnp.asarray(images(test_labels)), jnp.asarray(test_labels),
                            jnp.full(3, .4), jnp.full(3, .25))


DATA = tiny_data()
HALVES = [(0, 1), (2, 3), (1, 3)]


def members(halves, seed=0, sources=None):
  train_labels, test_labels = np.asarray(DATA.train_labels), np.asarray(DATA.test_labels)
  k = len(halves)
  return trainer.Members(
      init_keys=jax.random.split(jax.random.key(seed),
                                 k), shuffle_keys=jax.random.split(jax.random.key(seed + 1), k),
      train_idx=jnp.asarray(np.stack([splits.class_indices(train_labels, c) for c in halves])),
      test_idx=jnp.asarray(np.stack([splits.class_indices(test_labels, c) for c in halves])),
      label_map=jnp.asarray(np.stack([splits.label_map(c, 4) for c in halves])), sources=sources)


def take(tree, i):
  return jax.tree.map(lambda x: x[i:i + 1], tree)


@pytest.fixture(scope='session')
def stacked_run():
  """A base stack of the three HALVES trained for CONFIG, and its (epoch, [K, 2] metrics)."""
  epochs = []
  result = trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES),
                               on_epoch=lambda e, m: epochs.append((e, m)))
  return result, epochs


@pytest.fixture(scope='session')
def stacked(stacked_run):
  return stacked_run[0]


@pytest.fixture(scope='session')
def stacked_epochs(stacked_run):
  return stacked_run[1]


# Two trainings of the same members compared up to float noise (the trainer's tests).


def no_signal(path, frozen=()) -> bool:
  """A conv bias right before a BatchNorm, or the running mean that tracks it (every conv of
  FinalNet has one). BN subtracts the bias, so its gradient is float noise, which Adam turns
  into steps of up to +-lr: two float orderings of the same step (map vs vmap, or any two
  compilers) move these leaves differently. Frozen ones stay the source's."""
  keys = tuple(k.key for k in path)
  return keys[1] not in frozen and keys[-2:] in (('conv', 'bias'), ('bn', 'mean'))


@jax.jit
def eval_logits(variables):
  """[K, test images, classes]: every member on all of DATA's test images, eval mode."""
  images = normalize(DATA.test_images, DATA.mean, DATA.std)
  return jax.vmap(lambda v: MODEL.apply(v, images, train=False))(variables)


def assert_same_training(a: trainer.StackResult, b: trainer.StackResult, frozen=()):
  """Two trainings of the same members, up to float noise: every leaf with a gradient signal,
  the train-mode metrics, and the eval-mode function once the `no_signal` leaves are shared
  (those change eval outputs only through the running mean's lag behind the bias)."""
  shared = jax.tree_util.tree_map_with_path(lambda p, x, y: x if no_signal(p, frozen) else y,
                                            a.variables, b.variables)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.variables),
                          jax.tree.leaves(b.variables)):
    if not no_signal(path, frozen):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4)
  np.testing.assert_allclose(a.train_accuracy, b.train_accuracy, atol=1e-6)
  np.testing.assert_allclose(eval_logits(shared), eval_logits(a.variables), atol=1e-4)


def bn_input_moments(model, variables, x, layers):
  """The oracle of the 'target' BatchNorm policy: layer by layer, the float64 mean and variance
  of each of FinalNet's `layers`' BatchNorm inputs (its conv's output, as flax captures it) over
  all of `x` at once, in eval mode with the statistics found for the layers before it."""
  stats = jax.tree.map(np.asarray, variables['batch_stats'])
  for name in layers:
    _, state = model.apply({**variables, 'batch_stats': stats}, x, train=False,
                           capture_intermediates=True, mutable=['intermediates'])
    h = np.asarray(state['intermediates'][name]['conv']['__call__'][0], np.float64)
    stats = {**stats, name: {'bn': {'mean': h.mean((0, 1, 2)), 'var': h.var((0, 1, 2))}}}
  return stats


# Stacks grafted from `stacked` with conv1..2 frozen: the trainer's tests (both BatchNorm policies,
# both member maps) and the features test (`fixed`, the loop) read the same trainings.
PREFIX = tuple(NAMES[:2])
GRAFT_CONFIG = trainer.TrainConfig(epochs=2, batch_size=16, optimizer='adam', weight_decay=0.1)


def grafted_members(stacked):
  sources = {c: {n: v[n] for n in PREFIX} for c, v in stacked.variables.items()}
  return members(HALVES, 7, sources)


@pytest.fixture(scope='session')
def grafted(stacked):
  """grafted(batchnorm, member_map): the StackResult of `grafted_members(stacked)` trained for
  GRAFT_CONFIG with PREFIX grafted and frozen, trained once a session."""
  runs = {}

  def train(batchnorm, member_map):
    if (batchnorm, member_map) not in runs:
      runs[batchnorm,
           member_map] = trainer.train_stack(MODEL, trainer.Structure(PREFIX, PREFIX,
                                                                      batchnorm), GRAFT_CONFIG,
                                             DATA, grafted_members(stacked), member_map=member_map)
    return runs[batchnorm, member_map]

  return train


def frozen_members(source: str, stacked) -> tuple[tuple[str, ...], trainer.Members]:
  """(grafted layers, members) of a stack with PREFIX frozen: left at the random initialisation
  of seed 7 (`source` 'random') or grafted from `stacked` ('grafted')."""
  return ((), members(HALVES, 7)) if source == 'random' else (PREFIX, grafted_members(stacked))


# 40 training images a member: the statistics' last batch of 8 is padded to 16.
TARGET_CONFIG = dataclasses.replace(GRAFT_CONFIG, eval_batch_size=16)


@pytest.fixture(scope='session')
def target(stacked):
  """target(source, member_map): the StackResult of a stack under the 'target' policy with
  PREFIX frozen, left at its random initialisation (`source` 'random') or grafted from `stacked`
  ('grafted'), trained for TARGET_CONFIG once a session."""
  runs = {}

  def train(source, member_map='map'):
    if (source, member_map) not in runs:
      graft, ms = frozen_members(source, stacked)
      runs[source, member_map] = trainer.train_stack(MODEL,
                                                     trainer.Structure(graft, PREFIX, 'target'),
                                                     TARGET_CONFIG, DATA, ms, member_map=member_map)
    return runs[source, member_map]

  return train
