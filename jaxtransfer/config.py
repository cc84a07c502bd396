"""What a study is and how it runs: the schema, defaults, help texts, choices and rules of a study
(`StudyConfig`) and of a run (`RunOptions`), and how a study's config is recorded and read back.

Readable without JAX (the standard library and `conditions` only): the command line, a record
reader or a planning script can check a config without starting an accelerator. The facts the
schema names (optimizers, BatchNorm policies, layer defaults, ...) live here, and the modules
that implement them import them from here. The one rule that needs the model, its layer count,
is an argument of `validate`: `study.context` looks the model up.

A study's record (`StudyConfig.to_json`, the "config" of its study.json) is what names it (its
hash). Fields added after studies were recorded without them declare what those studies ran
with (`before`): reading such a record fills that value in (`complete`). A field added without
changing any study is also `implicit`: left out of the record, and so of the hash, while at that
value, so the studies recorded before it and today's at that value keep one record and one name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, NamedTuple, Sequence

from jaxtransfer import conditions

# --dataset: our TF-free TFDS builder of each dataset (`data.cifar_builder`).
TFDS_NAMES = {'cifar10': 'jaxtransfer_cifar10', 'cifar100': 'jaxtransfer_cifar100'}
# Which framework's layer defaults the built-in nets start from. The seed trained in PyTorch: its
# Conv2d and Linear layers start from kaiming_uniform(a=sqrt(5)) weights, i.e. U(+-1/sqrt(fan_in))
# with variance 1/(3 fan_in), and U(+-1/sqrt(fan_in)) biases; its BatchNorm2d tracks the unbiased
# batch variance (n / (n - 1)) in its running variance. flax starts from lecun_normal weights
# (variance 1/fan_in) and zero biases, and tracks the biased variance. Under Adam the initial scale
# sets every layer's relative step, so the choice changes accuracy (see README, "Recipe parity").
LAYER_DEFAULTS = {
    'pytorch': {'param_init': 'pytorch', 'running_var': 'unbiased'},
    'flax': {'param_init': 'flax', 'running_var': 'biased'},
}
FINAL_WIDTHS = (8, 16, 32)  # the final net's filters per block: the seed's 512 head features
OPTIMIZERS = ('adam', 'sgd')
MEMBER_MAPS = ('auto', 'map', 'vmap')  # how members run inside a device (`train.trainer`)
BATCHNORM_POLICIES = ('update', 'fixed', 'target')  # BatchNorm in frozen layers (`transfer`)
HALVINGS = ('random', 'dissimilar', 'explicit')
LR_SCHEDULES = ('constant', 'cosine')
AUGMENTATIONS = ('none', 'crop_flip')  # crop_flip: 4-pixel zero padding, random crop, h-flip
CROP_PADDING = 4
DIRECTIONS = ('AtoB', 'both')
SWEEPABLE = ('epochs', 'train_per_class')
# Features of one stack (every member's train and test images) above this stay uncomputed
# (`train.features`): for the seed's net and K = 4 this caches n >= 2 (n = 1 would need 3.9 GB).
FEATURE_BUDGET_MB = 2048
DEFAULT_CACHE_DIR = '~/.cache/jaxtransfer'  # decoded arrays and compiled programs

_UNSET = object()


def _opt(default: Any, help_text: str, choices: Sequence[str] = (), *, before: Any = _UNSET,
         implicit: bool = False) -> Any:
  """A config field with the help text (and choices) its command-line flag shows. `before`: for
  a field added after studies were recorded without it, the value they ran with; `implicit`:
  the field is recorded only when it is not at `before` (see the module docstring)."""
  if implicit and before is _UNSET:
    raise TypeError('an implicit field is left out of records at its `before` value: give it')
  metadata = {'help': help_text, 'choices': tuple(choices)}
  if before is not _UNSET:
    metadata['before'] = before
  if implicit:
    metadata['implicit'] = True
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that changes a study's results; its hash names the study.

  The one source of every default: `experiments/main.py` defines a flag per field from these
  defaults, help texts and choices, and `driver.resolve` checks a config for the CLI and the
  Python API alike (`validate`, with the model's layers).
  """

  # Data.
  dataset: str = _opt(
      'cifar10', 'TFDS dataset name (our TF-free builder). Ignored when '
      '--image_folder is given.', tuple(TFDS_NAMES))
  data_fingerprint: str = _opt(
      '', "The identity of the data when --image_folder gives it (set from the folder: 'v2:' + "
      'sha256 over its class names, image paths relative to it and the bytes of every image), '
      'so the study is the same wherever the folder lies. Given, the folder must match it.')
  classes: tuple[str, ...] = _opt(
      (), 'Use only these classes (names, as the dataset names them; default all): the data is '
      'restricted to them, in the dataset\'s class order and re-indexed 0..k-1, before it is '
      'split into halves.', before=(), implicit=True)
  # Model.
  model: str = _opt(
      'final', "The network: the seed's 'initial' (8 convs of 3 filters, no pooling) or "
      "'final' (3 conv-BN blocks + pools), or your own flax module as MODULE:ATTR or "
      'path/to/file.py:ATTR, ATTR(num_classes) returning it (contract: '
      'jaxtransfer/nets/modelspec.py).')
  # Added without changing any study: the built-in nets have none, and so record none.
  model_sha256: str = _opt(
      '', 'sha256 of the source of a model of your own (set from it: the bytes of FILE.py for '
      '--model=FILE.py:ATTR, of the module\'s source file for MODULE:ATTR), so that an edited '
      'model is another study and a workdir refuses to resume with it. Given, the source must '
      'match it. Empty for the built-in nets.', before='', implicit=True)
  widths: tuple[int, ...] = _opt(
      FINAL_WIDTHS, "Filters of the final net's three blocks; the "
      "default 8,16,32 gives the seed's 512 features into the head. Built-in nets only.")
  # Added with a new default (the flax-default studies are recorded without it): recorded always.
  layer_defaults: str = _opt(
      'pytorch', "Which framework's layer defaults the nets start from: "
      "'pytorch' (the seed's: kaiming-uniform weights and uniform biases "
      'in +-1/sqrt(fan_in), unbiased BatchNorm running variance) or '
      "'flax' (lecun-normal weights, zero biases, biased running "
      'variance; the flax-default studies). Built-in nets only.', tuple(LAYER_DEFAULTS),
      before='flax')
  # Protocol.
  halves: str = _opt(
      'random', "How classes split into A and B: 'random' halves, or "
      "'dissimilar': man-made (A) against natural (B) classes of CIFAR-10 (4 vs 6) "
      'or CIFAR-100 (by superclass, 30 vs 70); \'explicit\': the classes --half_classes '
      'names (one split).', HALVINGS)
  half_classes: str = _opt(
      '', 'With --halves=explicit: the classes of A and of B by name, A/B, e.g. '
      'cat,dog,deer/airplane,ship,truck (disjoint, at least 2 each; classes in neither half are '
      'unused).', before='', implicit=True)
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
      "transferred running statistics; 'target' uses statistics measured once on the target "
      'half\'s training images before training (frozen random layers keep their scale).',
      BATCHNORM_POLICIES)
  # Training.
  epochs: int = _opt(10, 'Training epochs for every model.')
  batch_size: int = _opt(64, 'Minibatch size.')
  optimizer: str = _opt('adam', 'adam (AdamW) or sgd with momentum 0.9.', OPTIMIZERS)
  learning_rate: float = _opt(1e-3, 'Learning rate.')
  weight_decay: float = _opt(0.0, 'Decoupled weight decay.')
  # SGD's momentum was fixed at 0.9 before it was a flag: recorded only off that value.
  momentum: float = _opt(0.9, 'SGD momentum (with --optimizer=sgd).', before=0.9, implicit=True)
  # Added at the seed's recipe (a constant rate, no augmentation): recorded only off it.
  lr_schedule: str = _opt(
      'constant', "The learning rate over training: 'constant' (the seed's) or 'cosine' "
      'decay to 0 at the last step (after the warm-up).', LR_SCHEDULES, before='constant',
      implicit=True)
  warmup_epochs: int = _opt(
      0, 'Epochs over which the learning rate rises linearly from 0 to --learning_rate, '
      'before --lr_schedule takes over.', before=0, implicit=True)
  augment: str = _opt(
      'none', "Training-image augmentation, on device: 'none' (the seed's) or 'crop_flip' (the "
      'standard CIFAR one: a random crop of the image zero-padded by 4 pixels, and a '
      'horizontal flip with p = 0.5). Never on test images. Trains every stack the plain way '
      '(no precomputed prefix features).', AUGMENTATIONS, before='none', implicit=True)
  train_per_class: int = _opt(
      0, 'Use only the first N training images of each class (0 = '
      'all). For quick runs and data-size sweeps.')
  # Campaigns and analysis.
  sweep: str = _opt(
      '', 'Repeat the study for several values of one flag, e.g. epochs=10,30,100 '
      'or train_per_class=500,1000,2500,5000: one sub-study per value in '
      "WORKDIR/<flag>-<value>/, plus sweep.md and a figure: every claim's verdict at each "
      'value.')
  cka_images: int = _opt(
      500, 'Target test images for the layer-similarity (linear CKA) '
      'heat-map; 0 skips it.')

  def to_json(self) -> dict:
    """The study's record: every field in JSON form, an implicit one only off its `before`."""
    return _recorded(json.loads(json.dumps(dataclasses.asdict(self))))

  def hash(self) -> str:
    return config_hash(self.to_json())


