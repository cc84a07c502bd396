"""A study in context: its config checked against its model (`validate`), and, once its data is
loaded, the one object that its training, estimate and analysis read (`Study`, built once).

`config` holds the rules; what needs the model (importing a model of your own, counting its
layers by tracing it) happens here. `driver.resolve`, which the command line and the Python API
call, and the reader of recorded studies (`from_json`) check a config through `validate`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from jaxtransfer import config as config_lib
from jaxtransfer import transfer
from jaxtransfer.config import ConfigError, RunOptions, StudyConfig
from jaxtransfer.data import cifar
from jaxtransfer.data import splits as splits_lib
from jaxtransfer.nets import models, modelspec
from jaxtransfer.study import plan as plan_lib
from jaxtransfer.train import trainer


def model_info(config: StudyConfig, model_fn: modelspec.ModelFn | None = None,
               image_shape: Sequence[int] = cifar.IMAGE_SHAPE) -> modelspec.ModelInfo:
  """The study's model's layers and BatchNorm; a built-in net's without tracing it."""
  if modelspec.is_builtin(config.model) and model_fn is None:
    net = models.make_model(config.model, 2, config.widths)
    return modelspec.ModelInfo(tuple(name for name, _ in net.layer_specs()),
                               config.model == 'final')
  make = modelspec.factory(config.model, config.widths, config.layer_defaults, model_fn)
  return modelspec.inspect(make, config.model, image_shape)


def model_name(spec: str, model_fn: modelspec.ModelFn | None = None) -> str:
  """The study's model as its identity names it (`modelspec.canonical`): `model_fn`'s name when
  given, and a `spec` other than the default that names a model must name that one; a `spec`
  that names no model is the name `model_fn` gets (as one without an importable name needs)."""
  if model_fn is None:
    return modelspec.canonical(spec)
  try:
    named = modelspec.name_of(model_fn)
  except modelspec.ModelError:
    if modelspec.is_builtin(spec):
      raise
    return modelspec.canonical(spec)
  if spec == StudyConfig().model or modelspec.canonical(spec) == named:
    return named
  if not modelspec.is_builtin(spec):
    try:
      other = modelspec.load(spec)
    except modelspec.ModelError:
      return spec  # names no model: the name the study gives `model_fn`
    if other is model_fn:
      return named
  raise ConfigError(f'config.model {spec!r} and model_fn {named} name different models: give '
                    'model_fn alone, or a config.model that names it')


def validate(config: StudyConfig, *, model_fn: modelspec.ModelFn | None = None,
             image_shape: Sequence[int] = cifar.IMAGE_SHAPE) -> StudyConfig:
  """The config with every rule of `config.validate` applied for its model's layers. A model of
  your own (`--model=MODULE:ATTR`, or `model_fn`, which `model` then names) is imported and
  checked on a batch of `image_shape` images. Raises ConfigError (one line) on anything that
  cannot run."""
  config = config_lib.check_model_flags(config)
  try:
    config = dataclasses.replace(config, model=model_name(config.model, model_fn))
    if not modelspec.is_builtin(config.model):
      defaults = StudyConfig()
      for name in ('widths', 'layer_defaults'):
        if getattr(config, name) != getattr(defaults, name):
          raise ConfigError(f'--{name} applies to the built-in nets only, not to --model '
                            f'{config.model}')
    layers = len(model_info(config, model_fn, image_shape).layers)
  except modelspec.ModelError as e:
    raise ConfigError(str(e)) from None
  return config_lib.validate(config, layers)


def from_json(recorded, where: str) -> StudyConfig:
  """The validated config recorded in a study.json (`where`, named in every error): known
  fields only, each of its default's type (`config.from_json`), then every check of `validate`."""
  config = config_lib.from_json(recorded, where)
  try:
    return validate(config)
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None


def train_config(config: StudyConfig, options: RunOptions) -> trainer.TrainConfig:
  """The trainer's settings, each from its one source: the study's, which change its results,
  or the run's, which do not."""
  return trainer.TrainConfig(epochs=config.epochs, batch_size=config.batch_size,
                             optimizer=config.optimizer, learning_rate=config.learning_rate,
                             weight_decay=config.weight_decay, momentum=config.momentum,
                             lr_schedule=config.lr_schedule, warmup_epochs=config.warmup_epochs,
                             augment=config.augment, eval_batch_size=options.eval_batch_size)


def half_sizes(config: StudyConfig, halves: Sequence[splits_lib.Split], train_labels: np.ndarray,
               test_labels: np.ndarray) -> dict[tuple[int, str], tuple[int, int]]:
  """(train, test) examples of every half of every split, as its members use them (the train
  images capped at --train_per_class per class): the shapes `plan.plan` stacks by."""
  per_class = config.train_per_class or None
  return {(s, half): (len(splits_lib.class_indices(train_labels, classes, per_class)),
                      len(splits_lib.class_indices(test_labels, classes)))
          for s, pair in enumerate(halves) for half, classes in zip('AB', pair)}


@dataclasses.dataclass(frozen=True, eq=False)
class Study:
  """A (validated) study on its loaded data: what its stacks are trained, costed and analysed
  from. Built once (`build`) and passed whole."""

  config: StudyConfig
  halves: tuple[splits_lib.Split, ...]
  make: modelspec.ModelFn  # num_classes -> the study's model
  layer_names: tuple[str, ...]  # its transferable layers, in call order
  stacks: tuple[plan_lib.Stack, ...]
  sizes: Mapping[tuple[int, str], tuple[int, int]]  # (split, half) -> (train, test) examples
  image_shape: tuple[int, ...]
  train_labels: np.ndarray  # of the whole dataset, which the members' indices index
  test_labels: np.ndarray

  def classes(self, run: plan_lib.Run) -> tuple[int, ...]:
    """The classes of `run`'s target half."""
    return plan_lib.half_classes(self.halves, run.split, run.target)


def check_halves(halves: Sequence[splits_lib.Split], class_names: Sequence[str]) -> None:
  """Refuse halves of fewer than 2 classes: a net trained on one class learns nothing (loss 0,
  accuracy 1), and every comparison of the study would be meaningless."""
  for s, pair in enumerate(halves):
    for half, classes in zip('AB', pair):
      if len(classes) < 2:
        raise ConfigError(
            f'the data has {len(class_names)} classes, so class half {half} of split {s} holds '
            f'{len(classes)} ({", ".join(class_names[c] for c in classes) or "none"}): a study '
            'needs at least 2 classes per half, 4 in all; use data with more classes')


def build(config: StudyConfig, train_ds, test_ds,
          model_fn: modelspec.ModelFn | None = None) -> Study:
  """The study `config` (validated) on this data (`imagefolder.ArrayDataset`s)."""
  halves = tuple(plan_lib.make_halves(config, train_ds.class_names))
  check_halves(halves, train_ds.class_names)
  make = modelspec.factory(config.model, config.widths, config.layer_defaults, model_fn)
  image_shape = tuple(train_ds.images.shape[1:])
  example = np.zeros((1,) + image_shape, np.float32)
  layer_names = tuple(transfer.layer_order(make(2), example, train=False))
  sizes = half_sizes(config, halves, train_ds.labels, test_ds.labels)
  return Study(config, halves, make, layer_names,
               tuple(plan_lib.plan(config, layer_names, halves, sizes)), sizes, image_shape,
               train_ds.labels, test_ds.labels)
