"""The seed's two nets: layers, shapes, parameter count; and the CPU-friendly ConvBlock.

`models.ConvBlock` runs flax's `nn.Conv` with `models.conv_general_dilated`, whose hand-written
VJP keeps the backward convolutions in a form XLA:CPU runs fast inside `lax.scan`. The second
half compares it with a reference FinalNet written with stock flax layers (same parameter names),
on initialisation, forward values, BatchNorm statistics and gradients, also inside a scan and vmap.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxtransfer.nets import models
from jaxtransfer.transfer import layer_order

X = jnp.zeros((2, 32, 32, 3))


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def test_final_net_matches_seed_parameter_count():
  variables = jax.eval_shape(models.FinalNet(num_classes=5).init, jax.random.key(0), X)
  assert param_count(variables['params']) == 20_973
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
  variables = jax.eval_shape(model.init, jax.random.key(0), X)
  assert set(variables) == {'params'}  # no BatchNorm
  assert variables['params']['head']['dense']['kernel'].shape == (32 * 32 * 3, 4)
  assert variables['params']['conv8']['conv']['kernel'].shape == (3, 3, 3, 3)
  assert jax.eval_shape(lambda v: model.apply(v, X, train=True), variables).shape == (2, 4)


def test_widths_flag_changes_head_input():
  variables = jax.eval_shape(models.FinalNet(5, widths=(4, 8, 8)).init, jax.random.key(0), X)
  assert variables['params']['head']['dense']['kernel'].shape == (4 * 4 * 8, 5)


def test_slices_compose_to_the_full_forward():
  model = models.FinalNet(3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = _jit(lambda k: model.init(k, x), jax.random.key(0))
  apply = jax.jit(model.apply, static_argnames=('start', 'stop'))
  prefix = apply(variables, x, stop=3)
  assert prefix.shape == (4, 16, 16, 16)
  np.testing.assert_array_equal(apply(variables, prefix, start=3), apply(variables, x))


def test_max_pool_equals_flax():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  np.testing.assert_array_equal(
      models.max_pool_2x2(x),
      jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'))


def test_train_mode_uses_batch_statistics():
  model = models.FinalNet(5)
  x = jnp.asarray(np.random.default_rng(1).normal(1.0, 3.0, (8, 32, 32, 3)), jnp.float32)
  variables = _jit(lambda k: model.init(k, x), jax.random.key(0))
  _, state = _jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']), variables)
  mean = state['batch_stats']['conv1']['bn']['mean']
  assert not np.allclose(mean, 0)  # running mean moved towards the batch mean
  assert jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).shape == (8, 5)


def test_unknown_model_name():
  with pytest.raises(ValueError, match='unknown model'):
    models.make_model('resnet', 5)


def test_pytorch_initialisation_is_torchs():
  """PyTorch's Conv2d/Linear reset_parameters: weights and biases U(+-1/sqrt(fan_in)), i.e. weight
  variance 1/(3 fan_in); flax's: lecun_normal (variance 1/fan_in) and zero biases."""
  init = lambda model: _jit(lambda k: model.init(k, X), jax.random.key(0))['params']
  torch_like = init(models.FinalNet(5))
  flax_like = init(models.make_model('final', 5, layer_defaults='flax'))
  fan_in = {'conv1': 27, 'conv2': 72, 'conv3': 72, 'conv4': 144, 'conv5': 144, 'conv6': 288}
  for name, fan in [*fan_in.items(), ('head', 512)]:
    layer = 'dense' if name == 'head' else 'conv'
    kernel, bias = (torch_like[name][layer][p] for p in ('kernel', 'bias'))
    bound = 1 / np.sqrt(fan)
    for x in (kernel, bias):
      assert np.abs(x).max() <= bound and np.abs(x).max() > 0.8 * bound, name
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.2, err_msg=name)
    flax_kernel = flax_like[name][layer]['kernel']
    np.testing.assert_allclose(flax_kernel.std(), 1 / np.sqrt(fan), rtol=0.25, err_msg=name)
    assert not np.any(flax_like[name][layer]['bias'])
  assert param_count(torch_like) == param_count(flax_like) == 20_973
  initial = init(models.make_model('initial', 4))
  assert np.abs(initial['head']['dense']['kernel']).max() <= 1 / np.sqrt(3072)