def config_hash(config: dict) -> str:
  """The name of a study: a hash of its record (`StudyConfig.to_json`, `with_defaults`)."""
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
      f'{DEFAULT_CACHE_DIR}).')
  member_map: str = _opt(
      'auto', "How a stack's members run on a device: vmap (one batched kernel; the "
      "accelerators' default), map (in turn; CPU's default) or auto. Results agree up to float "
      'noise.', MEMBER_MAPS)
  feature_budget_mb: int = _opt(
      FEATURE_BUDGET_MB, 'Memory for the outputs of frozen prefixes under '
      '--frozen_batchnorm=fixed or target, computed once per stack instead of at every step (same '
      'results, faster); a stack needing more trains the plain way. 0: never.')
  eval_batch_size: int = _opt(
      1000, 'Test images per evaluation batch (memory against speed; not part of the study).')
  members_per_program: int = _opt(
      0, "Models one compiled program trains at once: a larger stack runs in chunks of this "
      'many, one after another within each epoch (device memory against speed; the same '
      'results). 0: as many as fit in the memory a GPU or TPU reports, judged from the compiled '
      "programs' memory_analysis(); a whole stack at once on a CPU.")
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
    _choice('member_map', self.member_map, MEMBER_MAPS)
    if not isinstance(self.feature_budget_mb, int) or self.feature_budget_mb < 0:
      raise ConfigError(f'--feature_budget_mb must be an integer >= 0 (MB), got '
                        f'{self.feature_budget_mb!r}')
    if not isinstance(self.members_per_program, int) or self.members_per_program < 0:
      raise ConfigError(f'--members_per_program must be an integer >= 0, got '
                        f'{self.members_per_program!r}')
    if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
      raise ConfigError(f'--eval_batch_size must be an integer >= 1, got '
                        f'{self.eval_batch_size!r}')


