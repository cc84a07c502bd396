"""Beyond the seminar: dissimilar halves, random frozen layers, sweeps (tiny generated data)."""

import os

import jax
import numpy as np
import pytest

from jaxtransfer import cifar_builder, models, results, splits, study
from tests.conftest import make_image_folder
from tests.test_study import run_cli


def test_dissimilar_halves_are_exactly_man_made_and_natural():
  a, b = splits.dissimilar_halves(cifar_builder.CIFAR10_CLASSES)
  assert [cifar_builder.CIFAR10_CLASSES[i] for i in a] == ['airplane', 'automobile', 'ship',
                                                           'truck']
  assert [cifar_builder.CIFAR10_CLASSES[i] for i in b] == ['bird', 'cat', 'deer', 'dog',
                                                           'frog', 'horse']
  a, b = splits.dissimilar_halves(cifar_builder.CIFAR100_CLASSES)
  assert len(a) == 30 and len(b) == 70 and not set(a) & set(b)
  assert {cifar_builder.CIFAR100_CLASSES[i] for i in a} == set(splits.MAN_MADE['cifar100'])
  with pytest.raises(ValueError, match='CIFAR-10 or CIFAR-100 class names'):
    splits.dissimilar_halves(['x', 'y', 'z'])


@pytest.fixture(scope='module')
def sweep_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp('cifar-names')
  make_image_folder(root, num_classes=10, train_per_class=4, test_per_class=2)
  for split in ('train', 'test'):  # CIFAR-10 class names, in label order
    for i, name in enumerate(cifar_builder.CIFAR10_CLASSES):
      os.rename(root / split / f'class{i}', root / split / name)
  workdir = tmp_path_factory.mktemp('sweep') / 'wd'
  code = run_cli(f'--image_folder={root}', f'--workdir={workdir}', '--widths=2,2,2',
                 '--halves=dissimilar', '--num_splits=1', '--directions=AtoB', '--depths=2',
                 '--conditions=BnB,AnB+,random', '--batch_size=8', '--sweep=epochs=1,2',
                 f'--cache_dir={workdir}-cache', '--quiet')
  assert code == 0
  return workdir


def test_sweep_writes_one_study_per_value_and_a_summary(sweep_workdir):
  for epochs in (1, 2):
    rows = results.read_csv(sweep_workdir / f'epochs-{epochs}' / 'results.csv')
    assert {r['epochs'] for r in rows} == {epochs}
    # base nets for both halves + 3 conditions on target B.
    assert sorted(r['condition'] for r in rows) == ['AnB+', 'BnB', 'base', 'base', 'random']
    assert {r['classes_A'] for r in rows} == {'0 1 8 9'}
  summary = open(sweep_workdir / 'sweep.md').read()
  assert '| epochs | base | dip (depth) | gain |' in summary
  assert '| 1 |' in summary and '| 2 |' in summary
  assert os.path.getsize(sweep_workdir / 'figures' / 'sweep_epochs.png') > 1000
  report = open(sweep_workdir / 'epochs-1' / 'report.md').read()
  assert 'A = airplane, automobile, ship, truck; B = bird, cat, deer, dog, frog, horse' in report


def test_random_frozen_layers_equal_their_initialisation(sweep_workdir):
  workdir = study.Workdir(str(sweep_workdir / 'epochs-2'))
  stack = study.Stack('frozen-random-n2-k6', None, (study.Run(0, 'B', 'random', 2, 0),))
  trained = workdir.restore(stack)
  model = models.FinalNet(6, (2, 2, 2))
  init = model.init(study.run_key(stack.runs[0], 'init'), np.zeros((1, 8, 8, 3), np.float32),
                    train=False)
  for name in ('conv1', 'conv2'):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), trained['params'][name],
                 init['params'][name])
  assert not np.array_equal(trained['params']['conv3']['conv']['kernel'][0],
                            init['params']['conv3']['conv']['kernel'])


def test_bad_sweep(tmp_path, image_folder, capsys):
  assert run_cli(f'--image_folder={image_folder}', f'--workdir={tmp_path}',
                 '--sweep=learning_rate=1,2', '--quiet') == 2
  assert "PARAM one of ('epochs', 'train_per_class')" in capsys.readouterr().err
