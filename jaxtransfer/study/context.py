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


def validate(config: StudyConfig, *, model_fn: modelspec.ModelFn | None = None,
             image_shape: Sequence[int] = cifar.IMAGE_SHAPE) -> StudyConfig:
  """The config with every rule of `config.validate` applied for its model's layers. A model of
  your own (`--model=MODULE:ATTR`, or `model_fn`, which `model` then names) is imported and
  checked on a batch of `image_shape` images. Raises ConfigError (one line) on anything that
  cannot run."""
  config = config_lib.check_model_flags(config)
  try:
    if model_fn is not None and modelspec.is_builtin(config.model):
      config = dataclasses.replace(config, model=modelspec.name_of(model_fn))
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


def build(config: StudyConfig, train_ds, test_ds,
          model_fn: modelspec.ModelFn | None = None) -> Study:
  """The study `config` (validated) on this data (`imagefolder.ArrayDataset`s)."""
  halves = tuple(plan_lib.make_halves(config, train_ds.class_names))
  make = modelspec.factory(config.model, config.widths, config.layer_defaults, model_fn)
  image_shape = tuple(train_ds.images.shape[1:])
  example = np.zeros((1,) + image_shape, np.float32)
  layer_names = tuple(transfer.layer_order(make(2), example, train=False))
  sizes = half_sizes(config, halves, train_ds.labels, test_ds.labels)
  return Study(config, halves, make, layer_names,
               tuple(plan_lib.plan(config, layer_names, halves, sizes)), sizes, image_shape,
               train_ds.labels, test_ds.labels)