@pytest.mark.parametrize('running_var', ['unbiased', 'biased'])
def test_batchnorm_running_variance(running_var):
  """PyTorch's BatchNorm2d tracks the unbiased batch variance, flax's the biased one; both
  normalise with the biased one."""
  x = jnp.asarray(np.random.default_rng(3).normal(1.0, 2.0, (4, 3, 5, 2)), jnp.float32)
  bn = models.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                        running_var=running_var)
  variables = bn.init(jax.random.key(0), x)
  y, state = bn.apply(variables, x, mutable=['batch_stats'])
  flat = np.asarray(x, np.float64).reshape(-1, 2)
  n = len(flat)
  var = flat.var(0) * (n / (n - 1) if running_var == 'unbiased' else 1)
  np.testing.assert_allclose(state['batch_stats']['var'], 0.9 + 0.1 * var, rtol=1e-6)
  np.testing.assert_allclose(state['batch_stats']['mean'], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(y, (np.asarray(x) - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5),
                             rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# The CPU-friendly ConvBlock against stock flax.


class RefBlock(nn.Module):
  features: int
  pool: bool = False

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.features, (3, 3), padding=1, name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn')(x)
    x = nn.relu(x)
    return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class RefHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, name='dense')(x.reshape(x.shape[0], -1))


class RefNet(nn.Module):
  num_classes: int
  widths: tuple = (8, 16, 32)

  @nn.compact
  def __call__(self, x, train=False):
    for b, w in enumerate(self.widths):
      x = RefBlock(w, name=f'conv{2 * b + 1}')(x, train)
      x = RefBlock(w, pool=True, name=f'conv{2 * b + 2}')(x, train)
    return RefHead(self.num_classes, name='head')(x)


def _jit(fn, *args):
  """jit-compile and call `fn(*args)` at LLVM -O1: the same values, compiled several times faster
  (random-number code dominates compile time here)."""
  compiled = jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 1})
  return compiled(*args)


