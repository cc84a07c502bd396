"""Layer-by-layer representation similarity with linear CKA (Kornblith et al. 2019).

The paper measures transferability only through accuracy after chopping and retraining. Linear
Centered Kernel Alignment compares what two networks compute at each layer directly: it is
invariant to orthogonal transforms and isotropic scaling of the features (so it ignores the
arbitrary ordering and rotation of units that differs between two trainings), but not to
arbitrary invertible linear maps (unlike CCA, which would call any two full-rank
representations of n <= p examples identical).

- `linear_cka(x, y)`: similarity of two representations of the same n examples;
- `layer_features(model, variables, images)`: each top-level layer's output, flattened to [n, -1];
- `per_layer_cka`: layer i of one network against layer i of another;
- `Reference`: one network's features prepared once for comparing many others with it.

`similarity` drives it over a study; `plots.heatmap` draws the result.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from jaxtransfer import transfer

FORMS = ('features', 'gram')


def _centred(x: jax.Array | np.ndarray) -> np.ndarray:
  """[n, ...] -> [n, p] float64 with zero-mean columns (CKA needs centred kernels)."""
  x = np.asarray(x, dtype=np.float64)
  x = x.reshape(x.shape[0], -1)
  return x - x.mean(axis=0, keepdims=True)


class Reference:
  """A representation y [n, ...] that many others are compared with (a base net's layer): its
  centred features, and its Gram matrix y y^T and covariance norm ||y^T y||_F each computed the
  first time a comparison needs it, then kept. `linear_cka(x, Reference(y))` equals
  `linear_cka(x, y)` bit for bit, at about half the cost of a comparison."""
  def __init__(self, y: jax.Array | np.ndarray):
    self.centred = _centred(y)

  @functools.cached_property
  def gram(self) -> np.ndarray:
    return self.centred @ self.centred.T

  @functools.cached_property
  def gram_norm(self) -> float:
    return np.linalg.norm(self.gram)

  @functools.cached_property
  def covariance_norm(self) -> float:
    return np.linalg.norm(self.centred.T @ self.centred)


def linear_cka(x: jax.Array | np.ndarray, y: jax.Array | np.ndarray | Reference, *,
               form: str | None = None) -> float:
  """Linear CKA between x [n, ...] and y [n, ...] (trailing dims flattened), in [0, 1].

  CKA = ||y^T x||_F^2 / (||x^T x||_F ||y^T y||_F) on column-centred features: the 'features'
  form costs O(n (p^2 + q^2 + pq)), the equal 'gram' form <K, L>_F / (||K||_F ||L||_F) with
  K = x x^T, L = y y^T costs O(n^2 (p + q)); by default the cheaper one for the shapes is used.
  Computed in float64: the ratio of squared norms loses too much in float32 when p is large.
  Returns nan when either representation is constant over the examples (CKA is undefined).
  `y` may be a `Reference`: its terms are then computed once for all the x compared with it.
  """
  x, ref = _centred(x), y if isinstance(y, Reference) else Reference(y)
  y = ref.centred
  n, p = x.shape
  if y.shape[0] != n:
    raise ValueError(f'x and y must describe the same examples: got {n} and {y.shape[0]} rows')
  q = y.shape[1]
  if form is None:
    form = 'features' if p * p + q * q + p * q <= n * (p + q) else 'gram'
  if form == 'features':
    cross = np.sum((y.T @ x)**2)
    norm_x, norm_y = np.linalg.norm(x.T @ x), ref.covariance_norm
  elif form == 'gram':
    k = x @ x.T
    cross = np.sum(k * ref.gram)
    norm_x, norm_y = np.linalg.norm(k), ref.gram_norm
  else:
    raise ValueError(f'unknown form {form!r}: expected one of {FORMS}')
  denominator = norm_x * norm_y
  return float(cross / denominator) if denominator > 0 else float('nan')


def _outputs(model: Any, layers: tuple[str, ...], variables: Any, x: jax.Array) -> list:
  """Every top-level layer's output in one inference pass (flax's `capture_intermediates`)."""
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                         capture_intermediates=lambda module, _: len(module.path) == 1)
  captured = state['intermediates']
  # A layer's output is that of its __call__ (or of the one method the net calls on it).
  return [
      captured[name].get('__call__', next(iter(captured[name].values())))[-1] for name in layers
  ]


# One compilation per (model, layers) and image shape; a model with unhashable fields compiles
# per call instead.
_outputs_jit = jax.jit(_outputs, static_argnums=(0, 1))


def layer_features(model: Any, variables: Any, images: np.ndarray,
                   layers: Sequence[str] | None = None) -> list[np.ndarray]:
  """Outputs of every top-level layer (inference mode, BatchNorm running statistics), each
  flattened to [n, -1], in call order: the logits last.

  Any flax model called as `model.apply(variables, x, train=False)` whose top-level submodules
  are its layers; `layers` defaults to `transfer.layer_order`. One forward pass computes all."""
  x = jax.numpy.asarray(images)
  layers = tuple(layers or transfer.layer_order(model, x[:1], train=False))
  try:
    hash(model)
    outputs = _outputs_jit(model, layers, variables, x)
  except TypeError:
    outputs = jax.jit(functools.partial(_outputs, model, layers))(variables, x)
  flat = lambda out: np.concatenate(
      [np.asarray(leaf).reshape(len(images), -1) for leaf in jax.tree.leaves(out)], axis=1)
  return [flat(out) for out in outputs]


def per_layer_cka(feats_a: Sequence[np.ndarray],
                  feats_b: Sequence[np.ndarray | Reference]) -> np.ndarray:
  """[L] linear CKA of layer i of A against layer i of B: how far the same layer has diverged.
  B's layers may be `Reference`s (a base net compared with many models)."""
  if len(feats_a) != len(feats_b):
    raise ValueError(f'different layer counts: {len(feats_a)} and {len(feats_b)}')
  return np.array([linear_cka(x, y) for x, y in zip(feats_a, feats_b)])
