"""The plan of a study: its config (every default and every check), its runs and their stacks.

A `Run` is one trained model: a split, the half it is trained on (target), a condition (see
`conditions`) and a grafted/frozen depth n. Runs sharing static structure (grafted and frozen
layers) and target size form a `Stack`, trained in one call of `trainer.train_stack`. Every
run's PRNG keys come from its identity alone, so a stack's composition, the order of stacks
and a study's shards never change what a model learns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from typing import Any, Mapping, Sequence

import jax

from jaxtransfer.data import cifar, datasets
from jaxtransfer import conditions, transfer
from jaxtransfer.train import features, trainer
from jaxtransfer.nets import models, modelspec
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.data import splits as splits_lib

HALVINGS = ('random', 'dissimilar')
DIRECTIONS = ('AtoB', 'both')
SWEEPABLE = ('epochs', 'train_per_class')
_TRAIN = trainer.TrainConfig()


def _opt(default: Any, help: str, choices: Sequence[str] = ()) -> Any:  # pylint: disable=redefined-builtin
  """A config field with the help text (and choices) its command-line flag shows."""
  return dataclasses.field(default=default, metadata={'help': help, 'choices': tuple(choices)})


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that changes a study's results; its hash names the study.

  The one source of every default: `experiments/main.py` defines a flag per field from these
  defaults, help texts and choices, and `validate` checks a config for the CLI and the Python
  API alike.
  """

  # Data.
  dataset: str = _opt(
      'cifar10', 'TFDS dataset name (our TF-free builder). Ignored when '
      '--image_folder is given.', tuple(cifar.TFDS_NAMES))
  data_fingerprint: str = _opt(
      '', 'The identity of the data when --image_folder gives it (set from the folder: sha256 '
      'over its class names, image paths relative to it and file sizes), so the study is the '
      'same wherever the folder lies. Given, the folder must match it.')
  # Model.
  model: str = _opt(
      'final', "The network: the seed's 'initial' (8 convs of 3 filters, no pooling) or "
      "'final' (3 conv-BN blocks + pools), or your own flax module as MODULE:ATTR or "
      'path/to/file.py:ATTR, ATTR(num_classes) returning it (contract: '
      'jaxtransfer/nets/modelspec.py).')
  widths: tuple[int, ...] = _opt(
      tuple(models.FinalNet.widths), "Filters of the final net's three blocks; the "
      "default 8,16,32 gives the seed's 512 features into the head. Built-in nets only.")
  layer_defaults: str = _opt(
      'pytorch', "Which framework's layer defaults the nets start from: "
      "'pytorch' (the seed's: kaiming-uniform weights and uniform biases "
      'in +-1/sqrt(fan_in), unbiased BatchNorm running variance) or '
      "'flax' (lecun-normal weights, zero biases, biased running "
      'variance; the studies published before 2026-11-26). Built-in nets only.',
      tuple(models.LAYER_DEFAULTS))
  # Protocol.
  halves: str = _opt(
      'random', "How classes split into A and B: 'random' halves, or "
      "'dissimilar': man-made (A) against natural (B) classes of CIFAR-10 (4 vs 6) "
      'or CIFAR-100 (by superclass, 30 vs 70).', HALVINGS)
  num_splits: int = _opt(5, 'Random class splits into halves A and B.')
  split_seed: int = _opt(0, 'Seed of the random class splits.')
  splits: tuple[int, ...] = _opt((), 'Train only these splits (0-based indices into the '
                                 '--num_splits splits; default all): one shard of a study, e.g. '
                                 'per machine or session. experiments/pool.py pools shards.')
  depths: tuple[int, ...] = _opt((), 'Transferred depths n (layers copied from a base net); '
                                 'default 1..L-1 for a net of L layers.')
  conditions: tuple[str,
                    ...] = _opt(tuple(c.name for c in conditions.SEMINAR),
                                'Any of ' + ', '.join(c.label for c in conditions.TRANSFER) + '.',
                                conditions.CHOICES)
  directions: str = _opt(
      'both', 'AtoB: only B is the target half; both: each half is the '
      'target in turn (the paper pooled AnB and BnA).', DIRECTIONS)
  seeds: int = _opt(1, 'Independent runs (init and data order) per condition.')
  frozen_batchnorm: str = _opt(
      'update', "BatchNorm in frozen layers: 'update' keeps tracking "
      "batch statistics (the seed's PyTorch behaviour); 'fixed' uses the "
      'transferred running statistics.', transfer.BATCHNORM_POLICIES)
  # Training.
  epochs: int = _opt(_TRAIN.epochs, 'Training epochs for every model.')
  batch_size: int = _opt(_TRAIN.batch_size, 'Minibatch size.')
  optimizer: str = _opt(_TRAIN.optimizer, 'adam (AdamW) or sgd with momentum 0.9.',
                        trainer.OPTIMIZERS)
  learning_rate: float = _opt(_TRAIN.learning_rate, 'Learning rate.')
  weight_decay: float = _opt(_TRAIN.weight_decay, 'Decoupled weight decay.')
  train_per_class: int = _opt(
      0, 'Use only the first N training images of each class (0 = '
      'all). For quick runs and data-size sweeps.')
  # Campaigns and analysis.
  sweep: str = _opt(
      '', 'Repeat the study for several values of one flag, e.g. epochs=10,30,100 '
      'or train_per_class=500,1000,2500,5000: one sub-study per value in '
      'WORKDIR/<flag>-<value>/, plus sweep.md and a sweep figure.')
  cka_images: int = _opt(
      500, 'Target test images for the layer-similarity (linear CKA) '
      'heat-map; 0 skips it.')

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def hash(self) -> str:
    return config_hash(self.to_json())

  def train_config(self) -> trainer.TrainConfig:
    """The optimisation settings, field by field (TrainConfig's other fields at its defaults)."""
    names = {f.name for f in dataclasses.fields(trainer.TrainConfig)}
    return trainer.TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def config_hash(config: dict) -> str:
  """The name of a study: a hash of its whole config in JSON form (`StudyConfig.to_json`)."""
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


