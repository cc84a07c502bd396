"""Transfer as pytree surgery: graft a trained prefix into a fresh model, freeze it, train the rest.

Public API, model-agnostic (any flax.linen model whose transferable units are top-level
submodules):

- `layer_order(model, *args, **kwargs)`: top-level submodule names in forward-call order;
- `graft(source, target, layers)`: variables with `layers` taken from `source`;
- `freeze_labels(params, layers)`: 'frozen' / 'trainable' label tree;
- `masked_optimizer(tx, labels)`: `tx` on trainable leaves, zero updates on frozen ones.

The same with the layers as data (per-layer booleans, so one compiled program serves every
choice): `graft_where(source, target, take)`, `layer_leaves(params, flags)` and
`where_params(keep, new_state, old_state)` for an optimizer's state.

Helpers the trainer builds on: `partition` / `combine` (split params so that gradients are taken
only w.r.t. the trainable part: no backward pass through a frozen prefix),
`batchnorm_policy` (how BatchNorm behaves inside frozen layers) and `batchnorm_statistics`
(the statistics the 'target' policy freezes them at, measured on the new data).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

from jaxtransfer.config import BATCHNORM_POLICIES

PyTree = Any
FROZEN, TRAINABLE = 'frozen', 'trainable'


def layer_order(model: nn.Module, *example_args, **example_kwargs) -> list[str]:
  """Names of `model`'s top-level submodules in the order its forward pass first calls them.

  Found by tracing `model.init` under `jax.eval_shape` (no real compute), not from the params
  dict, whose key order any `jax.tree` map sorts away. Extra positional/keyword arguments are
  passed to `init` as for a normal call (e.g. `train=False`).
  """
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 1 and path[0] not in order:
      order.append(path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args, **example_kwargs))
  return order


def _top_level_names(variables: Mapping[str, Mapping[str, Any]]) -> set[str]:
  return {name for collection in variables.values() for name in collection}


def _check_layers(layers: Iterable[str], available: set[str]) -> list[str]:
  if isinstance(layers, str):
    raise ValueError(f'layers must be a sequence of names, not the string {layers!r}')
  layers = list(layers)
  unknown = [name for name in layers if name not in available]
  if unknown:
    raise ValueError(f'unknown layer(s) {unknown}; available: {sorted(available)}')
  return layers


def _check_compatible(collection: str, name: str, src: PyTree, tgt: PyTree) -> None:
  src_leaves = dict(jax.tree_util.tree_leaves_with_path(src))
  tgt_leaves = dict(jax.tree_util.tree_leaves_with_path(tgt))
  for path in sorted(set(src_leaves) | set(tgt_leaves), key=str):
    where = f'{collection}/{name}{jax.tree_util.keystr(path)}'
    if path not in src_leaves or path not in tgt_leaves:
      side = 'source' if path not in src_leaves else 'target'
      raise ValueError(f'{where} is missing in the {side}')
    s, t = src_leaves[path], tgt_leaves[path]
    if s.shape != t.shape or s.dtype != t.dtype:
      raise ValueError(f'{where}: source has {s.shape} {s.dtype}, '
                       f'target has {t.shape} {t.dtype}')


def graft(source: Mapping, target: Mapping, layers: Sequence[str]) -> dict:
  """`target`'s variables with the top-level subtrees `layers` replaced by `source`'s.

  Applies to every collection of `target` (params, batch_stats, ...). Leaves are shared, not
  copied (jax arrays are immutable); the input dicts are never mutated. Works unchanged on
  stacked variables, where every leaf has a leading model axis.
  """
  layers = _check_layers(layers, _top_level_names(target))
  out = {}
  for collection, tgt in target.items():
    tgt = dict(tgt)
    src = source.get(collection, {})
    for name in layers:
      if name not in tgt:
        continue
      if name not in src:
        raise ValueError(f'{collection}/{name} is missing in the source')
      _check_compatible(collection, name, src[name], tgt[name])
      tgt[name] = src[name]
    out[collection] = tgt
  return out


def graft_where(source: Mapping, target: Mapping, take: Mapping[str, jax.Array]) -> dict:
  """`graft` with the choice as data: the top-level layer `name` of every collection is
  `source`'s where the boolean `take[name]` is true, `target`'s elsewhere. `source` holds every
  layer of `take` that `target` has (values where the layer is not taken do not matter)."""
  names = set(_check_layers(list(take), _top_level_names(target)))
  out = {}
  for collection, tgt in target.items():
    src = source.get(collection, {})
    out[collection] = dict(tgt)
    for name in names & set(tgt):
      if name not in src:
        raise ValueError(f'{collection}/{name} is missing in the source')
      _check_compatible(collection, name, src[name], tgt[name])
      out[collection][name] = jax.tree.map(lambda s, t, c=take[name]: jnp.where(c, s, t), src[name],
                                           tgt[name])
  return out


def layer_leaves(params: Mapping, flags: Mapping[str, jax.Array]) -> dict:
  """A tree like `params` whose leaves are the flag of their top-level layer."""
  return {name: jax.tree.map(lambda _, f=flags[name]: f, sub) for name, sub in params.items()}


def where_params(keep: PyTree, new: PyTree, old: PyTree) -> PyTree:
  """Optimizer state `new`, with `old`'s values at the leaves where `keep` (a tree like the
  params) is false, in every part of the state shaped like the params (moments, traces);
  shared leaves (step counts) as in `new`."""
  params_like = lambda x: jax.tree.structure(x) == jax.tree.structure(keep)
  pick = lambda n, o: jax.tree.map(jnp.where, keep, n, o) if params_like(n) else n
  return jax.tree.map(pick, new, old, is_leaf=params_like)


def freeze_labels(params: Mapping, layers: Sequence[str]) -> dict:
  """Labels tree for `params`: FROZEN under the top-level `layers`, TRAINABLE elsewhere."""
  layers = set(_check_layers(layers, set(params)))
  return {
      name: jax.tree.map(lambda _, lab=(FROZEN if name in layers else TRAINABLE): lab, sub)
      for name, sub in params.items()
  }


def masked_optimizer(tx: optax.GradientTransformation,
                     labels: PyTree) -> optax.GradientTransformation:
  """`tx` on TRAINABLE leaves; FROZEN leaves get zero updates and keep no optimizer state.

  Zero updates leave frozen leaves unchanged even under weight decay or momentum, because the
  decay and momentum live inside `tx`, which never sees them.
  """
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def partition(tree: PyTree, labels: PyTree) -> tuple[PyTree, PyTree]:
  """(trainable, frozen): two copies of `tree`, each with None where the other holds a leaf."""
  pick = lambda want: jax.tree.map(lambda x, lab: x if lab == want else None, tree, labels)
  return pick(TRAINABLE), pick(FROZEN)


def combine(*trees: PyTree) -> PyTree:
  """Inverse of `partition`: the first non-None leaf at each position."""
  def first(*xs):
    return next((x for x in xs if x is not None), None)

  return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)


@contextlib.contextmanager
def batchnorm_policy(frozen_layers: Sequence[str], policy: str):
  """How BatchNorm layers inside frozen top-level layers behave while training.

  'update': as PyTorch with `requires_grad=False` (the seed): scale and bias are frozen, but the
    layer normalises with batch statistics and its running mean/var keep tracking the new data.
  'fixed': truly frozen features: normalise with the transferred running statistics, which
    never change, so the frozen prefix is a fixed function of the input.
  'target': as 'fixed', with running statistics measured once on the new data before training
    (`batchnorm_statistics`, which the trainer applies at initialisation): the frozen layers
    keep their activations' scale on the new data and still never change.
  Use as a context around `model.apply(..., train=True)`.
  """
  if policy not in BATCHNORM_POLICIES:
    raise ValueError(f'unknown BatchNorm policy {policy!r}; expected one of {BATCHNORM_POLICIES}')
  frozen = set(frozen_layers)
  if policy == 'update' or not frozen:
    yield
    return

  def use_running_average(next_fun, args, kwargs, context):
    module = context.module
    if not _is_batchnorm_in(context, frozen):
      return next_fun(*args, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != 'use_running_average'}
    if module.use_running_average is None:
      return next_fun(args[0], use_running_average=True, **kwargs)
    # Set at construction: flax refuses it again at call time, so override the bound copy's
    # field for this one call (a bound module is a per-trace clone; nothing else sees it).
    saved = module.use_running_average
    object.__setattr__(module, 'use_running_average', True)
    try:
      return next_fun(args[0], **kwargs)
    finally:
      object.__setattr__(module, 'use_running_average', saved)

  with nn.intercept_methods(use_running_average):
    yield


def _is_batchnorm_in(context, layers: set[str]) -> bool:
  """Whether an intercepted call is a BatchNorm's forward pass inside one of `layers`."""
  module = context.module
  return (isinstance(module, nn.BatchNorm) and context.method_name == '__call__' and
          bool(module.path) and module.path[0] in layers)