def check_model_flags(config: StudyConfig) -> StudyConfig:
  """The checks that come before the model is looked at (a built-in net is built from these):
  every flag's choice, and --widths, as integers."""
  for f in dataclasses.fields(StudyConfig):
    if f.metadata['choices'] and not isinstance(f.default, tuple):
      _choice(f.name, getattr(config, f.name), f.metadata['choices'])
  widths = _ints('widths', config.widths)
  if config.model == 'final' and (len(widths) != 3 or min(widths) < 1):
    raise ConfigError(f'--widths needs three positive integers, got '
                      f'{",".join(map(str, config.widths))}')
  return dataclasses.replace(config, widths=widths)


def validate(config: StudyConfig, layers: int) -> StudyConfig:
  """The config with every rule applied and its values normalised, for a model of `layers`
  layers (`study.context.validate` counts them): depths default to 1..L-1 and are sorted,
  `splits` naming every split becomes () (the same study). Raises ConfigError (one line) on
  anything that cannot run."""
  config = check_model_flags(config)
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
  if config.momentum < 0:
    raise ConfigError(f'--momentum must be >= 0, got {config.momentum}')
  if config.optimizer != 'sgd' and config.momentum != StudyConfig.momentum:
    raise ConfigError(f'--momentum applies to --optimizer=sgd only, not to --optimizer '
                      f'{config.optimizer}')
  if config.warmup_epochs < 0 or config.warmup_epochs > config.epochs:
    raise ConfigError(f'--warmup_epochs must be in 0..--epochs ({config.epochs}), got '
                      f'{config.warmup_epochs}')
  classes = _class_names('classes', config.classes)
  if classes and len(classes) < 2:
    raise ConfigError(f'--classes needs at least 2 classes to split, got {",".join(classes)}')
  half_classes = _checked_halves(config, classes)
  split_ids = tuple(sorted(set(_ints('splits', config.splits))))
  if any(not 0 <= s < config.num_splits for s in split_ids):
    raise ConfigError(f'--splits {",".join(map(str, config.splits))}: indices must be in 0..'
                      f'{config.num_splits - 1} (--num_splits={config.num_splits})')
  if split_ids == tuple(range(config.num_splits)):
    split_ids = ()  # all of them: the same study as no --splits
  if config.sweep:
    parse_sweep(config.sweep)
  return dataclasses.replace(config, depths=tuple(sorted(set(depths))), conditions=chosen,
                             splits=split_ids, classes=classes, half_classes=half_classes)


def _class_names(name: str, values: Sequence[str]) -> tuple[str, ...]:
  """Class names, sorted (the same classes in any order are the same study), each once."""
  names = [str(v).strip() for v in values]
  if any(not n for n in names):
    raise ConfigError(f'--{name} {",".join(values)}: empty class name')
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f'--{name} names {", ".join(repeated)} twice')
  return tuple(sorted(names))