class ConfigError(ValueError):
  """A study config that cannot run; one line naming the flag."""


def _ints(name: str, values: Sequence) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except (TypeError, ValueError):
    raise ConfigError(f'--{name} must be a list of integers, got '
                      f'{",".join(map(str, values))}') from None


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ConfigError(f'--{name} {value!r}: expected one of {", ".join(choices)}')


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How and where a study runs, never what it finds: not part of its identity (hash, workdir),
  so any of these may change between a run and its resumption.

  The one source of these defaults and help texts, as `StudyConfig` is of the study's:
  `experiments/main.py` defines a flag per field; the checks run on construction, for the CLI
  and the Python API alike."""

  data_dir: str | None = _opt(None,
                              'Where TFDS datasets are prepared (default: ~/tensorflow_datasets).')
  manual_dir: str | None = _opt(
      None, 'Folder holding a local copy of the official archive (e.g. '
      'cifar-10-python.tar.gz); used instead of downloading.')
  cache_dir: str | None = _opt(
      None, 'Where decoded arrays and compiled programs are cached (default: '
      f'{datasets.DEFAULT_CACHE_DIR}).')
  member_map: str = _opt(
      'auto', "How a stack's members run on a device: vmap (one batched kernel; the "
      "accelerators' default), map (in turn; CPU's default) or auto. Results agree up to float "
      'noise.', trainer.MEMBER_MAPS)
  feature_budget_mb: int = _opt(
      features.DEFAULT_BUDGET_MB, 'Memory for the outputs of frozen prefixes under '
      '--frozen_batchnorm=fixed, computed once per stack instead of at every step (same '
      'results, faster); a stack needing more trains the plain way. 0: never.')
  eval_every_epoch: bool = _opt(
      False, 'Also evaluate every model on its test images after each epoch, into '
      'metrics.jsonl, the learning-curves figure and report (read-only: the same study, the '
      'same results; costs one evaluation per epoch).')
  wait_for_lock: bool = _opt(
      False, 'If another run holds the workdir, wait for it to end (default: refuse at once, '
      'naming the holder).')
  retrain_corrupt: bool = _opt(
      False, 'Retrain the finished stacks whose rows file or checkpoint fails verification '
      '(damaged, or written by hand), instead of refusing to run.')

  def __post_init__(self):
    _choice('member_map', self.member_map, trainer.MEMBER_MAPS)
    if not isinstance(self.feature_budget_mb, int) or self.feature_budget_mb < 0:
      raise ConfigError(f'--feature_budget_mb must be an integer >= 0 (MB), got '
                        f'{self.feature_budget_mb!r}')


def validate(config: StudyConfig, *, model_fn: modelspec.ModelFn | None = None,
             image_shape: Sequence[int] = cifar.IMAGE_SHAPE) -> StudyConfig:
  """The config with every check of the CLI applied and its values normalised: depths default
  to 1..L-1 and are sorted, `splits` naming every split becomes () (the same study). A model of
  your own (`--model=MODULE:ATTR`, or `model_fn`, which `model` then names) is imported and
  checked on a batch of `image_shape` images. Raises ConfigError (one line) on anything that
  cannot run."""
  for f in dataclasses.fields(StudyConfig):
    if f.metadata['choices'] and not isinstance(f.default, tuple):
      _choice(f.name, getattr(config, f.name), f.metadata['choices'])
  widths = _ints('widths', config.widths)
  if config.model == 'final' and (len(widths) != 3 or min(widths) < 1):
    raise ConfigError(f'--widths needs three positive integers, got '
                      f'{",".join(map(str, config.widths))}')
  try:
    if model_fn is not None and modelspec.is_builtin(config.model):
      config = dataclasses.replace(config, model=modelspec.name_of(model_fn))
    if not modelspec.is_builtin(config.model):
      defaults = StudyConfig()
      for name, value in (('widths', widths), ('layer_defaults', config.layer_defaults)):
        if value != getattr(defaults, name):
          raise ConfigError(f'--{name} applies to the built-in nets only, not to --model '
                            f'{config.model}')
    layers = len(model_info(config, model_fn, image_shape).layers)
  except modelspec.ModelError as e:
    raise ConfigError(str(e)) from None
  depths = _ints('depths', config.depths) or tuple(range(1, layers))
  bad = [d for d in depths if not 1 <= d < layers]
  if bad:
    raise ConfigError(f'--depths {bad} out of range: the {config.model} net has {layers} '
                      f'layers, so n must be in 1..{layers - 1}')
  chosen = tuple(config.conditions)
  if not chosen:
    raise ConfigError('--conditions is empty: give at least one of ' + ','.join(conditions.CHOICES))
  unknown = [c for c in chosen if c not in conditions.CHOICES]
  if unknown:
    raise ConfigError(f'--conditions: unknown {unknown}; expected any of '
                      f'{list(conditions.CHOICES)}')
  for name in ('num_splits', 'seeds', 'epochs', 'batch_size'):
    if getattr(config, name) < 1:
      raise ConfigError(f'--{name} must be at least 1, got {getattr(config, name)}')
  if (config.cka_images < 0 or config.train_per_class < 0 or config.learning_rate <= 0 or
      config.weight_decay < 0):
    raise ConfigError('--cka_images, --train_per_class and --weight_decay must be >= 0, '
                      '--learning_rate > 0')
  split_ids = tuple(sorted(set(_ints('splits', config.splits))))
  if any(not 0 <= s < config.num_splits for s in split_ids):
    raise ConfigError(f'--splits {",".join(map(str, config.splits))}: indices must be in 0..'
                      f'{config.num_splits - 1} (--num_splits={config.num_splits})')
  if split_ids == tuple(range(config.num_splits)):
    split_ids = ()  # all of them: the same study as no --splits
  if config.sweep:
    parse_sweep(config.sweep)
  return dataclasses.replace(config, widths=widths, depths=tuple(sorted(set(depths))),
                             conditions=chosen, splits=split_ids)


def model_info(config: StudyConfig, model_fn: modelspec.ModelFn | None = None,
               image_shape: Sequence[int] = cifar.IMAGE_SHAPE) -> modelspec.ModelInfo:
  """The study's model's layers and BatchNorm; a built-in net's without tracing it."""
  if modelspec.is_builtin(config.model) and model_fn is None:
    net = models.make_model(config.model, 2, config.widths)
    return modelspec.ModelInfo(tuple(name for name, _ in net.layer_specs()),
                               config.model == 'final')
  make = modelspec.factory(config.model, config.widths, config.layer_defaults, model_fn)
  return modelspec.inspect(make, config.model, image_shape)


