"""A study's network by name: one of the seed's nets or the researcher's own flax module.

`--model` is 'final' or 'initial' (`models.MODELS`), or `MODULE:ATTR` / `path/to/file.py:ATTR`.
The contract a model of your own meets, checked here on the data's image shape before anything
trains (each failure is one line):

- `ATTR(num_classes)` returns a `flax.linen.Module`;
- it is called as `model.init(key, x, train=False)` and `model.apply(variables, x, train=bool)`
  (with the non-param collections, e.g. batch_stats, mutable in training) on float NHWC images
  normalised per channel, and returns [batch, num_classes] logits;
- its top-level submodules, in the order the forward pass first calls them
  (`transfer.layer_order`), are its transferable layers: at least 2, since the first n <= L - 1
  are copied and the rest trained afresh (so a head whose shape depends on the class count is
  fine);
- training draws no randomness (no dropout): the trainer passes no PRNG streams to `apply`.

BatchNorm is optional: `flax.linen.BatchNorm` layers follow `--frozen_batchnorm` like the seed's;
without any, that flag changes nothing (the study says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from inspect import signature
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtransfer.nets import models
from jaxtransfer import errors, transfer

ModelFn = Callable[[int], nn.Module]
_PROBE_CLASSES = 2  # the class count a model is checked with (any works: the head is not grafted)


class ModelError(ValueError):
  """A model that cannot be loaded or does not meet the contract; one line."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the protocol needs to know of a model: its layers in call order, and whether any
  BatchNorm layer makes `--frozen_batchnorm` matter."""

  layers: tuple[str, ...]
  batchnorm: bool


def is_builtin(spec: str) -> bool:
  return spec in models.MODELS


def runs_slices(model: Any) -> bool:
  """Whether `model` runs a slice of its layers, as the built-in nets do: it has `num_layers` and
  is called with `start` and `stop`. Only such a model has its frozen prefix computed once
  (`features`) and its FLOPs counted layer by layer (`flops`); any other trains and runs as it
  is."""
  return hasattr(model, 'num_layers') and {'start', 'stop'} <= set(
      signature(model.__call__).parameters)


def load(spec: str) -> ModelFn:
  """The callable a `MODULE:ATTR` or `path/to/file.py:ATTR` spec names (imported once)."""
  source, _, attr = spec.rpartition(':')
  if not source or not attr:
    raise ModelError(f'--model {spec!r}: expected {", ".join(models.MODELS)}, MODULE:ATTR or '
                     'path/to/file.py:ATTR')
  if source.endswith('.py') and not os.path.isfile(source):
    raise ModelError(f'--model {spec}: no file {source}')
  try:
    module = _import_file(source) if source.endswith('.py') else importlib.import_module(source)
  except ModuleNotFoundError as e:
    raise ModelError(f'--model {spec}: cannot import {source}: no module named '
                     f'{e.name or source}') from None
  except Exception as e:  # pylint: disable=broad-except  # the user's code: any error, one line
    raise ModelError(
        f'--model {spec}: importing {source} failed: {errors.one_line(e, named=True)}') from None
  obj = module
  for part in attr.split('.'):
    if not hasattr(obj, part):
      raise ModelError(f'--model {spec}: {source} has no attribute {attr}')
    obj = getattr(obj, part)
  if not callable(obj):
    raise ModelError(f'--model {spec}: {attr} is of type {type(obj).__name__}, not a callable '
                     'ATTR(num_classes) returning a flax module')
  return obj


def _file_sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def source_file(spec: str, model_fn: ModelFn | None = None) -> str | None:
  """The file whose bytes name a model of your own in its study (`source_digest`): FILE.py of
  `FILE.py:ATTR`, the source file of MODULE in `MODULE:ATTR` (as of `model_fn`'s module, when
  given); None for a built-in net or a module without one."""
  if model_fn is None and is_builtin(spec):
    return None
  source = getattr(model_fn, '__module__',
                   None) if model_fn is not None else spec.rpartition(':')[0]
  if not source:
    return None
  if source.endswith('.py'):
    return os.path.realpath(source)
  module = sys.modules.get(source)
  path = getattr(module, '__file__', None) if module is not None else None
  if path is None and module is None:
    try:
      path = getattr(importlib.util.find_spec(source), 'origin', None)
    except (ImportError, ValueError):
      path = None
  return path if path and os.path.isfile(path) else None


def source_digest(spec: str, model_fn: ModelFn | None = None) -> str:
  """sha256 of the bytes of `source_file` ('' if none): part of a study's identity, so that an
  edited model file is another study. Only that file: modules it imports are not hashed."""
  path = source_file(spec, model_fn)
  return _file_sha256(path) if path else ''


def _import_file(path: str):
  """A model file as a module, once per file content per process (under a name from its real path
  and its sha256, so an edited file is imported afresh: what runs is what `source_digest`
  hashed)."""
  real = os.path.realpath(path)
  name = 'jaxtransfer_model_' + hashlib.sha256(
      f'{real}\0{_file_sha256(real)}'.encode()).hexdigest()[:16]
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, real)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses (flax modules) look their module up while defined
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def factory(spec: str, widths: Sequence[int] = models.FinalNet.widths,
            layer_defaults: str = 'pytorch', model_fn: ModelFn | None = None) -> ModelFn:
  """num_classes -> module: `model_fn` if given, else the built-in net or the imported spec."""
  if model_fn is not None:
    return model_fn
  if is_builtin(spec):
    return lambda k: models.make_model(spec, k, widths, layer_defaults)
  return load(spec)


def name_of(model_fn: ModelFn) -> str:
  """The name a model function gets in a study's identity: `canonical('module:qualname')`."""
  module, name = getattr(model_fn, '__module__', None), getattr(model_fn, '__qualname__', None)
  if not module or not name or '<' in name:
    raise ModelError(f'model_fn {model_fn!r} has no importable name: give the config a model '
                     'name for it (the study\'s identity)')
  return canonical(f'{module}:{name}')


