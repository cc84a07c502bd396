"""The config: readable without JAX; its rules; its record, which names a study, and how fields
added since read in the records of before."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest

from jaxtransfer import config as config_lib
from jaxtransfer.config import ConfigError, RunOptions, StudyConfig
from tests.conftest import ROOT

PUBLISHED = sorted(glob.glob(os.path.join(ROOT, 'results', '**', 'study.json'), recursive=True))


def test_the_config_imports_no_jax():
  code = ("import jaxtransfer.config, sys; "
          "assert not {'jax', 'flax', 'optax', 'numpy'} & set(sys.modules), sorted(sys.modules)")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_validate_takes_the_layer_count_of_the_model():
  assert config_lib.validate(StudyConfig(), layers=7).depths == (1, 2, 3, 4, 5, 6)
  assert config_lib.validate(StudyConfig(depths=(3, 1, 3)), layers=4).depths == (1, 3)
  with pytest.raises(ConfigError, match=r'--depths \[4\] out of range: the final net has 4'):
    config_lib.validate(StudyConfig(depths=(4,)), layers=4)
  with pytest.raises(ConfigError, match="--optimizer 'rmsprop': expected one of adam, sgd"):
    config_lib.check_model_flags(StudyConfig(optimizer='rmsprop'))


def test_momentum_is_sgds_and_checked():
  assert config_lib.validate(StudyConfig(optimizer='sgd', momentum=0.0), 7).momentum == 0.0
  with pytest.raises(ConfigError, match='--momentum must be >= 0, got -0.5'):
    config_lib.validate(StudyConfig(optimizer='sgd', momentum=-0.5), 7)
  with pytest.raises(ConfigError, match='--momentum applies to --optimizer=sgd only, not to '
                     '--optimizer adam'):
    config_lib.validate(StudyConfig(momentum=0.5), 7)


def test_members_per_program_is_a_run_option():
  assert 'members_per_program' not in StudyConfig().to_json()
  assert RunOptions(members_per_program=4).members_per_program == 4
  with pytest.raises(ConfigError, match='--members_per_program must be an integer >= 0, got -1'):
    RunOptions(members_per_program=-1)


def test_eval_batch_size_is_a_run_option():
  assert 'eval_batch_size' not in StudyConfig().to_json()
  assert RunOptions(eval_batch_size=100).eval_batch_size == 100
  with pytest.raises(ConfigError, match='--eval_batch_size must be an integer >= 1, got 0'):
    RunOptions(eval_batch_size=0)


def test_a_field_added_at_the_value_studies_ran_with_leaves_their_names_alone():
  """--momentum (SGD's 0.9 before it was a flag) is recorded only off that value, so every
  study keeps its record and hash; a record without it reads as 0.9."""
  default = StudyConfig()
  assert 'momentum' not in default.to_json() and default.momentum == 0.9
  sgd = dataclasses.replace(default, optimizer='sgd')
  other = dataclasses.replace(sgd, momentum=0.5)
  assert other.to_json() == {**sgd.to_json(), 'momentum': 0.5}
  assert other.hash() != sgd.hash()
  assert config_lib.from_json(sgd.to_json(), 'x') == sgd
  assert config_lib.from_json(other.to_json(), 'x') == other
  # A record naming the value anyway is the same study.
  assert config_lib.with_defaults({**sgd.to_json(), 'momentum': 0.9}) == sgd.to_json()
  assert config_lib.complete(sgd.to_json())['momentum'] == 0.9


def test_fields_added_since_say_what_the_studies_before_them_ran_with():
  """One table of added fields (what a record without them ran with), of which the implicit
  ones are left out of records at that value; `layer_defaults` came with a new default, so it
  is recorded always."""
  assert config_lib.ADDED_VALUES == {
      'layer_defaults': 'flax', 'momentum': 0.9, 'model_sha256': '', 'classes': [],
      'half_classes': '', 'lr_schedule': 'constant', 'warmup_epochs': 0, 'augment': 'none'
  }
  assert config_lib.IMPLICIT == ('classes', 'model_sha256', 'half_classes', 'momentum',
                                 'lr_schedule', 'warmup_epochs', 'augment')
  assert StudyConfig(layer_defaults='flax').to_json()['layer_defaults'] == 'flax'
  record = StudyConfig().to_json()
  del record['layer_defaults']
  assert config_lib.from_json(record, 'x') == StudyConfig(layer_defaults='flax')
  with pytest.raises(ConfigError, match='x: unknown config field'):
    config_lib.from_json({'momentum_typo': 1}, 'x')
  with pytest.raises(ConfigError, match='x: config field momentum is .0.5., expected float'):
    config_lib.from_json({'momentum': '0.5'}, 'x')


@pytest.mark.parametrize('path', PUBLISHED, ids=lambda p: os.path.relpath(os.path.dirname(p)))
def test_every_published_record_reads_as_the_study_it_names(path):
  record = json.load(open(path))
  recorded = config_lib.with_defaults(record['config'])
  assert config_lib.config_hash(recorded) == record['config_hash']
  config = config_lib.from_json(record['config'], path)
  assert config.to_json() == recorded and config.hash() == record['config_hash']
  assert 'momentum' not in recorded and config.momentum == 0.9


def test_a_sweep_is_one_study_per_value():
  config = StudyConfig(sweep='epochs=1,3')
  subs = config_lib.sweep_studies(config)
  assert [s.folder for s in subs] == ['epochs-1', 'epochs-3']
  assert [(s.config.epochs, s.config.sweep) for s in subs] == [(1, ''), (3, '')]
