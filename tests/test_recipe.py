"""Recipe options (learning-rate schedule and warm-up, augmentation, explicit halves, class
subsets): at their defaults the seed's recipe, bit for bit and under the same study names; off
them, training changes as documented."""

import csv
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtransfer import config as config_lib
from jaxtransfer.config import ConfigError, StudyConfig
from jaxtransfer.data import splits
from jaxtransfer.data.types import ArrayDataset
from jaxtransfer.study import context, plan
from jaxtransfer.train import features, trainer
from tests.conftest import (DATA, HALVES, MODEL, NAMES, ROOT, make_image_folder, members, run_cli,
                            take, tiny_args)

RECIPE_DEFAULTS = {
    'classes': (), 'half_classes': '', 'lr_schedule': 'constant', 'warmup_epochs': 0,
    'augment': 'none'
}
PUBLISHED = os.path.join(ROOT, 'results', 'cifar10', 'seed_fixed-split0', 'study.json')


def test_the_recipe_at_its_defaults_is_the_published_study():
  """The new fields at their defaults, given explicitly, leave a published study's record and
  name as they were: they are not recorded at the seed's values."""
  record = json.load(open(PUBLISHED))
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in record['config'].items()}
  config = StudyConfig(**values, **RECIPE_DEFAULTS)
  assert config.to_json() == record['config']
  assert config.hash() == record['config_hash'] == '159a024c6ad1'
  assert set(RECIPE_DEFAULTS) <= set(config_lib.IMPLICIT)
  assert {k: config_lib.ADDED_VALUES[k] for k in RECIPE_DEFAULTS
         } == {**RECIPE_DEFAULTS, 'classes': []}


@pytest.mark.parametrize('change', [
    {'lr_schedule': 'cosine'},
    {'warmup_epochs': 2},
    {'augment': 'crop_flip'},
    {'classes': ('cat', 'dog')},
    {'halves': 'explicit', 'half_classes': 'cat,dog/ship,truck', 'num_splits': 1},
])
def test_each_recipe_option_names_another_study(change):
  default = StudyConfig()
  config = config_lib.validate(dataclasses.replace(default, **change), 7)
  recorded = config.to_json()
  for name in set(change) & set(RECIPE_DEFAULTS):
    assert recorded[name] == json.loads(json.dumps(change[name]))
  assert config.hash() != default.hash()
  assert config_lib.from_json(recorded, 'x') == config


def test_class_flags_are_checked_and_normalised():
  ok = lambda **kw: config_lib.validate(StudyConfig(**kw), 7)
  explicit = dict(halves='explicit', num_splits=1)
  # The same classes in any order are the same study.
  assert ok(classes=('dog', 'cat', 'bird')).classes == ('bird', 'cat', 'dog')
  assert ok(**explicit, half_classes='dog,cat/truck,ship').half_classes == 'cat,dog/ship,truck'
  refusals = [
      (dict(classes=('cat',)), '--classes needs at least 2 classes to split, got cat'),
      (dict(classes=('cat', 'cat', 'dog')), '--classes names cat twice'),
      (dict(half_classes='cat,dog/ship,truck'),
       '--half_classes applies to --halves=explicit only, not to --halves random'),
      (dict(**explicit), '--halves=explicit needs --half_classes=A1,A2,.../B1,B2,...'),
      (dict(halves='explicit', half_classes='cat,dog/ship,truck'),
       '--halves=explicit is one fixed split: use --num_splits=1'),
      (dict(**explicit, half_classes='cat/ship,truck'), 'each half needs at least 2 classes'),
      (dict(**explicit, half_classes='cat,dog/dog,truck'), 'dog in both halves'),
      (dict(**explicit, half_classes='cat,dog/ship,truck',
            classes=('cat', 'dog', 'ship')), '--half_classes names truck, not among --classes'),
      (dict(warmup_epochs=11), r'--warmup_epochs must be in 0..--epochs \(10\), got 11'),
      (dict(lr_schedule='step'), "--lr_schedule 'step': expected one of constant, cosine"),
  ]
  for kwargs, message in refusals:
    with pytest.raises(ConfigError, match=message):
      context.validate(StudyConfig(**kwargs))


# --- the learning-rate schedule ---------------------------------------------------------------


def expected_rate(step, lr, warmup, total, cosine):
  """The documented schedule, written out: linear warm-up from 0, then constant or cosine."""
  if step < warmup:
    return lr * step / warmup
  if not cosine:
    return lr
  return lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


