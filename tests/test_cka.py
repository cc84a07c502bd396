"""Linear CKA: its defining invariances, an independent HSIC cross-check, and layer features."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxtransfer import transfer
from jaxtransfer.analysis import cka
from jaxtransfer.nets import models


def _rng(seed=0):
  return np.random.default_rng(seed)


def _hsic_cka(x, y):
  """Kornblith et al.'s definition, written out: HSIC(K, L) = tr(K H L H) / (n - 1)^2."""
  x = x.reshape(len(x), -1).astype(np.float64)
  y = y.reshape(len(y), -1).astype(np.float64)
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = x @ x.T, y @ y.T

  def hsic(a, b):
    return np.trace(a @ h @ b @ h) / (n - 1)**2

  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


# (n, p): p < n takes the feature-space form by default, p > n the Gram form.
SHAPES = [(50, 7), (10, 40)]


@pytest.mark.parametrize('n,p', SHAPES)
@pytest.mark.parametrize('form', [None, 'features', 'gram'])
def test_self_similarity_is_one(n, p, form):
  x = _rng().normal(size=(n, p))
  assert cka.linear_cka(x, x, form=form) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize('n,p', SHAPES)
def test_both_forms_agree_with_independent_hsic_formula(n, p):
  rng = _rng(1)
  x = rng.normal(size=(n, p)) + 5.0  # offset: the HSIC formula centres through H, cka directly
  y = x[:, :3] @ rng.normal(size=(3, 6)) + 0.5 * rng.normal(size=(n, 6))  # related, not equal
  expected = _hsic_cka(x, y)
  assert 0.05 < expected < 0.95  # a non-trivial value
  for form in cka.FORMS:
    assert cka.linear_cka(x, y, form=form) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize('n,p', SHAPES)
def test_invariances(n, p):
  rng = _rng(2)
  x = rng.normal(size=(n, p))
  y = np.tanh(x @ rng.normal(size=(p, 5))) + 0.3 * rng.normal(size=(n, 5))
  base = cka.linear_cka(x, y)
  q, _ = np.linalg.qr(rng.normal(size=(p, p)))
  assert np.allclose(q.T @ q, np.eye(p))
  assert cka.linear_cka(x @ q, y) == pytest.approx(base, abs=1e-9)  # orthogonal
  assert cka.linear_cka(x * 3.7, y) == pytest.approx(base, abs=1e-9)  # isotropic scaling
  assert cka.linear_cka(x + 11.0, y - 4.0) == pytest.approx(base, abs=1e-9)  # offsets
  assert cka.linear_cka(x @ q, x) == pytest.approx(1.0, abs=1e-9)


def test_not_invariant_to_anisotropic_linear_map():
  # CCA would give 1 here (x @ a is an invertible map of x); linear CKA must not: with
  # x^T x ~ n I, CKA(x, x a) ~ ||a||_F^2 / (sqrt(p) ||a^2||_F) = 1 / sqrt(5) for a = diag(100, 1..).
  x = _rng(3).normal(size=(400, 5))
  a = np.diag([100.0, 1.0, 1.0, 1.0, 1.0])
  value = cka.linear_cka(x, x @ a)
  assert 0.35 < value < 0.6
  assert cka.linear_cka(x, x @ a, form='gram') == pytest.approx(value, rel=1e-9)


def test_independent_representations_near_zero_and_symmetric():
  rng = _rng(4)
  x, y = rng.normal(size=(2000, 5)), rng.normal(size=(2000, 5))
  value = cka.linear_cka(x, y)
  assert 0.0 <= value < 0.1
  assert cka.linear_cka(y, x) == pytest.approx(value, rel=1e-12)
  z = rng.normal(size=(30, 4, 4, 2))  # trailing dims are flattened; float32 jax input accepted
  w = rng.normal(size=(30, 11))
  assert cka.linear_cka(jax.numpy.asarray(z),
                        w) == pytest.approx(cka.linear_cka(w, z.reshape(30, -1)), rel=1e-5)


def test_constant_representation_is_nan():
  assert np.isnan(cka.linear_cka(np.ones((6, 3)), _rng().normal(size=(6, 2))))


@pytest.fixture(scope='module')
def tiny_net():
  model = models.FinalNet(3, widths=(2, 2, 2))
  x = _rng(5).normal(size=(6, 8, 8, 3)).astype(np.float32)
  # Random values in init's shapes (jitted model.init compiles for ~5 s on CPU; this traces only),
  # with non-trivial BatchNorm statistics so inference-mode normalisation is exercised too.
  shapes = jax.eval_shape(lambda key: model.init(key, x, train=False), jax.random.key(0))
  return model, _filled(shapes, 6), x