def with_data(config: StudyConfig, fingerprint: str) -> StudyConfig:
  """`config` identified by its data: `fingerprint` is the content fingerprint of the image
  folder the study reads ('' for a TFDS dataset, named by --dataset)."""
  if config.data_fingerprint and not fingerprint:
    raise ConfigError(f'--data_fingerprint {config.data_fingerprint} names the content of an '
                      'image folder: give it with --image_folder')
  if config.data_fingerprint and config.data_fingerprint != fingerprint:
    raise ConfigError(f'--image_folder holds other data ({fingerprint}) than '
                      f'--data_fingerprint {config.data_fingerprint}')
  return dataclasses.replace(config, data_fingerprint=fingerprint)


def parse_sweep(sweep: str) -> tuple[str, tuple[int, ...]]:
  """'epochs=10,30,100' -> ('epochs', (10, 30, 100))."""
  param, _, values = sweep.partition('=')
  if param not in SWEEPABLE or not values:
    raise ConfigError(f'--sweep {sweep!r}: expected PARAM=V1,V2,... with PARAM one of '
                      f'{SWEEPABLE}')
  try:
    parsed = tuple(int(v) for v in values.split(','))
  except ValueError:
    raise ConfigError(f'--sweep {sweep!r}: values must be integers') from None
  if min(parsed) < 1:
    raise ConfigError(f'--sweep {sweep!r}: values must be at least 1')
  return param, parsed


