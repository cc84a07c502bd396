"""The plan: config validation (shared by CLI and Python API), runs, stacks, flagfiles."""

import dataclasses
import json
import os

import numpy as np
import pytest
from absl import flags

from experiments import main as cli
from jaxtransfer import conditions
from jaxtransfer import config as config_lib
from jaxtransfer.config import ConfigError, RunOptions, StudyConfig
from jaxtransfer.study import context, driver, plan
from jaxtransfer.data import splits
from jaxtransfer.train import trainer
from jaxtransfer.study import workdir as workdir_lib
from tests.conftest import ROOT

FLAGS = flags.FLAGS


def test_a_shard_plans_exactly_its_splits_runs():
  layers = ('conv1', 'conv2', 'head')
  halves = splits.random_halves(10, 3, seed=0)
  whole = StudyConfig(num_splits=3, depths=(1, 2), conditions=('BnB', 'AnB+'))
  shard = StudyConfig(num_splits=3, depths=(1, 2), conditions=('BnB', 'AnB+'), splits=(0, 2))
  runs = lambda config: [r for s in plan.plan(config, layers, halves) for r in s.runs]
  assert runs(shard) == [r for r in runs(whole) if r.split != 1]
  assert len(runs(shard)) == 2 * 2 + 2 * 2 * 2 * 2
  # A shard's splits are those of the whole study (the sequence is prefix-stable).
  assert splits.random_halves(10, 2, seed=0) == halves[:2]


@pytest.mark.parametrize('flagfile', sorted(os.listdir(os.path.join(ROOT, 'experiments',
                                                                    'configs'))))
def test_every_flagfile_parses_to_a_valid_study(flagfile, monkeypatch):
  monkeypatch.chdir(ROOT)
  FLAGS.unparse_flags()
  FLAGS(['main', f'--flagfile=experiments/configs/{flagfile}', '--workdir=unused'])
  config = cli.config_from_flags()
  assert config.epochs >= 1 and config.depths and config.conditions
  if config.sweep:
    config_lib.parse_sweep(config.sweep)
  if flagfile == 'seed.flags':
    assert (config.num_splits, config.epochs, config.depths) == (5, 10, (1, 2, 3, 4, 5, 6))
    assert config.conditions == ('BnB', 'BnB+', 'AnB', 'AnB+') and config.directions == 'both'


def test_flags_take_their_defaults_and_choices_from_the_config():
  FLAGS.unparse_flags()
  FLAGS(['main', '--workdir=unused'])
  for field in dataclasses.fields(StudyConfig) + dataclasses.fields(RunOptions):
    value = FLAGS[field.name].value
    default = field.default
    assert (tuple(value) if isinstance(value, list) else value) == (tuple(map(
        str, default)) if isinstance(default, tuple) else default), field.name
    if field.metadata['choices'] and not isinstance(default, tuple):
      assert FLAGS[field.name].parser.enum_values == list(field.metadata['choices'])
  assert cli.from_flags(RunOptions) == RunOptions()
  FLAGS.unparse_flags()
  FLAGS([
      'main', '--workdir=unused', '--member_map=vmap', '--feature_budget_mb=0',
      workdir_lib.RETRAIN_FLAG
  ])  # the flag its recovery message names
  assert cli.from_flags(RunOptions) == RunOptions(member_map='vmap', feature_budget_mb=0,
                                                  retrain_corrupt=True)


def test_the_trainer_gets_each_setting_from_its_one_source():
  """Every TrainConfig field is named with its source: the study's or the run's."""
  config = StudyConfig(epochs=3, batch_size=8, optimizer='sgd', learning_rate=0.1,
                       weight_decay=0.01, momentum=0.5, lr_schedule='cosine', warmup_epochs=1,
                       augment='crop_flip')
  sources = {
      'epochs': 3, 'batch_size': 8, 'optimizer': 'sgd', 'learning_rate': 0.1, 'weight_decay': 0.01,
      'momentum': 0.5, 'lr_schedule': 'cosine', 'warmup_epochs': 1, 'augment': 'crop_flip',
      'eval_batch_size': 7
  }
  assert dataclasses.asdict(context.train_config(config, RunOptions(eval_batch_size=7))) == sources
  assert all(getattr(trainer.TrainConfig(), k) != v for k, v in sources.items())
  assert context.train_config(StudyConfig(), RunOptions()) == trainer.TrainConfig()


