"""The transfer API on a Flax model that is not ours, and on our FinalNet and stacked variables."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtransfer import transfer
from jaxtransfer.nets.models import FinalNet
from tests.conftest import bn_input_moments


class Encoder(nn.Module):
  """Nested submodule with a BatchNorm whose mode is given at call time."""
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(6, name='proj')(x)
    x = nn.BatchNorm(momentum=0.5, name='norm')(x, use_running_average=not train)
    return nn.tanh(x)


class Other(nn.Module):
  """Layer names whose sorted order (classifier, middle, stem) differs from the call order."""
  @nn.compact
  def __call__(self, x, train=False):
    x = Encoder(name='stem')(x, train)
    x = nn.relu(nn.Dense(5, name='middle')(x))
    return nn.Dense(2, name='classifier')(x)


X = jax.random.normal(jax.random.key(42), (16, 4)) * 2 + 1


def init(seed, model=Other(), x=X):
  return model.init(jax.random.key(seed), x)


def test_layer_order_is_call_order_not_key_order():
  assert transfer.layer_order(Other(), X) == ['stem', 'middle', 'classifier']
  # Mapping over the params sorts keys: order must not come from there.
  assert list(jax.tree.map(lambda x: x, init(0)['params'])) == ['classifier', 'middle', 'stem']


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_tree_differs(a, b):
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_graft_takes_named_layers_from_source_for_every_collection():
  source, target = init(0), init(1)
  # Give the source distinct batch statistics.
  _, stats = Other().apply(source, X, train=True, mutable=['batch_stats'])
  source = {**source, **stats}
  before = jax.tree.map(np.array, target)
  out = transfer.graft(source, target, ['stem'])
  for collection in ('params', 'batch_stats'):
    _assert_tree_equal(out[collection]['stem'], source[collection]['stem'])
  _assert_tree_differs(out['batch_stats']['stem'], target['batch_stats']['stem'])
  for name in ('middle', 'classifier'):
    _assert_tree_equal(out['params'][name], target['params'][name])
  _assert_tree_equal(target, before)  # inputs not mutated
  assert out is not target and out['params'] is not target['params']


def test_graft_on_stacked_variables():
  stack = lambda seeds: jax.tree.map(lambda *x: jnp.stack(x), *[init(s) for s in seeds])
  source, target = stack([0, 1, 2]), stack([3, 4, 5])
  out = transfer.graft(source, target, ['stem', 'middle'])
  _assert_tree_equal(out['params']['middle'], source['params']['middle'])
  _assert_tree_equal(out['params']['classifier'], target['params']['classifier'])
  assert out['params']['stem']['proj']['kernel'].shape == (3, 4, 6)


def test_graft_errors():
  source, target = init(0), init(1)
  with pytest.raises(
      ValueError, match=r"unknown layer\(s\) \['nope'\]; available: "
      r"\['classifier', 'middle', 'stem'\]"):
    transfer.graft(source, target, ['stem', 'nope'])
  with pytest.raises(ValueError, match='sequence of names'):
    transfer.graft(source, target, 'stem')

  def shapes(model):
    """Shapes alone (graft refuses before it reads a value), in init's collection order
    (eval_shape returns the dict with sorted keys)."""
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return {'params': v['params'], 'batch_stats': v['batch_stats']}

  wide, narrow = shapes(FinalNet(5, widths=(8, 16, 64))), shapes(FinalNet(5))
  with pytest.raises(
      ValueError, match=r"params/conv5\['bn'\]\['bias'\]: source has \(32,\) "
      r"float32, target has \(64,\) float32"):
    transfer.graft(narrow, wide, ['conv5'])
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), source)
  with pytest.raises(ValueError, match='bfloat16'):
    transfer.graft(half, target, ['middle'])
  with pytest.raises(ValueError, match='missing in the source'):
    transfer.graft({'params': {}}, target, ['middle'])


def test_freeze_labels():
  params = init(0)['params']
  labels = transfer.freeze_labels(params, ['stem'])
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert set(jax.tree.leaves(labels['stem'])) == {'frozen'}
  assert set(jax.tree.leaves(labels['classifier'])) == {'trainable'}
  with pytest.raises(ValueError, match='unknown layer'):
    transfer.freeze_labels(params, ['head'])


def test_masked_adamw_keeps_frozen_leaves_bit_for_bit():
  model, params = Other(), init(0)['params']
  labels = transfer.freeze_labels(params, ['stem', 'middle'])
  tx = transfer.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), labels)
  # Momentum states exist only for trainable leaves.
  assert len(jax.tree.leaves(tx.init(params))) < len(jax.tree.leaves(
      optax.adamw(1e-2).init(params)))

  batch_stats = init(0)['batch_stats']

  def loss(p):
    return (model.apply({'params': p, 'batch_stats': batch_stats}, X)**2).sum()

  start, state = params, tx.init(params)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  _assert_tree_equal(params['stem'], start['stem'])
  _assert_tree_equal(params['middle'], start['middle'])
  for leaf, before in zip(jax.tree.leaves(params['classifier']),
                          jax.tree.leaves(start['classifier'])):
    assert not np.array_equal(leaf, before)


def test_optimizer_state_kept_where_layers_are_frozen_as_data():
  """`where_params` over AdamW's state, the frozen layers flagged by data: the same params and
  moments as `masked_optimizer` on trainable leaves, frozen leaves and moments untouched."""
  model, params = Other(), init(0)['params']
  batch_stats = init(0)['batch_stats']
  tx, masked = optax.adamw(1e-2, weight_decay=0.1), transfer.masked_optimizer(
      optax.adamw(1e-2, weight_decay=0.1), transfer.freeze_labels(params, ['stem']))
  keep = transfer.layer_leaves(params, {n: jnp.asarray(n != 'stem') for n in params})
  loss = lambda p: (model.apply({'params': p, 'batch_stats': batch_stats}, X)**2).sum()

  @jax.jit
  def steps(params):
    state, ref, ref_state = tx.init(params), params, masked.init(params)
    for _ in range(5):
      updates, new = tx.update(jax.grad(loss)(params), state, params)
      params = jax.tree.map(jnp.where, keep, optax.apply_updates(params, updates), params)
      state = transfer.where_params(keep, new, state)
      updates, ref_state = masked.update(jax.grad(loss)(ref), ref_state, ref)
      ref = optax.apply_updates(ref, updates)
    return params, state, ref

  start = params
  params, state, ref = steps(params)
  _assert_tree_equal(params['stem'], start['stem'])
  _assert_tree_equal(state[0].mu['stem'], jax.tree.map(jnp.zeros_like, start['stem']))
  assert int(state[0].count) == 5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, ref)
  assert not np.array_equal(params['classifier']['kernel'], start['classifier']['kernel'])


def test_graft_where_takes_flagged_layers_from_the_source():
  source, target = init(0), init(1)
  out = transfer.graft_where(source, target,
                             {'stem': jnp.asarray(True), 'middle': jnp.asarray(False)})
  for collection in target:
    _assert_tree_equal(out[collection]['stem'], source[collection]['stem'])
    if 'middle' in target[collection]:
      _assert_tree_equal(out[collection]['middle'], target[collection]['middle'])
  _assert_tree_equal(out['params']['classifier'], target['params']['classifier'])
  with pytest.raises(ValueError, match='unknown layer'):
    transfer.graft_where(source, target, {'head': jnp.asarray(True)})


def test_partition_combine_roundtrip():
  params = init(0)['params']
  trainable, frozen = transfer.partition(params, transfer.freeze_labels(params, ['stem']))
  assert jax.tree.leaves(trainable['stem']) == [] and jax.tree.leaves(frozen['middle']) == []
  _assert_tree_equal(transfer.combine(trainable, frozen), params)


@pytest.mark.parametrize(
    'model, x, frozen, trained_bn',
    [
        (Other(), X, ['stem'], None),  # BatchNorm mode given at call time
        (FinalNet(3), jax.random.normal(jax.random.key(1),
                                        (4, 8, 8, 3)), ['conv1', 'conv2'
                                                       ], 'conv6'),  # ... and at construction
    ])
def test_batchnorm_policies(model, x, frozen, trained_bn):
  # Jitted (the policy is active while tracing, as in the trainer): FinalNet op by op is slow.
  def train_mode(policy=None):
    def apply(variables, x):
      with transfer.batchnorm_policy(frozen, policy) if policy else contextlib.nullcontext():
        return model.apply(variables, x, train=True, mutable=['batch_stats'])

    return jax.jit(apply)

  variables = jax.jit(model.init)(jax.random.key(0), x)
  _, stats = train_mode()(variables, x * 2 + 1)
  variables = {**variables, **stats}  # non-trivial running statistics
  first = frozen[0]

  out_update, new_update = train_mode('update')(variables, x)
  out_fixed, new_fixed = train_mode('fixed')(variables, x)
  out_plain, new_plain = train_mode()(variables, x)

  # 'update' is plain training mode: frozen layers' running statistics keep moving.
  np.testing.assert_array_equal(out_update, out_plain)
  _assert_tree_equal(new_update, new_plain)
  _assert_tree_differs(new_update['batch_stats'][first], variables['batch_stats'][first])
  # 'fixed': frozen layers keep their statistics; the others still update.
  _assert_tree_equal(new_fixed['batch_stats'][first], variables['batch_stats'][first])
  if trained_bn:
    _assert_tree_differs(new_fixed['batch_stats'][trained_bn], variables['batch_stats'][trained_bn])
  assert not np.allclose(out_fixed, out_update)
  with pytest.raises(ValueError, match='unknown BatchNorm policy'):
    with transfer.batchnorm_policy(frozen, 'frozen'):
      pass


def test_fixed_policy_prefix_equals_eval_mode():
  """Under 'fixed', a frozen prefix computes exactly its eval-mode function."""
  model = FinalNet(3)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)

  @jax.jit  # traced under the policy, as in the trainer
  def train_prefix(variables, x):
    with transfer.batchnorm_policy(['conv1', 'conv2'], 'fixed'):
      return model.apply(variables, x, train=True, stop=2, mutable=['batch_stats'])[0]

  eval_prefix = jax.jit(lambda v, x: model.apply(v, x, train=False, stop=2))
  np.testing.assert_array_equal(train_prefix(variables, x), eval_prefix(variables, x))


def _statistics(model, variables, x, layers, batch, mask=True):
  """`transfer.batchnorm_statistics` over `x` in batches of `batch`, the last padded with copies
  of x[0] (masked out unless `mask` is False)."""
  nb = -(-len(x) // batch)
  idx = jnp.pad(jnp.arange(len(x)), (0, nb * batch - len(x))).reshape(nb, batch)
  valid = (jnp.arange(nb * batch) < len(x)).reshape(nb, batch) if mask else None
  forward = lambda v, i: model.apply(v, x[i], train=False)
  return jax.jit(lambda v: transfer.batchnorm_statistics(forward, v, idx, layers, valid))(variables)


def test_batchnorm_statistics_are_the_inputs_moments_layer_by_layer():
  """Each BatchNorm of the named layers gets its input's mean and variance over all the data,
  with the layers before it already measured; the others and every param are left as they were;
  the padding of the last batch does not count."""
  model = FinalNet(3, widths=(2, 3, 4))
  x = jax.random.normal(jax.random.key(1), (37, 8, 8, 3)) * 2 + 1
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  layers = ['conv1', 'conv2', 'conv3']
  out = _statistics(model, variables, x, layers, batch=8)
  want = bn_input_moments(model, variables, x, layers)
  for name in layers:
    for stat in ('mean', 'var'):
      np.testing.assert_allclose(out['batch_stats'][name]['bn'][stat], want[name]['bn'][stat],
                                 rtol=2e-6, atol=1e-7, err_msg=f'{name} {stat}')
    assert not np.allclose(out['batch_stats'][name]['bn']['var'], 1.0)  # measured, not the init
  for name in ('conv4', 'conv5', 'conv6'):
    _assert_tree_equal(out['batch_stats'][name], variables['batch_stats'][name])
  _assert_tree_equal(out['params'], variables['params'])
  # Counted, the padding (7 copies of x[0]) would move the statistics.
  unmasked = _statistics(model, variables, x, layers, batch=8, mask=False)
  assert not np.allclose(unmasked['batch_stats']['conv1']['bn']['var'],
                         out['batch_stats']['conv1']['bn']['var'], rtol=1e-3)


def test_batchnorm_statistics_of_a_model_that_is_not_ours():
  """A nested BatchNorm whose mode is given at call time, on [batch, features] inputs."""
  variables = init(0)
  out = _statistics(Other(), variables, X, ['stem'], batch=5)
  h = np.asarray(X, np.float64) @ np.asarray(variables['params']['stem']['proj']['kernel'],
                                             np.float64) + np.asarray(
                                                 variables['params']['stem']['proj']['bias'])
  np.testing.assert_allclose(out['batch_stats']['stem']['norm']['mean'], h.mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(out['batch_stats']['stem']['norm']['var'], h.var(0), rtol=1e-5)
  # No BatchNorm in the named layers: nothing to measure.
  _assert_tree_equal(_statistics(Other(), variables, X, ['middle'], batch=5), variables)