@pytest.mark.parametrize('schedule,warmup', [('cosine', 0), ('cosine', 1), ('constant', 1)])
def test_the_optimizer_applies_the_scheduled_rate_at_each_step(schedule, warmup):
  """The trainer's optimizer (plain SGD, so an update is -rate * gradient) on a member of 50
  images in batches of 16: 4 steps an epoch (3 full, 1 partial), the schedule's unit."""
  config = trainer.TrainConfig(epochs=3, batch_size=16, optimizer='sgd', momentum=0.0,
                               learning_rate=0.1, lr_schedule=schedule, warmup_epochs=warmup)
  example = jnp.zeros((1,) + DATA.train_images.shape[1:], jnp.float32)
  t = trainer.Trainer(MODEL, trainer.Structure(), config, example, train_images=50)
  params = jax.jit(t.init)(jax.random.key(0), None).params
  state = t.tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  steps, total = 4, 12
  for step in range(total):
    updates, state = t.tx.update(ones, state, params)
    want = expected_rate(step, 0.1, warmup * steps, total, schedule == 'cosine')
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_allclose(-leaf, want, rtol=1e-5, atol=1e-8, err_msg=str(step))
  assert trainer.steps_per_epoch(50, 16) == 4 and trainer.steps_per_epoch(48, 16) == 3


def test_a_stack_counts_its_schedule_in_its_members_steps():
  """The masked optimizer a Trainer builds counts steps per member: after an epoch of a member
  of 40 images in batches of 16 (3 steps), its cosine rate is the formula's at step 3."""
  config = trainer.TrainConfig(epochs=2, batch_size=16, optimizer='sgd', momentum=0.0,
                               learning_rate=0.1, lr_schedule='cosine')
  example = jnp.zeros((1,) + DATA.train_images.shape[1:], jnp.float32)
  t = trainer.Trainer(MODEL, trainer.Structure(), config, example, train_images=40)
  ms = take(members(HALVES), 0)
  state = jax.jit(t.init)(ms.init_keys[0], None)
  state, _ = t.epoch(state, ms.shuffle_keys[0], ms.train_idx[0], ms.label_map[0], DATA)
  counts = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, 'dtype', None) == jnp.int32]
  assert counts and all(int(c) == 3 for c in counts)
  assert float(trainer.learning_rate(config,
                                     3)(3)) == pytest.approx(expected_rate(3, 0.1, 0, 6, True))


AUGMENTED = trainer.TrainConfig(epochs=1, batch_size=16, learning_rate=0.03, augment='crop_flip',
                                lr_schedule='cosine')


@pytest.fixture(scope='module')
def augmented_loop():
  """The HALVES trained with AUGMENTED, members in a loop (the CPU's member map)."""
  return trainer.train_stack(MODEL, trainer.Structure(), AUGMENTED, DATA, members(HALVES),
                             member_map='map')


def test_the_recipe_changes_training_and_its_default_does_not(augmented_loop):
  """The options at the seed's values are the config of before (so the same programs); away
  from them, augmentation changes what a stack learns. (The schedules' effect on every update
  is checked step by step above, through the trainer's own optimizer.)"""
  base = trainer.TrainConfig(epochs=1, batch_size=16, learning_rate=0.03)
  explicit = dataclasses.replace(base, lr_schedule='constant', warmup_epochs=0, augment='none')
  assert explicit == base and trainer.learning_rate(explicit, 3) == 0.03  # the plain float
  plain = trainer.train_stack(MODEL, trainer.Structure(),
                              dataclasses.replace(AUGMENTED, augment='none'), DATA, members(HALVES),
                              member_map='map')
  kernel = lambda r: r.variables['params']['head']['dense']['kernel']
  assert not np.allclose(kernel(augmented_loop), kernel(plain))


# --- augmentation -----------------------------------------------------------------------------


def test_crop_flip_is_a_shift_of_the_zero_padded_image_maybe_flipped():
  images = jnp.asarray(np.random.default_rng(0).integers(1, 256, (64, 8, 8, 3)), jnp.uint8)
  out = np.asarray(trainer.augment(jax.random.key(3), images))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  seen = []
  for image, x in zip(padded, out):
    matches = [(dy, dx, flip)
               for dy in range(9)
               for dx in range(9)
               for flip in (False, True)
               if np.array_equal((lambda c: c[:, ::-1] if flip else c)(image[dy:dy + 8,
                                                                             dx:dx + 8]), x)]
    assert len(matches) == 1  # pixels >= 1: the padding (0) shows where the crop lies
    seen.append(matches[0])
  flips = [f for _, _, f in seen]
  assert 20 < sum(flips) < 44 and len({(dy, dx) for dy, dx, _ in seen}) > 30
  # 'none' is the image itself.
  np.testing.assert_array_equal(trainer.augment(jax.random.key(3), images, 'none'), images)


