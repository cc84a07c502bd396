"""Campaigns: pooling a study's shards, and sweeps over a flag."""

import csv
import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtransfer.study import campaigns, plan
from jaxtransfer.data import cifar
from jaxtransfer.nets import models
from jaxtransfer import config as config_lib
from jaxtransfer import files
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.study.workdir import Workdir
from tests.conftest import ROOT, make_image_folder, run_cli


def _shard(finished, path, split, similarity=True, epochs=None):
  """A finished one-split shard of the `finished` study, as `--splits=<split>` would leave it;
  with `epochs`, of that study trained for `epochs` (whose grafted models, here, are 0.1 less
  accurate than the finished study's)."""
  os.makedirs(path)
  meta = json.load(open(os.path.join(finished, 'study.json')))
  meta['config']['splits'] = [split]
  changed = {}
  if epochs is not None:
    meta['config']['epochs'] = epochs
    changed = lambda r: dict(
        epochs=epochs, test_accuracy=r['test_accuracy'] - (0.1 if r['condition'] != 'base' else 0))
  meta['config_hash'] = config_lib.config_hash(config_lib.with_defaults(meta['config']))
  files.write_json(os.path.join(path, 'study.json'), meta)
  rows = rows_lib.read_csv(os.path.join(finished, 'results.csv'))
  rows_lib.write(path,
                 [{**r, 'config_hash': meta['config_hash'], **(changed(r) if changed else {})}
                  for r in rows_lib.select(rows, split=split)])
  Workdir(path).append_metrics([r for r in Workdir(finished).read_metrics() if r['split'] == split])
  if similarity:
    cka = json.load(open(os.path.join(finished, 'figures', 'cka.json')))
    cka['records'] = [r for r in cka['records'] if r['split'] == split]
    files.write_json(os.path.join(path, 'figures', 'cka.json'), cka)


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
  rows = lambda d: sorted(  # each row names the study it was trained in: its shard
      ({**r, 'config_hash': ''}
       for r in rows_lib.read_csv(os.path.join(d, 'results.csv'))), key=key)
  assert rows(out) == rows(finished)
  text = open(os.path.join(out, 'report.md')).read()
  whole = open(os.path.join(finished, 'report.md')).read()
  tables = lambda t: t[t.index('## Test accuracy'):t.index('## Figures')]
  assert tables(text) == tables(whole)  # tables, claims and verdicts
  assert ('Pooled from the shards `../one` (split 1), `../two` (split 0); the layer-similarity '
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
  assert proc.stderr == f'error: {finished} holds a study (study.json); pool into a new directory\n'
  for shards, message in (([one, one], 'given twice'), ([one, finished], 'split 1 is in'),
                          ([one, str(tmp_path / 'none')], 'not a finished study')):
    with pytest.raises(ValueError, match=message):
      campaigns.pool(shards, out)
  meta = json.load(open(os.path.join(two, 'study.json')))
  meta['config']['epochs'] = 3  # a shard of another study: its flags and its rows say so
  meta['config_hash'] = config_lib.config_hash(config_lib.with_defaults(meta['config']))
  files.write_json(os.path.join(two, 'study.json'), meta)
  rows_lib.write(two, [
      dict(r, epochs=3, config_hash=meta['config_hash'])
      for r in rows_lib.read_csv(os.path.join(two, 'results.csv'))
  ])
  with pytest.raises(ValueError, match=r'not a shard of the same study .*\(epochs: 1 vs 3\)'):
    campaigns.pool([one, two], out)


def _sweep_shard(finished, path, split):
  """A one-split shard of `--sweep=epochs=1,2` on the finished study's flags."""
  os.makedirs(path)
  meta = json.load(open(os.path.join(finished, 'study.json')))
  meta['config'].update(splits=[split], sweep='epochs=1,2')
  meta['config_hash'] = config_lib.config_hash(config_lib.with_defaults(meta['config']))
  files.write_json(os.path.join(path, 'study.json'), meta)
  _shard(finished, os.path.join(path, 'epochs-1'), split)
  _shard(finished, os.path.join(path, 'epochs-2'), split, epochs=2)


def test_sweep_shards_pool_value_by_value_with_the_sweeps_summary(finished, tmp_path):
  """Shards of a sweep pool into one pool per value, each what pooling that value's shards gives,
  and the sweep's summary over the pooled splits; nothing is written unless every value pools."""
  one, two, out = (str(tmp_path / n) for n in ('one', 'two', 'out'))
  _sweep_shard(finished, one, 1)
  _sweep_shard(finished, two, 0)
  assert campaigns.pool([one, two], out) == os.path.join(out, 'sweep.md')
  for value in (1, 2):
    alone = str(tmp_path / f'alone-{value}')
    campaigns.pool([os.path.join(one, f'epochs-{value}'),
                    os.path.join(two, f'epochs-{value}')], alone)
    pooled = os.path.join(out, f'epochs-{value}')
    for name in ('results.csv', 'results.json'):
      assert open(os.path.join(pooled, name)).read() == open(os.path.join(alone, name)).read()
    rows = rows_lib.read_csv(os.path.join(pooled, 'results.csv'))
    assert {r['epochs'] for r in rows} == {value} and {r['split'] for r in rows} == {0, 1}
    assert 'Pooled from the shards `../../one/epochs-' in open(os.path.join(pooled,
                                                                            'report.md')).read()
  summary = open(os.path.join(out, 'sweep.md')).read()
  assert '| claim | contrast | epochs = 1 | epochs = 2 |' in summary
  by_value = {v: rows_lib.read_csv(os.path.join(out, f'epochs-{v}', 'results.csv')) for v in (1, 2)}
  assert summary == open(campaigns.write_sweep_summary(str(tmp_path / 'again'), 'epochs',
                                                       by_value)).read()
  bnb = lambda v: [r for r in by_value[v] if r['condition'] == 'BnB']
  assert [r['test_accuracy'] for r in bnb(2)
         ] == pytest.approx([r['test_accuracy'] - 0.1 for r in bnb(1)])
  assert os.path.getsize(os.path.join(out, 'figures', 'sweep_epochs.png')) > 1000
  assert json.load(open(os.path.join(out, 'pool.json')))['shards'] == ['../one', '../two']
  assert campaigns.pool([one, two], out) == os.path.join(out, 'sweep.md')  # the same pool again
  plain = str(tmp_path / 'plain')
  _shard(finished, plain, 0)
  with pytest.raises(
      ValueError, match=r'shards of different sweeps do not pool \(.*one: '
      r'--sweep=epochs=1,2, .*plain: no sweep\)'):
    campaigns.pool([one, plain], str(tmp_path / 'mixed'))
  os.remove(os.path.join(two, 'epochs-2', 'results.csv'))  # the last value not finished
  with pytest.raises(ValueError,
                     match=re.escape(os.path.join(two, 'epochs-2')) + ' is not a finished study'):
    campaigns.pool([one, two], str(tmp_path / 'early'))
  assert not os.path.exists(tmp_path / 'early')


def _edit_csv(path, edit):
  """Rewrite a results.csv through `edit(header, rows) -> (header, rows)` of raw strings."""
  with open(path, newline='') as f:
    records = list(csv.reader(f))
  header, rows = edit(records[0], records[1:])
  with open(path, 'w', newline='') as f:
    csv.writer(f, lineterminator='\n').writerows([header, *rows])


def _set_column(name, value):
  return lambda header, rows: (
      header, [[value if h == name else v for h, v in zip(header, rows[0])], *rows[1:]])


@pytest.mark.parametrize('damage, file, message', [
    (lambda h, rows: (h, []), 'results.csv', 'no result rows'),
    (lambda h, rows: (h, rows[1:]), 'results.csv', '1 planned run(s) missing'),
    ('foreign', 'results.csv', "not in the study's plan, e.g. split=0"),
    (_set_column('epochs', '3'), 'results.csv', "has epochs 3, the study's plan says 1"),
    (_set_column('classes_A', '0 1'), 'results.csv', "has classes_A '0 1'"),
    (_set_column('depth', 'x'), 'results.csv', "line 2: column depth is 'x', expected int"),
    (lambda h, rows: ([c for c in h if c != 'depth'], [r[:6] + r[7:] for r in rows]), 'results.csv',
     'missing column(s) depth'),
    ('binary', 'results.csv', 'is not a readable CSV file'),
    ('garbage', 'study.json', 'is not valid JSON'),
])
def test_pool_refuses_incomplete_or_foreign_shards(finished, tmp_path, damage, file, message):
  one, two, out = (str(tmp_path / n) for n in ('one', 'two', 'out'))
  _shard(finished, one, 1)
  _shard(finished, two, 0)
  path = os.path.join(one, file)
  if damage == 'foreign':  # the other shard's rows
    open(path, 'w').write(open(os.path.join(two, file)).read())
  elif damage == 'binary':
    open(path, 'wb').write(b'\xff\xfe\x00garbage')
  elif damage == 'garbage':
    open(path, 'w').write('garbage')
  else:
    _edit_csv(path, damage)
  with pytest.raises(ValueError, match=re.escape(path) + '.*' + re.escape(message)):
    campaigns.pool([one, two], out)
  assert not os.path.exists(out)


def test_pool_refuses_duplicates_and_an_out_inside_a_shard(finished, tmp_path):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  _shard(finished, one, 1)
  _shard(finished, two, 0)
  os.symlink(one, tmp_path / 'link')
  with pytest.raises(ValueError, match=f'{tmp_path}/link is given twice \\(as {one}\\)'):
    campaigns.pool([one, two, str(tmp_path / 'link')], str(tmp_path / 'out'))
  for out in (os.path.join(one, 'pooled'), two):
    with pytest.raises(ValueError, match='is inside the shard'):
      campaigns.pool([one, two], out)
  assert sorted(
      os.listdir(one)) == ['figures', 'metrics.jsonl', 'results.csv', 'results.json', 'study.json']
  os.remove(os.path.join(two, 'results.csv'))
  open(os.path.join(two, 'results.csv'), 'w').write(','.join(rows_lib.FIELDS) + '\n')
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.pool', f'--out={tmp_path / "out"}', one, two], cwd=ROOT,
      capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr == f'error: {two}/results.csv: no result rows\n'


def test_published_shards_pool_into_the_published_study(tmp_path):
  """The published folders (results.csv from before the `diverged` column, study.json from
  before later config fields) still read, validate against their plans and pool."""
  published = os.path.join(ROOT, 'results', 'cifar10')
  shards = [os.path.join(published, s) for s in ('seed-1split-update', 'seed-split1-update')]
  campaigns.pool(shards, str(tmp_path / 'out'))
  key = lambda r: rows_lib.run_id(r)
  pooled = sorted(rows_lib.read_csv(str(tmp_path / 'out' / 'results.csv')), key=key)
  assert pooled == sorted(
      rows_lib.read_csv(os.path.join(published, 'seed-2split-update', 'results.csv')), key=key)
  assert len(pooled) == 100 and not any(r['diverged'] for r in pooled)
  for folder in os.listdir(published):  # a sweep's results are in its values' folders
    sweep = os.path.isfile(os.path.join(published, folder, 'sweep.md'))
    for study in glob.glob(os.path.join(published, folder, '*-*' if sweep else '')):
      assert rows_lib.read_csv(os.path.join(study, 'results.csv'))


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
    rows = rows_lib.read_csv(sweep_workdir / f'epochs-{epochs}' / 'results.csv')
    assert {r['epochs'] for r in rows} == {epochs}
    # base nets for both halves + 3 conditions on target B.
    assert sorted(r['condition'] for r in rows) == ['AnB+', 'BnB', 'base', 'base', 'random']
    assert {r['classes_A'] for r in rows} == {'0 1 8 9'}
  summary = open(sweep_workdir / 'sweep.md').read()
  assert '| claim | contrast | epochs = 1 | epochs = 2 |' in summary
  assert '| 1 | ' in summary and '| 2 | ' in summary  # the base accuracy at each
  assert '| AnB+ − base, mean over n = 2 |' in summary  # a claim of each value's conditions
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


def _sizes_record(finished: str, image_folder: str) -> tuple[dict, dict]:
  """(the finished study's record, the same study as recorded before image bytes were hashed:
  its data named by names and sizes, and its hash of then)."""
  from jaxtransfer import config as config_lib
  from jaxtransfer.data import imagefolder
  record = json.load(open(os.path.join(finished, 'study.json')))
  sizes = imagefolder.sizes_fingerprint(imagefolder.scan_image_folder(image_folder))
  config = {**record['config'], 'data_fingerprint': sizes}
  return record, {
      **record, 'config': config,
      'config_hash': config_lib.config_hash(config_lib.with_defaults(config))
  }


def test_a_study_of_names_and_sizes_migrates_resumes_and_pools(finished, image_folder, tmp_path,
                                                               capsys):
  """A record of the earlier fingerprint kind (every published study's) pools with its kind as it
  is; resumed on its data, or by migrate_study, it gets the content fingerprint (the earlier one and
  its hash kept) and is then the very study a new run on that data is."""
  import shutil
  from tests.conftest import copy_study, tiny_args
  record, legacy = _sizes_record(finished, image_folder)
  assert legacy['config_hash'] != record['config_hash']
  migrated = {
      **record, 'config_hash_before_migration': legacy['config_hash'],
      'data_fingerprint_before_migration': legacy['config']['data_fingerprint']
  }
  study = lambda path: json.load(open(os.path.join(path, 'study.json')))
  one, two, three = (str(tmp_path / n) for n in ('one', 'two', 'three'))
  _shard(finished, one, 1)
  for path, split in ((two, 0), (three, 1)):  # shards recorded by names and sizes, hashed so
    _shard(finished, path, split)
    config = {**legacy['config'], 'splits': [split]}
    shard_hash = config_lib.config_hash(config_lib.with_defaults(config))
    files.write_json(os.path.join(path, 'study.json'),
                     {**legacy, 'config': config, 'config_hash': shard_hash})
    rows = rows_lib.read_csv(os.path.join(path, 'results.csv'))
    rows_lib.write(path, [{**r, 'config_hash': shard_hash} for r in rows])
  campaigns.pool([two, three], str(tmp_path / 'old-kind'))  # of one kind: pool as they are
  with pytest.raises(
      ValueError, match=f'{two} names its data by names and sizes .* '
      f'python -m experiments.migrate_study {two} --image_folder=PATH'):
    campaigns.pool([one, two], str(tmp_path / 'mixed'))
  assert not os.path.exists(tmp_path / 'mixed')
  other = tmp_path / 'other-data'
  shutil.copytree(image_folder, other)
  with open(os.path.join(other, 'train', 'class0', '0000.png'), 'ab') as f:
    f.write(b'\0')  # other names and sizes
  migrate = lambda *argv: subprocess.run([sys.executable, '-m', 'experiments.migrate_study', *argv],
                                         cwd=ROOT, capture_output=True, text=True)
  before = study(two)
  proc = migrate(two, f'--image_folder={other}')
  assert proc.returncode == 2 and 'is not the data' in proc.stderr and study(two) == before
  proc = migrate(two, f'--image_folder={image_folder}')
  assert proc.returncode == 0, proc.stderr
  shard_config = {**record['config'], 'splits': [0]}
  assert study(two) == {
      **migrated, 'config': shard_config,
      'config_hash': config_lib.config_hash(config_lib.with_defaults(shard_config)),
      'config_hash_before_migration': before['config_hash']
  }
  campaigns.pool([one, two], str(tmp_path / 'migrated'))
  # Resumed on its data: migrated, and nothing retrained (the same rows, byte for byte).
  workdir = copy_study(finished, tmp_path / 'resumed')
  files.write_json(os.path.join(workdir, 'study.json'), legacy)
  assert run_cli(*tiny_args(image_folder, workdir)) == 0
  assert study(workdir) == migrated
  assert (open(os.path.join(workdir, 'results.csv'),
               'rb').read() == open(os.path.join(finished, 'results.csv'), 'rb').read())
  # Resumed on other data: refused in one line, untouched.
  workdir = copy_study(finished, tmp_path / 'refused')
  files.write_json(os.path.join(workdir, 'study.json'), legacy)
  capsys.readouterr()
  assert run_cli(*tiny_args(str(other), workdir)) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'{other} is not the data {workdir} recorded' in err
  assert study(workdir) == legacy


def test_data_changed_under_a_study_is_refused(finished, image_folder, tmp_path, capsys):
  """An image changed after stacks finished (of the same size or not: the fingerprint hashes the
  bytes, `test_imagefolder`): the resume is refused in one line naming the folder, before
  anything is written."""
  import shutil
  from PIL import Image
  from tests.conftest import copy_study, snapshot, tiny_args
  changed = tmp_path / 'changed'
  shutil.copytree(image_folder, changed)
  path = os.path.join(changed, 'train', 'class3', '0001.png')
  with Image.open(path) as image:
    pixels = np.asarray(image)
  Image.fromarray(pixels[::-1]).save(path)  # upside down
  workdir = copy_study(finished, tmp_path / 'wd')
  before = snapshot(workdir)
  capsys.readouterr()
  assert run_cli(*tiny_args(str(changed), workdir)) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1, err
  assert f'{changed} no longer holds the data {workdir} was started on' in err
  assert snapshot(workdir) == before


def test_a_data_fingerprint_of_names_and_sizes_is_recognised_when_given(image_folder, tmp_path):
  """--data_fingerprint of the earlier kind names the folder whose names and sizes give it: the
  study is then identified by the folder's content fingerprint; other data is refused."""
  from jaxtransfer.config import ConfigError, StudyConfig
  from jaxtransfer.data import imagefolder
  from jaxtransfer.study import driver
  splits = imagefolder.scan_image_folder(image_folder)
  sizes, content = imagefolder.sizes_fingerprint(splits), imagefolder.content_fingerprint(splits)
  config = driver.resolve(StudyConfig(widths=(2, 2, 2), data_fingerprint=sizes),
                          image_folder=image_folder)
  assert config.data_fingerprint == content
  wrong = sizes[:-1] + ('1' if sizes.endswith('0') else '0')
  with pytest.raises(ConfigError, match=f'holds other data .{content}. than --data_fingerprint '
                     f'{wrong}'):
    driver.resolve(StudyConfig(widths=(2, 2, 2), data_fingerprint=wrong), image_folder=image_folder)
