import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtransfer import models
from jaxtransfer.transfer import layer_order

X = jnp.zeros((2, 32, 32, 3))


def test_final_net_matches_seed_parameter_count():
  variables = models.FinalNet(num_classes=5).init(jax.random.key(0), X)
  assert models.count_params(variables['params']) == 20_973
  assert variables['params']['head']['dense']['kernel'].shape == (512, 5)


@pytest.mark.parametrize('model, names', [
    (models.FinalNet(5), [f'conv{i}' for i in range(1, 7)] + ['head']),
    (models.InitialNet(5), [f'conv{i}' for i in range(1, 9)] + ['head']),
])
def test_layers_are_named_and_ordered(model, names):
  assert layer_order(model, X, train=False) == names
  assert model.num_layers == len(names)


def test_initial_net_shapes():
  model = models.InitialNet(num_classes=4)
  variables = model.init(jax.random.key(0), X)
  assert set(variables) == {'params'}  # no BatchNorm
  assert variables['params']['head']['dense']['kernel'].shape == (32 * 32 * 3, 4)
  assert variables['params']['conv8']['conv']['kernel'].shape == (3, 3, 3, 3)
  assert model.apply(variables, X, train=True).shape == (2, 4)


def test_widths_flag_changes_head_input():
  variables = models.FinalNet(5, widths=(4, 8, 8)).init(jax.random.key(0), X)
  assert variables['params']['head']['dense']['kernel'].shape == (4 * 4 * 8, 5)


def test_slices_compose_to_the_full_forward():
  model = models.FinalNet(3)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  prefix = model.apply(variables, x, stop=3)
  assert prefix.shape == (4, 16, 16, 16)
  np.testing.assert_array_equal(model.apply(variables, prefix, start=3), model.apply(variables, x))


def test_max_pool_equals_flax():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x), jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'))


def test_train_mode_uses_batch_statistics():
  model = models.FinalNet(5)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3)) * 3 + 1
  variables = model.init(jax.random.key(0), x)
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  mean = state['batch_stats']['conv1']['bn']['mean']
  assert not np.allclose(mean, 0)  # running mean moved towards the batch mean
  assert model.apply(variables, x, train=False).shape == (8, 5)


def test_unknown_model_name():
  with pytest.raises(ValueError, match='unknown model'):
    models.make_model('resnet', 5)