# Fields added after studies were published, with the value those studies ran with (not today's
# default): a study.json without the field ran that way.
LEGACY_VALUES = {'layer_defaults': 'flax'}
# Fields removed since, with the value that meant nothing: a study.json holding it reads as if it
# did not. (A recorded image-folder path means something: `migrate` turns it into the folder's
# `data_fingerprint`.)
REMOVED_VALUES = {'image_folder': ''}


def sweep_studies(config: StudyConfig) -> list[tuple[str, StudyConfig]]:
  """A sweep's sub-studies: (folder name in the sweep's workdir, config), one per value."""
  param, values = parse_sweep(config.sweep)
  return [(f'{param}-{value}', dataclasses.replace(config, sweep='', **{param: value}))
          for value in values]


def with_defaults(recorded: dict) -> dict:
  """A config as recorded in a study.json, with the fields added since at the values its study
  ran with (LEGACY_VALUES) or else at their defaults, and removed fields at their empty value
  dropped (REMOVED_VALUES)."""
  kept = {k: v for k, v in recorded.items() if k not in REMOVED_VALUES or v != REMOVED_VALUES[k]}
  return {**StudyConfig().to_json(), **LEGACY_VALUES, **kept}


def from_json(recorded: Any, where: str) -> StudyConfig:
  """The validated config recorded in a study.json (`where`, named in every error): known
  fields only, each of its default's type, then every check of `validate`."""
  if not isinstance(recorded, dict):
    raise ConfigError(f'{where}: "config" must be an object of flags, got {recorded!r:.60}')
  values = with_defaults(recorded)
  defaults = StudyConfig()
  unknown = sorted(set(values) - set(defaults.to_json()))
  if unknown:
    raise ConfigError(f'{where}: unknown config field(s) {", ".join(unknown)}')
  for name, value in values.items():
    default = getattr(defaults, name)
    kind = (list,) if isinstance(
        default, tuple) else (int, float) if isinstance(default, float) else (type(default),)
    if not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool):
      raise ConfigError(f'{where}: config field {name} is {value!r:.60}, expected '
                        f'{type(default).__name__}')
    if isinstance(default, tuple):
      values[name] = tuple(value)
  try:
    return validate(StudyConfig(**values))
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None


def differing(a: dict, b: dict, ignore: Sequence[str] = ()) -> list[str]:
  """The config fields whose values differ between `a` and `b`, sorted."""
  return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


@dataclasses.dataclass(frozen=True)
class Run:
  split: int
  target: str  # 'A' | 'B'
  condition: str  # a name in `conditions.TABLE`
  depth: int
  seed: int

  @property
  def source(self) -> str:
    """The half whose base net gives the grafted layers ('' for none)."""
    return conditions.get(self.condition).source_half(self.target)

  @property
  def frozen(self) -> bool:
    return conditions.get(self.condition).frozen

  @property
  def name(self) -> str:
    return f'split{self.split}-{self.target}-{self.condition}-n{self.depth}-seed{self.seed}'

  def source_base(self) -> Run:
    """The base run whose net gives this run's grafted layers."""
    return Run(self.split, self.source, conditions.BASE.name, 0, self.seed)


@dataclasses.dataclass(frozen=True)
class Stack:
  name: str
  structure: trainer.Structure
  runs: tuple[Run, ...]

  @property
  def is_base(self) -> bool:
    return self.runs[0].condition == conditions.BASE.name


def half_classes(halves: Sequence[splits_lib.Split], split: int, half: str) -> tuple[int, ...]:
  """The classes of half 'A' or 'B' of split `split`."""
  return halves[split][half == 'B']


