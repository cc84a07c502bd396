"""Frozen prefixes computed once (`fixed`, `target`): the same training as the plain path.

Compared where float noise cannot be amplified: a conv bias right before a BatchNorm gets no
gradient signal (BatchNorm subtracts it), so Adam turns float noise into +-lr steps on it, and the
BatchNorm's running mean tracks it; outputs in training mode do not depend on either. Test
accuracy (eval mode, running means) is therefore not compared at this learning rate."""

import jax
import numpy as np

import pytest

from jaxtransfer.train import features, trainer
from tests.conftest import (DATA, GRAFT_CONFIG, MODEL, PREFIX, TARGET_CONFIG, assert_same_training,
                            frozen_members, grafted_members)


def test_cached_prefix_trains_like_the_plain_path(stacked, grafted):
  prefix = PREFIX
  structure = trainer.Structure(prefix, prefix, 'fixed')
  assert features.applicable(MODEL, structure)
  assert not features.applicable(MODEL, trainer.Structure(prefix, prefix, 'update'))
  assert not features.applicable(MODEL, trainer.Structure(prefix, (), 'fixed'))  # fine-tuned
  for graft in ((), prefix):  # frozen random or grafted layers, statistics fixed or measured
    for policy in ('fixed', 'target'):
      assert features.applicable(MODEL, trainer.Structure(graft, prefix, policy))
  ms = grafted_members(stacked)
  sources = ms.sources
  plain = grafted('fixed', 'map')  # trainer.train_stack(MODEL, structure, GRAFT_CONFIG, DATA, ms)
  cached, indexed = features.compute(MODEL, ms, DATA, start=2)
  k, n = ms.train_idx.shape
  assert cached.data.train_images.shape == (k, n, 4, 4, 2)  # conv2's output (after its pool)
  m, shape = ms.test_idx.shape[1], DATA.train_images.shape[1:]
  size = k * (n + m) * 4 * 4 * 2 * 4
  assert features.stack_nbytes(MODEL, k, n, m, shape, 2) == size
  assert features.planned_nbytes(MODEL, structure, k, n, m, shape, budget_mb=1) == size
  assert features.planned_nbytes(MODEL, structure, k, n, m, shape, budget_mb=0) is None
  assert features.planned_nbytes(MODEL, trainer.Structure(prefix, prefix, 'update'), k, n, m, shape,
                                 budget_mb=1) is None
  fast = trainer.train_stack(MODEL, structure, GRAFT_CONFIG, DATA, indexed, features=cached)
  np.testing.assert_allclose(fast.train_loss, plain.train_loss, rtol=1e-5)
  np.testing.assert_allclose(fast.train_accuracy, plain.train_accuracy)
  signal = lambda v: {
      jax.tree_util.keystr(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(v)
      if not no_signal(jax.tree_util.keystr(p))
  }
  fast_leaves, plain_leaves = signal(fast.variables), signal(plain.variables)
  assert len(fast_leaves) == 38 - 12  # 6 pre-BN conv biases and 6 running means left out
  for path, x in fast_leaves.items():
    np.testing.assert_allclose(x, plain_leaves[path], rtol=1e-4, atol=1e-5, err_msg=path)
  for name in prefix:  # the frozen prefix is the source's, bit for bit, on both paths
    jax.tree.map(np.testing.assert_array_equal, fast.variables['params'][name],
                 sources['params'][name])
    jax.tree.map(np.testing.assert_array_equal, fast.variables['batch_stats'][name],
                 sources['batch_stats'][name])


def no_signal(path: str) -> bool:
  """A conv bias right before a BatchNorm, or a BatchNorm running mean (see the docstring)."""
  return path.endswith("['conv']['bias']") or path.endswith("['bn']['mean']")


@pytest.mark.parametrize('source, batchnorm', [('random', 'fixed'), ('random', 'target'),
                                               ('grafted', 'target')])
def test_a_prefix_from_each_members_starting_state_trains_like_the_plain_path(
    stacked, target, source, batchnorm):
  """Frozen layers at their initialisation, or with statistics measured at it: the features come
  from each member's starting state, and the stack trains as grafted frozen layers under `fixed`
  do, the plain path's training to float noise, its frozen layers the plain path's."""
  graft, ms = frozen_members(source, stacked)
  structure = trainer.Structure(graft, PREFIX, batchnorm)
  plain = (target(source) if batchnorm == 'target' else trainer.train_stack(
      MODEL, structure, TARGET_CONFIG, DATA, ms))
  train_structure, starting = features.starting_prefix(MODEL, structure, TARGET_CONFIG, ms, DATA)
  assert train_structure == trainer.Structure(PREFIX, PREFIX, 'fixed')
  cached, indexed = features.compute(MODEL, starting, DATA, start=2)
  fast = trainer.train_stack(MODEL, train_structure, TARGET_CONFIG, DATA, indexed, features=cached)
  assert_same_training(fast, plain, frozen=PREFIX)
  np.testing.assert_allclose(fast.train_loss, plain.train_loss, rtol=1e-5)
  np.testing.assert_allclose(fast.train_accuracy, plain.train_accuracy)
  np.testing.assert_allclose(fast.test_accuracy, plain.test_accuracy, atol=1e-6)
  for name in PREFIX:  # the starting state's, bit for bit; under 'target' measured, not 0 and 1
    for collection in ('params', 'batch_stats'):
      jax.tree.map(np.testing.assert_array_equal, fast.variables[collection][name],
                   starting.sources[collection][name])
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                   fast.variables[collection][name], plain.variables[collection][name])
    moved = not np.allclose(fast.variables['batch_stats'][name]['bn']['var'], 1.0)
    assert moved == (batchnorm == 'target')
  if source == 'random':
    assert not np.allclose(fast.variables['params']['conv1']['conv']['kernel'],
                           stacked.variables['params']['conv1']['conv']['kernel'])