def test_momentum_reaches_the_trainer():
  """--momentum reaches the trainer's optimizer: SGD's second step of the same gradient g is
  -lr (1 + momentum) g (weight decay 0, so an update is the rate times the trace)."""
  def second_update(momentum: float) -> float:
    config = StudyConfig(optimizer='sgd', momentum=momentum, weight_decay=0.0, learning_rate=0.5)
    tx = trainer.make_optimizer(context.train_config(config, RunOptions()))
    params = grads = {'w': np.float32(1.0)}
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
    return float(updates['w'])

  assert second_update(0.0) == pytest.approx(-0.5)
  assert second_update(0.9) == pytest.approx(-0.5 * 1.9)


def test_a_published_study_keeps_its_record_and_name(monkeypatch):
  """Its flags still give its study.json's config byte for byte, and its hash: --momentum, added
  since at the value it ran with, is left out of the record."""
  monkeypatch.chdir(ROOT)
  FLAGS.unparse_flags()
  FLAGS([
      'main', '--flagfile=experiments/configs/seed.flags', '--conditions=BnB,AnB',
      '--frozen_batchnorm=fixed', '--splits=0', '--workdir=unused'
  ])
  path = os.path.join(ROOT, 'results', 'cifar10', 'seed_fixed-split0', 'study.json')
  record = json.load(open(path))
  config = config_lib.with_data(cli.config_from_flags(), record['config']['data_fingerprint'])
  assert json.dumps(config.to_json(), sort_keys=True) == json.dumps(record['config'],
                                                                    sort_keys=True)
  assert config.hash() == record['config_hash'] == '159a024c6ad1'
  assert workdir_lib.read_study(path).config == config


def test_run_options_are_checked_on_construction():
  with pytest.raises(ConfigError, match="--member_map 'pmap': expected one of auto, map"):
    RunOptions(member_map='pmap')
  with pytest.raises(ConfigError, match='--feature_budget_mb must be an integer >= 0'):
    RunOptions(feature_budget_mb=-1)


def test_validate_normalises_like_the_cli(tmp_path):
  config = driver.resolve(StudyConfig(num_splits=2, splits=('1', '0', '1'), widths=('2', '2', '2')))
  assert config.depths == (1, 2, 3, 4, 5, 6)  # 1..L-1 of the 7-layer final net
  assert config.splits == () and config.widths == (2, 2, 2)  # every split: the whole study
  assert driver.resolve(config) == config
  assert driver.resolve(StudyConfig(model='initial')).depths == tuple(range(1, 9))
  with pytest.raises(ConfigError, match="--frozen_batchnorm 'frozen': expected one of"):
    driver.resolve(StudyConfig(frozen_batchnorm='frozen'))


def test_a_study_is_named_by_its_datas_content_not_its_path():
  config = driver.resolve(StudyConfig())
  assert 'image_folder' not in config.to_json()  # where the data is: a run option, not identity
  named = config_lib.with_data(config, 'f' * 64)
  assert named.data_fingerprint == 'f' * 64 and named.hash() != config.hash()
  assert config_lib.with_data(named, 'f' * 64) == named  # given, it must match
  with pytest.raises(ConfigError, match='--image_folder holds other data'):
    config_lib.with_data(named, 'e' * 64)
  with pytest.raises(ConfigError, match='give it with --image_folder'):
    config_lib.with_data(named, '')
  # A study.json of before: an empty image_folder (TFDS data) reads as today's config.
  assert config_lib.with_defaults({**config.to_json(), 'image_folder': ''}) == config.to_json()
  assert config_lib.config_hash(config.to_json()) == config.hash()