def make_halves(config: StudyConfig, class_names: Sequence[str]) -> list[splits_lib.Split]:
  if config.halves == 'dissimilar':
    if config.num_splits != 1:
      raise ConfigError('--halves=dissimilar is one fixed split: use --num_splits=1')
    return [splits_lib.dissimilar_halves(class_names)]
  return splits_lib.random_halves(len(class_names), config.num_splits, config.split_seed)


def structure_for(run: Run, layer_names: Sequence[str], batchnorm: str) -> trainer.Structure:
  prefix = tuple(layer_names[:run.depth])
  graft = prefix if run.source else ()
  frozen = prefix if run.frozen else ()
  return trainer.Structure(graft, frozen, batchnorm if frozen else 'update')


def runs(config: StudyConfig) -> list[Run]:
  """Every run of a (validated) study: the base nets first (every later run grafts from them)."""
  targets = ('B',) if config.directions == 'AtoB' else ('A', 'B')
  seeds = range(config.seeds)
  chosen = config.splits or range(config.num_splits)
  base = conditions.BASE.name
  out = [Run(s, half, base, 0, seed) for s in chosen for half in ('A', 'B') for seed in seeds]
  return out + [
      Run(s, target, condition, depth, seed)
      for depth in config.depths
      for condition in config.conditions
      for s in chosen
      for target in targets
      for seed in seeds
  ]


def plan(config: StudyConfig, layer_names: Sequence[str], halves: Sequence[splits_lib.Split],
         sizes: Mapping[tuple[int, str], tuple[int, int]] | None = None) -> list[Stack]:
  """All runs, grouped into stacks by (structure, target classes, target examples), base stacks
  first (every later stack grafts from them).

  `sizes[(split, half)]` = (train, test) examples of that half (default: the same for every
  half of a size, as in a balanced dataset). Members of a stack train and evaluate on arrays of
  one shape, so halves with other counts (unbalanced classes) train in stacks of their own,
  named with a `-N<train>-M<test>` suffix where a name would otherwise repeat."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs(config):
    key = (structure_for(run, layer_names, config.frozen_batchnorm),
           len(half_classes(halves, run.split,
                            run.target)), sizes[(run.split, run.target)] if sizes else None)
    groups.setdefault(key, []).append(run)
  names = [_stack_name(structure, size) for structure, size, _ in groups]
  return [
      Stack(name + (f'-N{counts[0]}-M{counts[1]}' if names.count(name) > 1 else ''), structure,
            tuple(group)) for name, ((structure, _, counts), group) in zip(names, groups.items())
  ]


def planned_row(config: StudyConfig, run: Run,
                halves: Sequence[splits_lib.Split] | None = None) -> dict:
  """What the plan fixes of a run's result row (with `halves`, its split's classes too): the
  trainer writes these values, and every reader checks them."""
  row = {**run_fields(run), 'source': run.source, 'frozen': run.frozen, 'epochs': config.epochs}
  if halves is not None:
    a, b = halves[run.split]
    row.update(classes_A=' '.join(map(str, a)), classes_B=' '.join(map(str, b)))
  return row


def expected_rows(config: StudyConfig, planned: Sequence[Run],
                  halves: Sequence[splits_lib.Split] | None = None) -> dict[tuple, dict]:
  """Run id -> `planned_row`, for `rows.check_rows`."""
  return {rows_lib.run_id(row): row for row in (planned_row(config, r, halves) for r in planned)}


def _stack_name(structure: trainer.Structure, size: int) -> str:
  if structure == trainer.Structure():
    return f'base-k{size}'
  kind = 'frozen' if structure.frozen_layers else 'finetune'
  graft = 'graft' if structure.graft_layers else 'random'
  depth = max(len(structure.graft_layers), len(structure.frozen_layers))
  return f'{kind}-{graft}-n{depth}-k{size}'


def run_key(run: Run, purpose: str) -> jax.Array:
  """A PRNG key from the run's identity alone, so results do not depend on stack order."""
  return jax.random.fold_in(jax.random.key(run.seed), zlib.crc32(f'{run.name}/{purpose}'.encode()))


def run_fields(run: Run) -> dict:
  """The columns that identify a run in results and metrics files."""
  return {
      'split': run.split, 'target': run.target, 'condition': run.condition, 'depth': run.depth,
      'seed': run.seed
  }