def test_each_member_augments_with_its_own_stream_whatever_the_stack(augmented_loop):
  """Two members' augmented batches differ (keys from their own shuffle keys), and a member
  trained alone learns what it learns in a stack (so its stream ignores the stack)."""
  ms = members(HALVES)
  epoch_keys = [jax.random.fold_in(ms.shuffle_keys[i], 0) for i in range(2)]
  batch = DATA.train_images[:16]
  draw = lambda key: trainer.augment(jax.random.fold_in(key, trainer._AUGMENT_STREAM), batch)
  assert not np.array_equal(draw(epoch_keys[0]), draw(epoch_keys[1]))
  alone = trainer.train_stack(MODEL, trainer.Structure(), AUGMENTED, DATA, take(ms, 2),
                              member_map='map')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[2], b[0], rtol=1e-5, atol=1e-6),
               augmented_loop.variables, alone.variables)


def test_augmentation_never_uses_precomputed_prefix_features():
  prefix = tuple(NAMES[:3])
  structure = trainer.Structure(prefix, prefix, 'fixed')
  shape = DATA.train_images.shape[1:]
  assert features.planned_nbytes(MODEL, structure, 3, 40, 12, shape, budget_mb=1) is not None
  assert features.planned_nbytes(MODEL, structure, 3, 40, 12, shape, budget_mb=1,
                                 augment=True) is None
  example = jnp.zeros((1,) + shape, jnp.float32)
  with pytest.raises(ValueError, match='augmented images have no precomputed prefix features'):
    trainer.Trainer(MODEL, structure, trainer.TrainConfig(augment='crop_flip'), example, start=3)


# --- class subsets and explicit halves --------------------------------------------------------

NAMES5 = ('cat', 'ant', 'bee', 'dog', 'eel')


def dataset(per_class=3):
  labels = np.repeat(np.arange(5), per_class).astype(np.int32)
  images = np.broadcast_to(labels[:, None, None, None], (len(labels), 8, 8, 3)).astype(np.uint8)
  return ArrayDataset(images.copy(), labels, NAMES5)


def test_a_class_subset_keeps_only_its_images_reindexed():
  ds = splits.restrict(dataset(), ('eel', 'ant', 'dog'))
  assert ds.class_names == ('ant', 'dog', 'eel')  # the dataset's order
  np.testing.assert_array_equal(ds.labels, np.repeat([0, 1, 2], 3))
  np.testing.assert_array_equal(ds.images[:, 0, 0, 0], np.repeat([1, 3, 4], 3))  # old labels
  with pytest.raises(
      ConfigError, match='--classes: no class owl in this data; its classes are '
      'cat, ant, bee, dog, eel'):
    splits.restrict(dataset(), ('owl', 'ant'))


def test_explicit_halves_are_the_named_classes():
  config = context.validate(
      StudyConfig(halves='explicit', half_classes='dog,cat/eel,bee', num_splits=1))
  assert plan.make_halves(config, NAMES5) == [((0, 3), (2, 4))]
  ds = dataset()
  study = context.build(config, ds, ds)
  assert study.halves == (((0, 3), (2, 4)),)
  assert {study.classes(r) for stack in study.stacks for r in stack.runs} == {(0, 3), (2, 4)}
  bad = dataclasses.replace(config, half_classes='cat,dog/eel,owl')
  with pytest.raises(ConfigError, match='--half_classes: no class owl in this data'):
    plan.make_halves(bad, NAMES5)