def test_unbalanced_halves_train_in_stacks_of_their_own_size():
  layers = ('conv1', 'conv2', 'head')
  halves = splits.random_halves(4, 2, seed=0)
  config = StudyConfig(num_splits=2, depths=(1,), conditions=('BnB', 'AnB+'))
  balanced = {(s, h): (16, 8) for s in range(2) for h in 'AB'}
  plain = plan.plan(config, layers, halves)
  assert plan.plan(config, layers, halves, balanced) == plain  # same stacks, same names
  sizes = {**balanced, (1, 'A'): (13, 8), (1, 'B'): (16, 7)}
  stacks = plan.plan(config, layers, halves, sizes)
  names = [s.name for s in stacks]
  assert len(set(names)) == len(names)
  assert {r for s in stacks for r in s.runs} == {r for s in plain for r in s.runs}
  for stack in stacks:
    counts = {sizes[(r.split, r.target)] for r in stack.runs}
    assert len(counts) == 1  # every member of a stack: one array shape
    assert stack.name.endswith('-N{}-M{}'.format(*counts.pop()))
  assert sorted(names) == sorted(
      f'{s.name}-N{n}-M{m}' for s in plain for n, m in ((16, 8), (13, 8), (16, 7)))


@pytest.mark.parametrize('name, source_of_B, frozen', [('BnB', 'B', True), ('BnB+', 'B', False),
                                                       ('AnB', 'A', True), ('AnB+', 'A', False),
                                                       ('random', '', True)])
def test_runs_read_the_conditions_table(name, source_of_B, frozen):
  run = plan.Run(0, 'B', name, 2, 0)
  assert (run.source, run.frozen) == (source_of_B, frozen)
  structure = plan.structure_for(run, ('conv1', 'conv2', 'head'), 'fixed')
  assert structure.graft_layers == (('conv1', 'conv2') if source_of_B else ())
  assert structure.frozen_layers == (('conv1', 'conv2') if frozen else ())
  assert structure.batchnorm == ('fixed' if frozen else 'update')
  assert name in conditions.CHOICES and conditions.get(name).label.startswith(name)


def test_published_studies_keep_the_recipe_they_ran_with():
  """A study.json written before `layer_defaults` existed ran with flax's defaults: resuming it
  with today's default (PyTorch's) is another study."""
  published = json.load(
      open(os.path.join(ROOT, 'results', 'cifar10', 'seed-1split-update', 'study.json')))['config']
  assert 'layer_defaults' not in published
  old = config_lib.with_defaults(published)
  assert old['layer_defaults'] == 'flax'
  new = dataclasses.replace(
      StudyConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in published.items()})
  assert config_lib.differing(old, new.to_json()) == ['layer_defaults']


def test_published_studies_name_their_data_by_content_and_still_pool():
  """Migrated from the path /tmp/cifar/cifar10-jpeg to its content (experiments/migrate_study)."""
  folders = ('seed-1split-update', 'seed-split1-update', 'seed-1split-fixed', 'seed-split1-fixed')
  records = [
      json.load(open(os.path.join(ROOT, 'results', 'cifar10', f, 'study.json'))) for f in folders
  ]
  configs = [config_lib.with_defaults(r['config']) for r in records]
  assert {c['data_fingerprint'] for c in configs
         } == {'e8ae1be30bd6e776705bb4a9a328b8dcc6e3115abf3ea682b830b5719fdd1293'}
  assert not any('/tmp' in json.dumps(r) or 'image_folder' in r['config'] for r in records)
  for record, config in zip(records, configs):
    assert record['config_hash'] == config_lib.config_hash(config)
  for shard_a, shard_b in (configs[:2], configs[2:]):  # each policy's two shards still pool
    assert config_lib.differing(shard_a, shard_b) == ['num_splits', 'splits']
