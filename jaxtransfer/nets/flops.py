"""Analytic FLOPs of training a layered model, a frozen prefix pruned: the one count that the
dry run's estimate and `benchmarks/throughput.py` share.

Per image: the forward pass costs 2 * MACs for every layer; weight gradients 2 * MACs for each
trainable layer; input gradients 2 * MACs for each trainable layer except the first of them (the
net's first layer, or the first after a frozen prefix, passes no gradient on). BatchNorm, ReLU,
pooling and the optimiser are not counted. The MACs are read from each layer's traced
convolutions and matmuls, so any model whose layers can be run one at a time
(`modelspec.runs_slices`, as the built-in nets) counts without a formula of its own.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from jaxtransfer.nets import modelspec


def _macs(jaxpr) -> int:
  """Multiply-accumulates of the convolutions and matmuls in `jaxpr`, nested calls included;
  of a `cond` (e.g. `lax.platform_dependent`) only the largest branch, which is all that runs."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out features, in features, spatial...)
      total += math.prod(out.shape) * math.prod(rhs.shape[d] for d in spec[1:])
    elif name == 'dot_general':
      lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
      (contracting, _), _ = eqn.params['dimension_numbers']
      total += math.prod(out.shape) * math.prod(lhs.shape[d] for d in contracting)
    elif name == 'cond':
      total += max(_macs(branch.jaxpr) for branch in eqn.params['branches'])
    else:
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jex_core.ClosedJaxpr):
            total += _macs(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            total += _macs(sub)
  return total


def layer_macs(model, image_shape: Sequence[int] = (32, 32, 3)) -> list[int]:
  """Forward multiply-accumulates per image of each of the model's layers, in order."""
  if not modelspec.runs_slices(model):
    raise ValueError(
        f'counting FLOPs per layer needs a model that runs a slice of its layers '
        f'(num_layers, start/stop: the built-in nets); {type(model).__name__} does not')
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  macs = []
  for i in range(model.num_layers):
    layer = lambda v, x, i=i: model.apply(v, x, train=False, start=i, stop=i + 1)
    macs.append(_macs(jax.make_jaxpr(layer)(variables, x).jaxpr))
    x = jax.eval_shape(layer, variables, x)
  return macs


def whole_model_flops(model, image_shape: Sequence[int] = (32, 32, 3)) -> tuple[int, int]:
  """(training step, forward) FLOPs per image of any model, from one traced forward pass and one
  traced gradient of its parameters (every layer trained): what a model whose layers cannot be
  run one at a time (`layer_macs`) is counted by."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  state = [c for c in variables if c != 'params']

  def loss(params, rest, x):
    if state:
      return model.apply({'params': params, **rest}, x, train=True, mutable=state)[0].sum()
    return model.apply({'params': params, **rest}, x, train=True).sum()

  params, rest = variables['params'], {c: variables[c] for c in state}
  forward = lambda v, x: model.apply(v, x, train=False)
  step = _macs(jax.make_jaxpr(jax.grad(loss))(params, rest, x).jaxpr)
  return 2 * step, 2 * _macs(jax.make_jaxpr(forward)(variables, x).jaxpr)


def training_flops_per_image(macs: Sequence[int], frozen: int = 0) -> int:
  """One training step's FLOPs per image with the first `frozen` layers frozen (see above)."""
  return 2 * sum(macs) + 2 * sum(macs[frozen:]) + 2 * sum(macs[frozen + 1:])


def forward_flops_per_image(macs: Sequence[int]) -> int:
  """Evaluation: the forward pass alone."""
  return 2 * sum(macs)