def _close(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


_RNG = np.random.default_rng(0)  # numpy inputs: jax.random would compile (slowly) per shape
XR = jnp.asarray(_RNG.normal(0.5, 2.0, (8, 32, 32, 3)), jnp.float32)  # random inputs
Y = jnp.arange(8) % 5


def _loss(apply, params, state, x, y=Y):
  logits, new_state = apply({'params': params, **state}, x, train=True, mutable=['batch_stats'])
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()
  return loss, (logits, new_state)


@pytest.fixture(scope='module')
def nets():
  """Our FinalNet with flax's layer defaults (so initialisation and statistics are flax's) and the
  stock-flax reference."""
  model, ref = models.make_model('final', 5, layer_defaults='flax'), RefNet(5)
  variables = _jit(lambda k: model.init(k, XR), jax.random.key(0))
  return model, ref, variables


def test_init_is_identical_to_flax(nets):
  model, ref, variables = nets
  ref_vars = _jit(lambda k: ref.init(k, XR), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)


def test_forward_and_statistics_match(nets):
  model, ref, variables = nets
  rv = variables
  _close(model.apply(variables, XR), ref.apply(rv, XR))
  out, state = model.apply(variables, XR, train=True, mutable=['batch_stats'])
  ref_out, ref_state = ref.apply(rv, XR, train=True, mutable=['batch_stats'])
  _close(out, ref_out)
  _close(state, ref_state)


def test_gradients_match(nets):
  model, ref, variables = nets
  params, state = variables['params'], {'batch_stats': variables['batch_stats']}
  rv = variables
  grad = lambda apply, *args: jax.grad(functools.partial(_loss, apply), (0, 2), has_aux=True)(*args)
  (g, gx), _ = _jit(functools.partial(grad, model.apply), params, state, XR)
  (rg, rgx), _ = _jit(functools.partial(grad, ref.apply), rv['params'], state, XR)
  _close(g, rg)
  _close(gx, rgx)


def test_sgd_steps_in_a_scan_match(nets):
  """The trainer's setting: steps inside lax.scan (where the two formulations compile apart)."""
  model, ref, variables = nets

  def run(apply, params, state, x):
    def step(carry, _):
      params, state = carry
      (loss, (_, new_state)), g = jax.value_and_grad(functools.partial(_loss, apply),
                                                     has_aux=True)(params, state, x)
      return (jax.tree.map(lambda p, d: p - 0.05 * d, params, g), new_state), loss

    return lax.scan(step, (params, state), None, length=3)

  state = {'batch_stats': variables['batch_stats']}
  (p, s), losses = _jit(functools.partial(run, model.apply), variables['params'], state, XR)
  (rp, rs), ref_losses = _jit(functools.partial(run, ref.apply), variables['params'], state, XR)
  _close(losses, ref_losses)
  _close(p, rp, rtol=1e-4)
  _close(s, rs, rtol=1e-4)


@pytest.mark.parametrize('shape, features, kernel', [((2, 9, 7, 3), 5, 3), ((3, 8, 8, 16), 4, 3),
                                                     ((2, 6, 5, 2), 3, 1), ((2, 7, 6, 3), 4, 5)])
def test_conv_same_vjp_equals_autodiff(shape, features, kernel):
  x, k, ct = (jnp.asarray(_RNG.normal(size=s), jnp.float32)
              for s in (shape, (kernel, kernel, shape[-1], features), shape[:-1] + (features,)))
  pad = kernel // 2
  ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), (
      (pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  fast = lambda x, k: models.conv_same(x, k, pad)

  def outputs(conv, x, k, ct):
    grads = jax.grad(lambda x, k: (conv(x, k) * ct).sum(), (0, 1))(x, k)
    # Under vmap (the trainer's member_map='vmap'): a stack of two kernels.
    stacked = jax.vmap(jax.grad(lambda k, x: (conv(x, k) * ct).sum()),
                       (0, None))(jnp.stack([k, 2 * k]), x)
    return conv(x, k), grads, stacked

  values, grads, stacked = jax.jit(functools.partial(outputs, fast))(x, k, ct)
  ref_values, ref_grads, ref_stacked = jax.jit(functools.partial(outputs, ref))(x, k, ct)
  np.testing.assert_array_equal(values, ref_values)
  _close(grads, ref_grads, rtol=1e-5, atol=1e-4)
  _close(stacked, ref_stacked, rtol=1e-5, atol=1e-4)


def test_other_convolutions_fall_back_to_lax():
  x = jnp.asarray(_RNG.normal(size=(2, 8, 8, 4)), jnp.float32)
  k = jnp.asarray(_RNG.normal(size=(3, 3, 4, 6)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))
  for strides, padding in [((2, 2), [(1, 1), (1, 1)]), ((1, 1), [(0, 0), (0, 0)]),
                           ((1, 1), 'SAME')]:
    np.testing.assert_array_equal(
        models.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn),
        lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn))


@pytest.mark.parametrize('shape, features, kernel', [((2, 9, 7, 3), 5, 3), ((3, 8, 8, 16), 4, 3),
                                                     ((2, 7, 6, 3), 4, 5)])
def test_gemm_kernel_gradient_equals_lax_under_vmap(shape, features, kernel):
  """The accelerators' VJP (`conv_same_gemm`, called directly: the CPU lowering would take the
  CPU branch) against jax.grad of lax's convolution, per member of a vmapped stack of three."""
  members = 3
  x, k, ct = (jnp.asarray(_RNG.normal(size=(members,) + s), jnp.float32)
              for s in (shape, (kernel, kernel, shape[-1], features), shape[:-1] + (features,)))
  pad = kernel // 2
  ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), (
      (pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  gemm = lambda x, k: models.conv_same_gemm(x, k, pad)
  grads = lambda conv: jax.jit(jax.vmap(jax.grad(lambda x, k, ct: (conv(x, k) * ct).sum(),
                                                 (0, 1))))(x, k, ct)
  (dx, dk), (ref_dx, ref_dk) = grads(gemm), grads(ref)
  assert dk.shape == k.shape and dx.shape == x.shape
  _close(dx, ref_dx, rtol=1e-5, atol=1e-4)
  _close(dk, ref_dk, rtol=1e-5, atol=1e-4)
  # The kernel gradient alone, as the trainer's backward pass computes it.
  direct = jax.vmap(lambda x, ct: models.kernel_grad_gemm(x, ct, kernel, kernel, pad))(x, ct)
  _close(direct, ref_dk, rtol=1e-5, atol=1e-4)
