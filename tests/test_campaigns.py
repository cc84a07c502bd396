"""Campaigns: pooling a study's shards, and sweeps over a flag."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtransfer import campaigns, cifar, models, plan, results
from jaxtransfer.workdir import Workdir
from tests.conftest import ROOT, make_image_folder, run_cli


def _shard(finished, path, split, similarity=True):
  """A finished one-split shard of the `finished` study, as `--splits=<split>` would leave it."""
  os.makedirs(path)
  meta = json.load(open(os.path.join(finished, 'study.json')))
  meta['config']['splits'] = [split]
  results.atomic_write_json(os.path.join(path, 'study.json'), meta)
  rows = results.read_csv(os.path.join(finished, 'results.csv'))
  results.write(path, results.select(rows, split=split))
  if similarity:
    cka = json.load(open(os.path.join(finished, 'figures', 'cka.json')))
    cka['records'] = [r for r in cka['records'] if r['split'] == split]
    results.atomic_write_json(os.path.join(path, 'figures', 'cka.json'), cka)


def _cka_records(folder):
  """The per-model CKA records, comparable (nan, for a constant layer, as None)."""
  records = json.load(open(os.path.join(folder, 'figures', 'cka.json')))['records']
  records = [{**r, 'cka': [None if np.isnan(v) else v for v in r['cka']]} for r in records]
  return sorted(records, key=lambda r: (r['split'], r['target'], r['row'], r['seed']))


def test_pooled_shards_equal_the_whole_study(finished, tmp_path):
  one, two, out = (str(tmp_path / n) for n in ('one', 'two', 'out'))
  _shard(finished, one, 1)
  _shard(finished, two, 0)
  assert json.load(open(os.path.join(one, 'study.json')))['class_names']
  pool = lambda *argv: subprocess.run([sys.executable, '-m', 'experiments.pool', *argv], cwd=ROOT,
                                      capture_output=True, text=True)
  assert pool(f'--out={out}', one, two).returncode == 0
  key = lambda r: (r['split'], r['target'], r['condition'], r['depth'], r['seed'])
  rows = lambda d: sorted(results.read_csv(os.path.join(d, 'results.csv')), key=key)
  assert rows(out) == rows(finished)
  text = open(os.path.join(out, 'report.md')).read()
  whole = open(os.path.join(finished, 'report.md')).read()
  tables = lambda t: t[t.index('## Test accuracy'):t.index('## Figures')]
  assert tables(text) == tables(whole)  # tables, claims and verdicts
  assert (f'Pooled from the shards `{one}` (split 1), `{two}` (split 0); the layer-similarity '
          "(CKA) figure averages every shard's models.") in text
  assert os.path.getsize(os.path.join(out, 'figures', 'transfer_relative.png')) > 1000
  # The pooled CKA figure is drawn from every shard's models: the whole study's records.
  assert _cka_records(out) == _cka_records(finished) and len(_cka_records(out)) == 4 * (8 + 1)
  assert os.path.getsize(os.path.join(out, 'figures', 'cka.png')) > 1000
  assert '![figures/cka.png](figures/cka.png)' in text
  # Shards without CKA data (published before it was kept) pool without the figure.
  old, old_out = str(tmp_path / 'old'), str(tmp_path / 'old-out')
  _shard(finished, old, 0, similarity=False)
  campaigns.pool([one, old], old_out)
  assert 'their layer-similarity (CKA) figures stay in each shard' in open(
      os.path.join(old_out, 'report.md')).read()
  assert not os.path.exists(os.path.join(old_out, 'figures', 'cka.png'))
  proc = pool(f'--out={finished}', one, two)
  assert proc.returncode == 2
  assert proc.stderr == f'error: {finished} holds a study; pool into a new directory\n'
  for shards, message in (([one, one], 'split 1 is in both'), ([one, finished], 'split 1 is in'),
                          ([one, str(tmp_path / 'none')], 'not a finished study')):
    with pytest.raises(ValueError, match=message):
      campaigns.pool(shards, out)
  meta = json.load(open(os.path.join(two, 'study.json')))
  meta['config']['epochs'] = 3
  results.atomic_write_json(os.path.join(two, 'study.json'), meta)
  with pytest.raises(ValueError, match=r'not a shard of the same study .*\(epochs: 1 vs 3\)'):
    campaigns.pool([one, two], out)


@pytest.fixture(scope='module')
def sweep_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp('cifar-names')
  make_image_folder(root, cifar.CIFAR10_CLASSES, train_per_class=4, test_per_class=2)
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
  workdir = Workdir(str(sweep_workdir / 'epochs-2'))
  stack = plan.Stack('frozen-random-n2-k6', None, (plan.Run(0, 'B', 'random', 2, 0),))
  trained = workdir.restore(stack)
  model = models.FinalNet(6, (2, 2, 2))
  init = model.init(plan.run_key(stack.runs[0], 'init'), np.zeros((1, 8, 8, 3), np.float32),
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