def canonical(spec: str) -> str:
  """One name per model, however it was spelled, so that the command line and the Python API
  name the same study alike: a model in a `.py` file under the working directory and outside any
  regular package (no `__init__.py` beside it) is named by that file's path from there
  (`examples/small_vgg.py:SmallVGG`, also when imported as `examples.small_vgg`, or loaded from
  `./examples/../examples/small_vgg.py`); any other by its spelling (`package.module:ATTR`)."""
  source, _, attr = spec.rpartition(':')
  if is_builtin(spec) or not source or not attr:
    return spec
  path = source if source.endswith('.py') else getattr(sys.modules.get(source), '__file__', None)
  if path is None and not source.endswith('.py'):
    try:
      found = importlib.util.find_spec(source)
    except (ImportError, ValueError):
      found = None
    path = found.origin if found is not None else None
  if not path or not path.endswith('.py') or not os.path.isfile(path):
    return spec
  real, cwd = os.path.realpath(path), os.path.realpath(os.getcwd())
  if (os.path.commonpath([real, cwd]) != cwd or
      os.path.isfile(os.path.join(os.path.dirname(real), '__init__.py'))):
    return spec
  return f'{os.path.relpath(real, cwd)}:{attr}'


def inspect(model_fn: ModelFn, spec: str, image_shape: Sequence[int]) -> ModelInfo:
  """Check `model_fn` against the contract on one (abstract) batch of `image_shape` images."""
  try:
    model = model_fn(_PROBE_CLASSES)
  except Exception as e:  # pylint: disable=broad-except
    raise ModelError(f'--model {spec}: calling it with num_classes={_PROBE_CLASSES} failed: '
                     f'{errors.one_line(e, named=True)}') from None
  if not isinstance(model, nn.Module):
    raise ModelError(f'--model {spec}: returned an object of type {type(model).__name__}, not a '
                     'flax.linen Module')
  x = jnp.zeros((1, *image_shape), jnp.float32)
  where = f'a batch of {"x".join(map(str, image_shape))} images'
  try:
    layers = tuple(transfer.layer_order(model, x, train=False))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  except Exception as e:  # pylint: disable=broad-except
    raise ModelError(f'--model {spec}: model.init(key, x, train=False) fails on {where}: '
                     f'{errors.one_line(e, named=True)}') from None
  state = [c for c in shapes if c != 'params']
  batchnorm = []

  def spot_batchnorm(next_fun, args, kwargs, context):
    batchnorm.append(isinstance(context.module, nn.BatchNorm))
    return next_fun(*args, **kwargs)

  def train_step(variables):
    if state:
      return model.apply(variables, x, train=True, mutable=state)[0]
    return model.apply(variables, x, train=True)

  try:
    with nn.intercept_methods(spot_batchnorm):
      logits = jax.eval_shape(train_step, shapes)
  except Exception as e:  # pylint: disable=broad-except
    raise ModelError(f'--model {spec}: model.apply(variables, x, train=True) fails on {where} '
                     f'(a model that draws randomness in training, e.g. dropout, is not '
                     f'supported): {errors.one_line(e, named=True)}') from None
  if getattr(logits, 'shape', None) != (1, _PROBE_CLASSES):
    raise ModelError(f'--model {spec}: returns {getattr(logits, "shape", type(logits).__name__)} '
                     f'for 1 image and {_PROBE_CLASSES} classes, expected logits of shape '
                     f'(1, {_PROBE_CLASSES})')
  if len(layers) < 2:
    raise ModelError(f'--model {spec} has {len(layers)} top-level layer(s) {list(layers)}; '
                     'transfer needs at least 2 (the first n are copied, the rest trained)')
  warn_norm_only_layers(spec, layers, shapes)
  return ModelInfo(layers, any(batchnorm))


_warned: set[tuple[str, tuple[str, ...]]] = set()  # said once per process


def norm_only_layers(layers: Sequence[str], variables) -> list[str]:
  """The top-level layers with no weights of their own beside a normalisation's: no parameter of
  more than one dimension (a BatchNorm's scale and bias, or statistics alone), e.g. `bn1` of a
  flat `conv1, bn1, conv2, ...` model, which then counts as a layer of its own."""
  out = []
  for layer in layers:
    held = [jax.tree.leaves(variables[c][layer]) for c in variables if layer in variables[c]]
    if held and all(len(x.shape) <= 1 for leaves in held for x in leaves):
      out.append(layer)
  return out


def warn_norm_only_layers(spec: str, layers: Sequence[str], variables) -> None:
  """One log line when 'the first n layers' would count normalisation layers on their own."""
  lonely = norm_only_layers(layers, variables)
  if lonely and (spec, tuple(lonely)) not in _warned:
    _warned.add((spec, tuple(lonely)))
    logging.warning(
        '--model %s: top-level layer(s) %s hold only normalisation parameters or statistics (no '
        'weights of their own), yet each is a layer: depth n counts them (the first 2 layers of '
        '%s are %s); wrap each such layer with the one before it in one submodule to make them '
        'one layer (docs/own_model.md)', spec, ', '.join(lonely), ', '.join(layers),
        ' and '.join(layers[:2]))