def test_a_study_on_a_class_subset_with_explicit_halves_and_the_whole_recipe(tmp_path):
  """The command line, end to end: 4 of 6 classes, named halves, cosine with warm-up, crop/flip,
  under `fixed` (whose prefix features augmentation rules out: were they planned, the trainer
  would refuse them): rows name the re-indexed halves, the study records its recipe."""
  folder = tmp_path / 'images'
  make_image_folder(folder, ('ant', 'bee', 'cat', 'dog', 'eel', 'fox'), 8, 4)
  workdir = str(tmp_path / 'wd')
  args = tiny_args(folder, workdir, '--num_splits=1', '--depths=1', '--conditions=BnB',
                   '--classes=fox,bee,dog,cat', '--halves=explicit',
                   '--half_classes=dog,fox/bee,cat', '--lr_schedule=cosine', '--warmup_epochs=1',
                   '--augment=crop_flip', '--frozen_batchnorm=fixed', '--cka_images=0')
  assert run_cli(*args) == 0
  record = json.load(open(os.path.join(workdir, 'study.json')))
  assert {k: record['config'][k] for k in RECIPE_DEFAULTS} == {
      'classes': ['bee', 'cat', 'dog', 'fox'], 'half_classes': 'dog,fox/bee,cat',
      'lr_schedule': 'cosine', 'warmup_epochs': 1, 'augment': 'crop_flip'
  }
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  # bee, cat, dog, fox -> 0, 1, 2, 3: A = dog, fox; B = bee, cat.
  assert {(r['classes_A'], r['classes_B']) for r in rows} == {('2 3', '0 1')}
  assert len(rows) == 2 + 2  # the base nets of A and B, then BnB with each as the target


def test_the_options_given_at_their_defaults_train_the_same_study_bit_for_bit(
    image_folder, tmp_path):
  """From the command line: the same study.json, byte for byte, and the same checkpoints (their
  sha256 digests in the rows files) as the flags left out."""
  small = ('--num_splits=1', '--depths=1', '--conditions=BnB', '--cka_images=0')
  default, explicit = str(tmp_path / 'default'), str(tmp_path / 'explicit')
  assert run_cli(*tiny_args(image_folder, default, *small)) == 0
  assert run_cli(
      *tiny_args(image_folder, explicit, *small, '--lr_schedule=constant', '--warmup_epochs=0',
                 '--augment=none', '--classes=', '--halves=random', '--half_classes=')) == 0
  read = lambda wd, name: open(os.path.join(wd, name), 'rb').read()
  assert read(default, 'study.json') == read(explicit, 'study.json')
  stacks = sorted(os.listdir(os.path.join(default, 'stacks')))
  assert stacks == sorted(os.listdir(os.path.join(explicit, 'stacks'))) and len(stacks) == 2
  for name in stacks:
    digests = lambda wd: json.loads(read(wd, os.path.join('stacks', name)))['checkpoint_sha256']
    assert digests(default) == digests(explicit)


def test_dissimilar_halves_of_a_class_subset():
  names = ('airplane', 'cat', 'dog', 'ship')  # --classes=cat,dog,airplane,ship of CIFAR-10
  assert splits.dissimilar_halves(names) == ((0, 3), (1, 2))
  with pytest.raises(ValueError, match='need both man-made'):
    splits.dissimilar_halves(('cat', 'dog'))


def test_augmented_vmapped_members_train_like_the_loop(augmented_loop):
  """The accelerators' member map draws the same crops and flips as the loop over members."""
  vmap = trainer.train_stack(MODEL, trainer.Structure(), AUGMENTED, DATA, members(HALVES),
                             member_map='vmap')
  np.testing.assert_allclose(vmap.train_loss, augmented_loop.train_loss, rtol=1e-4)
  np.testing.assert_allclose(vmap.train_accuracy, augmented_loop.train_accuracy, atol=1e-6)


def test_a_schedule_on_precomputed_prefix_features_is_the_plain_paths(stacked):
  """Prefix features keep each member's step count (its train images), so a warm-up + cosine
  schedule trains as on the plain path (compared as tests/test_features.py does: the loss)."""
  config = trainer.TrainConfig(epochs=2, batch_size=16, learning_rate=0.03, lr_schedule='cosine',
                               warmup_epochs=1)
  prefix = tuple(NAMES[:3])
  sources = {c: {n: v[n] for n in prefix if n in v} for c, v in stacked.variables.items()}
  structure = trainer.Structure(prefix, prefix, 'fixed')
  ms = members(HALVES, 7, sources)
  plain = trainer.train_stack(MODEL, structure, config, DATA, ms)
  cached, indexed = features.compute(MODEL, ms, DATA, start=3)
  fast = trainer.train_stack(MODEL, structure, config, DATA, indexed, features=cached)
  np.testing.assert_allclose(fast.train_loss, plain.train_loss, rtol=1e-5)
  constant = trainer.train_stack(
      MODEL, structure, dataclasses.replace(config, lr_schedule='constant', warmup_epochs=0), DATA,
      indexed, features=cached)
  assert not np.allclose(constant.train_loss, plain.train_loss, rtol=1e-3)