def _filled(shapes, seed, scale=0.5):
  """Random variables of these shapes (variances positive); scale 0: all weights zero."""
  rng = _rng(seed)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
    return (scale * (0.4 + rng.normal(size=leaf.shape))).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_layer_features_shapes_and_logits(tiny_net):
  model, variables, x = tiny_net
  feats = cka.layer_features(model, variables, x)
  # conv1 8x8x2, conv2 pooled 4x4x2, conv3 4x4x2, conv4 2x2x2, conv5 2x2x2, conv6 1x1x2, head 3.
  assert [f.shape for f in feats] == [(6, 128), (6, 32), (6, 32), (6, 8), (6, 8), (6, 2), (6, 3)]
  apply = jax.jit(model.apply, static_argnames=('train', 'stop'))  # whole prefix in one call
  logits = apply(variables, x, train=False)
  np.testing.assert_allclose(feats[-1], logits, rtol=1e-5, atol=1e-6)
  conv3 = apply(variables, x, train=False, stop=3)
  np.testing.assert_allclose(feats[2], conv3.reshape(6, -1), rtol=1e-5, atol=1e-6)
  assert len(cka.layer_features(model, variables, x, layers=('conv1', 'conv2'))) == 2


class _TwoDense(nn.Module):
  """A model of someone else's: no start/stop slicing, a layer called by a method of its own."""
  @nn.compact
  def __call__(self, x, train=False):
    del train
    hidden = nn.Dense(4, name='hidden')(x.reshape(len(x), -1))
    return nn.Dense(3, name='out')(nn.relu(hidden))


def test_layer_features_of_any_flax_model():
  model, x = _TwoDense(), _rng(7).normal(size=(5, 2, 2, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), x)
  hidden, out = cka.layer_features(model, variables, x)
  expected = nn.Dense(4).apply({'params': variables['params']['hidden']}, x.reshape(5, -1))
  np.testing.assert_allclose(hidden, expected, rtol=1e-6)
  np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-6)


def test_cka_between_the_layers_of_a_net(tiny_net):
  """On a real net's layer outputs: each layer is itself, any pair is symmetric and in [0, 1]."""
  model, variables, x = tiny_net
  feats = cka.layer_features(model, variables, x)
  m = np.array([[cka.linear_cka(a, b) for b in feats] for a in feats])
  assert m.shape == (7, 7)
  assert not np.isnan(m).any()
  np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
  np.testing.assert_allclose(m, m.T, atol=1e-12)
  assert ((m >= -1e-12) & (m <= 1 + 1e-9)).all()
  np.testing.assert_allclose(cka.per_layer_cka(feats, feats), 1.0, atol=1e-6)


@pytest.mark.parametrize('batch', [1, 2])
def test_many_nets_against_their_references_in_one_program_equal_linear_cka(tiny_net, batch):
  """The study's path: references' Grams once, then every net against its own reference (on that
  reference's images) in one program, equal to float64 `linear_cka` of each pair's layer features;
  a constant layer (all weights zero) gives nan there too. batch=2 of 3 nets: a remainder."""
  model, variables, x = tiny_net
  nets = [_filled(variables, 17), _filled(variables, 10), _filled(variables, 8, scale=0.0)]
  refs = [variables, _filled(variables, 11)]
  images = np.stack([x, _rng(12).normal(size=x.shape).astype(np.float32)])
  which = np.array([1, 0, 1])
  layers = tuple(transfer.layer_order(model, x[:1], train=False))
  grams = cka.reference_grams(model, layers, cka.stacked(refs), images, batch=batch)
  assert [g.shape for g in grams] == [(2, 6, 6)] * 7
  got = cka.cka_with_references(model, layers, cka.stacked(nets), which, images, grams, batch=batch)
  want = np.stack([
      cka.per_layer_cka(cka.layer_features(model, net, images[r]),
                        cka.layer_features(model, refs[r], images[r]))
      for net, r in zip(nets, which)
  ])
  assert got.shape == (3, 7) and np.isnan(want[2]).all() and not np.isnan(want[:2]).any()
  assert 0.05 < want[:2].min() and want[:2].max() < 0.999  # not trivially 0 or 1
  # Nets batched (batch 2) run grouped convolutions, which round otherwise than one net's (~2e-7
  # of a feature); centring amplifies that where a layer varies little across the images (here
  # to ~5e-6 of CKA on one host). The float64 arithmetic itself is held to 2e-6 by batch 1.
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 if batch == 1 else 5e-5)
