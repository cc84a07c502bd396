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
- `reference_grams` and `cka_with_references`: many networks against their references in one
  compiled program each, on the device (what a study's analysis runs).

`similarity` drives it over a study; `plots.heatmap` draws the result.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtransfer import transfer

FORMS = ('features', 'gram')


def _centred(x: jax.Array | np.ndarray) -> np.ndarray:
  """[n, ...] -> [n, p] float64 with zero-mean columns (CKA needs centred kernels)."""
  x = np.asarray(x, dtype=np.float64)
  x = x.reshape(x.shape[0], -1)
  return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: jax.Array | np.ndarray, y: jax.Array | np.ndarray, *,
               form: str | None = None) -> float:
  """Linear CKA between x [n, ...] and y [n, ...] (trailing dims flattened), in [0, 1].

  CKA = ||y^T x||_F^2 / (||x^T x||_F ||y^T y||_F) on column-centred features: the 'features'
  form costs O(n (p^2 + q^2 + pq)), the equal 'gram' form <K, L>_F / (||K||_F ||L||_F) with
  K = x x^T, L = y y^T costs O(n^2 (p + q)); by default the cheaper one for the shapes is used.
  Computed in float64: the ratio of squared norms loses too much in float32 when p is large.
  Returns nan when either representation is constant over the examples (CKA is undefined).
  """
  x, y = _centred(x), _centred(y)
  n, p = x.shape
  if y.shape[0] != n:
    raise ValueError(f'x and y must describe the same examples: got {n} and {y.shape[0]} rows')
  q = y.shape[1]
  if form is None:
    form = 'features' if p * p + q * q + p * q <= n * (p + q) else 'gram'
  if form == 'features':
    cross = np.sum((y.T @ x)**2)
    norm_x, norm_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
  elif form == 'gram':
    k, l = x @ x.T, y @ y.T
    cross = np.sum(k * l)
    norm_x, norm_y = np.linalg.norm(k), np.linalg.norm(l)
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


@functools.lru_cache(maxsize=64)
def _cached_program(fn, *static) -> Any:
  return jax.jit(functools.partial(fn, *static))


def _program(fn, *static) -> Any:
  """`fn` jitted with its leading arguments fixed: compiled once per (model, layers, ...) and
  input shapes; a model with unhashable fields compiles per call instead."""
  try:
    return _cached_program(fn, *static)
  except TypeError:
    return jax.jit(functools.partial(fn, *static))


def layer_features(model: Any, variables: Any, images: np.ndarray,
                   layers: Sequence[str] | None = None) -> list[np.ndarray]:
  """Outputs of every top-level layer (inference mode, BatchNorm running statistics), each
  flattened to [n, -1], in call order: the logits last.

  Any flax model called as `model.apply(variables, x, train=False)` whose top-level submodules
  are its layers; `layers` defaults to `transfer.layer_order`. One forward pass computes all."""
  x = jax.numpy.asarray(images)
  layers = tuple(layers or transfer.layer_order(model, x[:1], train=False))
  outputs = _program(_outputs, model, layers)(variables, x)
  return [np.asarray(_flat(out, len(images))) for out in outputs]


def _flat(out: Any, n: int) -> jax.Array:
  """A layer's output (an array or a pytree of them) as one [n, -1] array."""
  return jnp.concatenate([leaf.reshape(n, -1) for leaf in jax.tree.leaves(out)], axis=1)


def per_layer_cka(feats_a: Sequence[np.ndarray], feats_b: Sequence[np.ndarray]) -> np.ndarray:
  """[L] linear CKA of layer i of A against layer i of B: how far the same layer has diverged."""
  if len(feats_a) != len(feats_b):
    raise ValueError(f'different layer counts: {len(feats_a)} and {len(feats_b)}')
  return np.array([linear_cka(x, y) for x, y in zip(feats_a, feats_b)])


# Many networks at once. A layer's features enter CKA only through their centred Gram matrix
# K = x x^T (n x n whatever the layer's width), so each network's Grams are computed on the
# device, compared there, and only the [L] values come back. float32 with exact (not TF32)
# products: CKA is a ratio of sums of products of these, off the float64 `linear_cka` by ~1e-6.
_EXACT = jax.lax.Precision.HIGHEST


def _centred_grams(model: Any, layers: tuple[str, ...], variables: Any,
                   images: jax.Array) -> tuple[jax.Array, ...]:
  """Each layer's centred Gram matrix [n, n] (float32) from one inference pass."""
  grams = []
  for out in _outputs(model, layers, variables, images):
    x = _flat(out, len(images)).astype(jnp.float32)
    x = x - x[:1]  # a constant feature is then exactly 0, as in float64 (a mean of it is not)
    x = x - x.mean(axis=0, keepdims=True)
    grams.append(jnp.matmul(x, x.T, precision=_EXACT))
  return tuple(grams)


def _gram_cka(k: jax.Array, l: jax.Array) -> jax.Array:
  """<K, L>_F / (||K||_F ||L||_F): the Gram form of `linear_cka`; nan for a constant layer."""
  denominator = jnp.linalg.norm(k) * jnp.linalg.norm(l)
  return jnp.where(denominator > 0, jnp.vdot(k, l) / denominator, jnp.nan)


def _references(model, layers, batch, variables, images):
  return jax.lax.map(lambda a: _centred_grams(model, layers, *a), (variables, images),
                     batch_size=batch)


def _compare(model, layers, batch, variables, which, images, grams):
  def one(args):
    v, i = args
    return jnp.stack(
        [_gram_cka(k, g[i]) for k, g in zip(_centred_grams(model, layers, v, images[i]), grams)])

  return jax.lax.map(one, (variables, which), batch_size=batch)


def stacked(trees: Sequence[Any]) -> Any:
  """Pytrees of one structure -> one pytree of arrays with a leading axis (one program's input)."""
  return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def network_bytes(model: Any, layers: Sequence[str], variables: Any, images: np.ndarray) -> int:
  """Bytes of one network's layer outputs and Grams on `images` [n, ...]: what each network at
  once adds to a CKA program (to size its `batch`)."""
  shapes = jax.eval_shape(functools.partial(_outputs, model, tuple(layers)), variables,
                          jax.ShapeDtypeStruct(images.shape, jnp.float32))
  n = images.shape[0]
  return 4 * (2 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) + len(layers) * n * n)


def reference_grams(model: Any, layers: Sequence[str], variables: Any, images: np.ndarray, *,
                    batch: int = 1) -> tuple[jax.Array, ...]:
  """The references' centred Grams, [R, n, n] per layer, on the device, in one program: R
  networks of one `model` (`variables` stacked on a leading axis, see `stacked`), network r on
  its own images `images[r]` [R, n, ...]. `batch` networks run at once (`lax.map`'s
  batch_size: 1 runs them in turn, the CPU's best; more is faster on an accelerator)."""
  return _program(_references, model, tuple(layers), batch)(variables, jnp.asarray(images))


def cka_with_references(model: Any, layers: Sequence[str], variables: Any, which: np.ndarray,
                        images: np.ndarray, grams: Sequence[jax.Array], *,
                        batch: int = 1) -> np.ndarray:
  """[M, L] linear CKA of M networks of one `model` (`variables` stacked) with their references,
  layer by layer, in one program: network m on `images[which[m]]` against `grams[l][which[m]]`
  (from `reference_grams` on the same images). Each reference's Grams are computed once,
  however many networks are compared with it."""
  out = _program(_compare, model, tuple(layers), batch)(variables, jnp.asarray(which, jnp.int32),
                                                        jnp.asarray(images), tuple(grams))
  return np.asarray(out, dtype=np.float64)