def half_names(half_classes: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """'cat,dog/airplane,ship' -> (('cat', 'dog'), ('airplane', 'ship')), unchecked."""
  a, _, b = half_classes.partition('/')
  return tuple(a.split(',')), tuple(b.split(','))


def _checked_halves(config: StudyConfig, classes: tuple[str, ...]) -> str:
  """--half_classes checked against --halves, --num_splits and --classes; normalised."""
  if config.halves != 'explicit':
    if config.half_classes:
      raise ConfigError(f'--half_classes applies to --halves=explicit only, not to --halves '
                        f'{config.halves}')
    return ''
  if config.half_classes.count('/') != 1:
    raise ConfigError(f'--halves=explicit needs --half_classes=A1,A2,.../B1,B2,... (the '
                      f'classes of A and of B), got {config.half_classes!r}')
  if config.num_splits != 1:
    raise ConfigError('--halves=explicit is one fixed split: use --num_splits=1')
  a, b = (_class_names('half_classes', half) for half in half_names(config.half_classes))
  if min(len(a), len(b)) < 2:
    raise ConfigError(f'--half_classes {config.half_classes}: each half needs at least 2 classes')
  shared = sorted(set(a) & set(b))
  if shared:
    raise ConfigError(f'--half_classes {config.half_classes}: {", ".join(shared)} in both halves')
  outside = sorted(set(a + b) - set(classes)) if classes else []
  if outside:
    raise ConfigError(f'--half_classes names {", ".join(outside)}, not among --classes')
  return f'{",".join(a)}/{",".join(b)}'


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


def with_model_source(config: StudyConfig, digest: str) -> StudyConfig:
  """`config` identified by its model's source too: `digest` is the sha256 of the source file of
  a model of your own ('' for a built-in net, or a model without a source file)."""
  if config.model_sha256 and not digest:
    raise ConfigError(f'--model_sha256 names the source of a model of your own, and --model '
                      f'{config.model} has none')
  if config.model_sha256 and config.model_sha256 != digest:
    raise ConfigError(f'--model {config.model}: its source has sha256 {digest}, not '
                      f'--model_sha256 {config.model_sha256}')
  return dataclasses.replace(config, model_sha256=digest)


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


class SubStudy(NamedTuple):
  """One value of a sweep: its folder in the sweep's workdir, and its study."""

  folder: str
  config: StudyConfig


def sweep_studies(config: StudyConfig) -> list[SubStudy]:
  """A sweep's sub-studies, one per value."""
  param, values = parse_sweep(config.sweep)
  return [
      SubStudy(f'{param}-{value}', dataclasses.replace(config, sweep='', **{param: value}))
      for value in values
  ]


def differing(a: dict, b: dict, ignore: Sequence[str] = ()) -> list[str]:
  """The config fields whose values differ between `a` and `b`, sorted."""
  return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


# Fields added after studies were recorded without them: the value those studies ran with (not
# necessarily today's default).
ADDED_VALUES = {
    f.name: json.loads(json.dumps(f.metadata['before']))
    for f in dataclasses.fields(StudyConfig)
    if 'before' in f.metadata
}
# Of those, the ones recorded only when not at that value.
IMPLICIT = tuple(f.name for f in dataclasses.fields(StudyConfig) if f.metadata.get('implicit'))
# Fields removed since, with the value that meant nothing: a record holding it reads as if it did
# not. (A recorded image-folder path means something: `study.migrate` turns it into the folder's
# `data_fingerprint`.)
REMOVED_VALUES = {'image_folder': ''}


def _recorded(values: dict) -> dict:
  return {k: v for k, v in values.items() if not (k in IMPLICIT and v == ADDED_VALUES[k])}


def complete(recorded: dict) -> dict:
  """Every field of a recorded config (JSON form): those added since at the value its study ran
  with (ADDED_VALUES), the others missing at their defaults; removed fields at their empty value
  dropped (REMOVED_VALUES), unknown ones kept (`from_json` names them)."""
  kept = {k: v for k, v in recorded.items() if k not in REMOVED_VALUES or v != REMOVED_VALUES[k]}
  defaults = json.loads(json.dumps(dataclasses.asdict(StudyConfig())))
  return {**defaults, **ADDED_VALUES, **kept}


def with_defaults(recorded: dict) -> dict:
  """A recorded config as today's code records its study (`StudyConfig.to_json`): comparable
  with another study's record, and hashed to the study's name."""
  return _recorded(complete(recorded))


def from_json(recorded: Any, where: str) -> StudyConfig:
  """The config a study.json records (`where`, named in every error): known fields only, each of
  its default's type. Not yet checked against its model: `study.context.from_json` is."""
  if not isinstance(recorded, dict):
    raise ConfigError(f'{where}: "config" must be an object of flags, got {recorded!r:.60}')
  values = complete(recorded)
  defaults = StudyConfig()
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(StudyConfig)})
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
  return StudyConfig(**values)