def batchnorm_statistics(forward: Callable[[PyTree, Any], Any], variables: PyTree, batches: Any,
                         layers: Sequence[str], mask: jax.Array | None = None) -> PyTree:
  """`variables` with the running mean and variance of every BatchNorm inside the top-level
  `layers` set to the mean and (biased) variance of that BatchNorm's input over all `batches`.

  `forward(variables, batch)` runs the model in inference mode (`train=False`) on one batch;
  `batches` has a leading axis over batches (any pytree: images, or indices `forward` reads);
  `mask` [batches, batch] marks the examples that count (padding: False). Every BatchNorm is
  measured with the statistics found for those before it, so each pass makes one more layer in
  a chain exact: there are as many passes as BatchNorm layers in `layers`. The result is what
  those layers would normalise with on exactly this data, which frozen random or transferred
  layers need to keep their activations' scale on a new task (the 'target' policy). The sums
  are shifted by the current mean, so the variance is not lost to cancellation.
  """
  layers = set(layers)
  flat = traverse_util.flatten_dict(dict(variables.get('batch_stats', {})))
  paths = sorted(p[:-1] for p in flat if p[0] in layers and p[-1] == 'mean')
  if not paths:
    return variables
  if mask is None:
    mask = jnp.ones(jax.tree.leaves(batches)[0].shape[:2], bool)

  def moments(stats, batch, weights):
    """(count, sum, sum of squares) of each BatchNorm's input, shifted by its current mean."""
    sums = {}

    def capture(next_fun, args, kwargs, context):
      if _is_batchnorm_in(context, layers):
        module, x = context.module, args[0].astype(jnp.float32)
        features = {
            a % x.ndim for a in ((module.axis,) if isinstance(module.axis, int) else module.axis)
        }
        reduce = tuple(a for a in range(x.ndim) if a not in features)
        w = weights.reshape(weights.shape + (1,) * (x.ndim - 1)).astype(jnp.float32)
        d = x - stats[module.path + ('mean',)].reshape(
            [x.shape[a] if a in features else 1 for a in range(x.ndim)])
        per_example = math.prod(x.shape[a] for a in reduce if a != 0)
        new = (w.sum() * per_example, (d * w).sum(reduce), (d * d * w).sum(reduce))
        old = sums.get(module.path)
        sums[module.path] = new if old is None else jax.tree.map(jnp.add, old, new)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
      forward({**variables, 'batch_stats': traverse_util.unflatten_dict(stats)}, batch)
    return sums

  def one_pass(_, stats):
    # The first batch's sums start the scan over the others (a carry of zeros would not be
    # varying over a `shard_map`'s axis, as the sums are).
    first, rest = (jax.tree.map(lambda x, s=s: x[s], (batches, mask)) for s in (0, slice(1, None)))
    add = lambda acc, xs: (jax.tree.map(jnp.add, acc, moments(stats, *xs)), None)
    sums, _ = lax.scan(add, moments(stats, *first), rest)
    stats = dict(stats)
    for path, (count, s1, s2) in sums.items():
      shift, offset = stats[path + ('mean',)], s1 / count
      stats[path + ('mean',)] = (shift + offset).astype(shift.dtype)
      var = jnp.maximum(s2 / count - offset * offset, 0.0)
      stats[path + ('var',)] = var.astype(stats[path + ('var',)].dtype)
    return stats

  # The first pass outside the loop: its result, not the initial statistics, is what the loop's
  # carry looks like (varying over a `shard_map`'s axis where the data are).
  stats = lax.fori_loop(1, len(paths), one_pass, one_pass(0, flat))
  return {**variables, 'batch_stats': traverse_util.unflatten_dict(stats)}
