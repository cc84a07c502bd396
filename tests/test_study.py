"""The driver end to end on a tiny generated dataset: outputs, resume, refusals, bad input."""

import os
import shutil
import subprocess
import sys

import pytest
from absl import flags

from experiments import main as cli
from jaxtransfer import results, splits, study

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*argv: str) -> int:
  FLAGS.unparse_flags()
  FLAGS(['main', *argv])
  try:
    cli.main(['main'])
  except SystemExit as e:
    return e.code
  return 0


def tiny_args(image_folder, workdir, *extra):
  return (f'--image_folder={image_folder}', f'--workdir={workdir}', '--widths=2,2,2',
          '--num_splits=2', '--depths=1,2', '--epochs=1', '--batch_size=8',
          f'--cache_dir={workdir}-cache', '--quiet', *extra)


def without_timings(path):
  rows = results.read_csv(path)
  for row in rows:
    row.pop('wall_seconds')
  return rows


@pytest.fixture(scope='module')
def finished(image_folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('study') / 'wd')
  assert run_cli(*tiny_args(image_folder, workdir)) == 0
  return workdir


def test_outputs_exist_and_agree(finished):
  rows = results.read_csv(os.path.join(finished, 'results.csv'))
  # 2 splits x 2 halves base nets + 2 depths x 4 conditions x 2 splits x 2 targets.
  assert len(rows) == 4 + 32
  assert len(results.select(rows, condition='base')) == 4
  for row in rows:
    assert 0 <= row['test_accuracy'] <= 1 and row['epochs'] == 1
    assert row['frozen'] == (row['condition'] in ('BnB', 'AnB'))
    a, b = row['classes_A'].split(), row['classes_B'].split()
    assert sorted(a + b) == ['0', '1', '2', '3']
    if row['condition'] in ('AnB', 'AnB+'):
      assert row['source'] != row['target']
    elif row['condition'] != 'base':
      assert row['source'] == row['target']
  json_rows = __import__('json').load(open(os.path.join(finished, 'results.json')))
  assert [r['test_accuracy'] for r in json_rows] == [r['test_accuracy'] for r in rows]
  for name in ('transfer', 'transfer_relative', 'cka'):
    for ext in ('png', 'pdf'):
      assert os.path.getsize(os.path.join(finished, 'figures', f'{name}.{ext}')) > 1000
  report = open(os.path.join(finished, 'report.md')).read()
  base = [r['test_accuracy'] for r in results.select(rows, condition='base')]
  mean, half = results.mean_ci(base)
  assert f'base (n = 0): {mean:.3f} ± {half:.3f} (n=4)' in report
  for claim in ('fine-tuning improves', 'co-adaptation', 'specificity'):
    assert claim in report
  assert not [f for f in os.listdir(finished) if f.startswith('.tmp')]


def test_interrupted_run_resumes_to_the_same_results(finished, image_folder, tmp_path,
                                                     monkeypatch):
  workdir = str(tmp_path / 'wd')
  shutil.copytree(finished, workdir)
  shutil.copytree(finished + '-cache', workdir + '-cache')
  # As after a kill: the last stacks' rows never written (one checkpoint already was).
  stacks = sorted(os.listdir(os.path.join(workdir, 'stacks')))
  lost = ['finetune-graft-n2-k2.json', 'frozen-graft-n2-k2.json']
  assert set(lost) <= set(stacks)
  for name in lost:
    os.remove(os.path.join(workdir, 'stacks', name))
  os.remove(os.path.join(workdir, 'results.csv'))
  trained = []
  original = study.train.train_stack
  monkeypatch.setattr(study.train, 'train_stack',
                      lambda *a, **k: trained.append(1) or original(*a, **k))
  assert run_cli(*tiny_args(image_folder, workdir)) == 0
  assert len(trained) == 2  # only the lost stacks were retrained
  assert without_timings(os.path.join(workdir, 'results.csv')) == without_timings(
      os.path.join(finished, 'results.csv'))
  # A finished study reruns without training anything.
  assert run_cli(*tiny_args(image_folder, workdir)) == 0 and len(trained) == 2


def test_workdir_with_other_flags_is_refused(finished, image_folder, capsys):
  before = open(os.path.join(finished, 'results.csv')).read()
  assert run_cli(*tiny_args(image_folder, finished, '--epochs=3', '--learning_rate=0.1')) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and 'epochs: 1 -> 3' in err and 'learning_rate' in err
  assert open(os.path.join(finished, 'results.csv')).read() == before


@pytest.mark.parametrize('extra, message', [
    (('--depths=7',), 'out of range'),
    (('--depths=0,2',), 'out of range'),
    (('--conditions=',), '--conditions is empty'),
    (('--conditions=BnB,XnB',), "unknown ['XnB']"),
    (('--widths=2,x,2',), 'list of integers'),
    (('--epochs=0',), '--epochs must be at least 1'),
    (('--splits=1,2',), '--splits 1,2: indices must be in 0..1'),
])
def test_bad_input_is_one_line_and_destroys_nothing(finished, image_folder, capsys, extra,
                                                    message):
  snapshot = {f: open(os.path.join(finished, f), 'rb').read()
              for f in ('results.csv', 'report.md', 'study.json')}
  assert run_cli(*tiny_args(image_folder, finished, *extra)) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and err.startswith('error: ') and '\n' not in err
  for f, content in snapshot.items():
    assert open(os.path.join(finished, f), 'rb').read() == content


def test_missing_data_unwritable_workdir_too_many_splits(image_folder, tmp_path, capsys):
  assert run_cli(*tiny_args(image_folder, tmp_path / 'fresh', '--num_splits=4')) == 2
  assert '4 splits requested, but 4 classes allow 1 to 3' in capsys.readouterr().err
  assert os.listdir(tmp_path / 'fresh') == []  # nothing claimed before the check
  assert run_cli(*tiny_args(tmp_path / 'nowhere', tmp_path / 'wd')) == 2
  assert 'nowhere' in capsys.readouterr().err
  blocker = tmp_path / 'file'
  blocker.write_text('')
  assert run_cli(*tiny_args(tmp_path / 'nowhere', blocker / 'wd')) == 2
  assert 'not writable' in capsys.readouterr().err


def test_a_shard_plans_exactly_its_splits_runs():
  layers = ('conv1', 'conv2', 'head')
  halves = splits.random_halves(10, 3, seed=0)
  whole = study.StudyConfig(num_splits=3, depths=(1, 2), conditions=('BnB', 'AnB+'))
  shard = study.StudyConfig(num_splits=3, depths=(1, 2), conditions=('BnB', 'AnB+'), splits=(0, 2))
  runs = lambda config: [r for s in study.plan(config, layers, halves) for r in s.runs]
  assert runs(shard) == [r for r in runs(whole) if r.split != 1]
  assert len(runs(shard)) == 2 * 2 + 2 * 2 * 2 * 2
  # A shard's splits are those of the whole study (the sequence is prefix-stable).
  assert splits.random_halves(10, 2, seed=0) == halves[:2]


def _shard(finished, path, split):
  """A finished one-split shard of the `finished` study, as `--splits=<split>` would leave it."""
  os.makedirs(path)
  meta = __import__('json').load(open(os.path.join(finished, 'study.json')))
  meta['config']['splits'] = [split]
  results.atomic_write_json(os.path.join(path, 'study.json'), meta)
  rows = results.read_csv(os.path.join(finished, 'results.csv'))
  results.write(path, results.select(rows, split=split))


def test_pooled_shards_equal_the_whole_study(finished, tmp_path):
  one, two, out = (str(tmp_path / n) for n in ('one', 'two', 'out'))
  _shard(finished, one, 1)
  _shard(finished, two, 0)
  assert __import__('json').load(open(os.path.join(one, 'study.json')))['class_names']
  pool = lambda *argv: subprocess.run([sys.executable, '-m', 'experiments.pool', *argv],
                                      cwd=ROOT, capture_output=True, text=True)
  assert pool(f'--out={out}', one, two).returncode == 0
  key = lambda r: (r['split'], r['target'], r['condition'], r['depth'], r['seed'])
  rows = lambda d: sorted(results.read_csv(os.path.join(d, 'results.csv')), key=key)
  assert rows(out) == rows(finished)
  text = open(os.path.join(out, 'report.md')).read()
  whole = open(os.path.join(finished, 'report.md')).read()
  tables = lambda t: t[t.index('## Test accuracy'):t.index('## Figures')]
  assert tables(text) == tables(whole)  # tables, claims and verdicts
  assert f'Pooled from the shards `{one}` (split 1), `{two}` (split 0)' in text
  assert os.path.getsize(os.path.join(out, 'figures', 'transfer_relative.png')) > 1000
  proc = pool(f'--out={finished}', one, two)
  assert proc.returncode == 2
  assert proc.stderr == f'error: {finished} holds a study; pool into a new directory\n'
  for shards, message in (([one, one], 'split 1 is in both'), ([one, finished], 'split 1 is in'),
                          ([one, str(tmp_path / 'none')], 'not a finished study')):
    with pytest.raises(ValueError, match=message):
      study.pool(shards, out)
  meta = __import__('json').load(open(os.path.join(two, 'study.json')))
  meta['config']['epochs'] = 3
  results.atomic_write_json(os.path.join(two, 'study.json'), meta)
  with pytest.raises(ValueError, match=r'not a shard of the same study .*\(epochs: 1 vs 3\)'):
    study.pool([one, two], out)


def test_cli_rejects_unknown_flag_value(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.main', '--model=resnet',
                         f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0
  assert "value should be one of <initial|final>" in proc.stderr
  assert os.listdir(tmp_path) == []


def test_random_halves_are_reproducible_and_distinct():
  a = splits.random_halves(10, 5, seed=0)
  assert a == splits.random_halves(10, 5, seed=0) != splits.random_halves(10, 5, seed=1)
  assert len({frozenset(p) for p in a}) == 5
  for half_a, half_b in a:
    assert len(half_a) == len(half_b) == 5 and sorted(half_a + half_b) == list(range(10))
    assert list(half_a) == sorted(half_a)
  assert splits.max_splits(10) == 126 and splits.max_splits(5) == 10
  with pytest.raises(ValueError, match='allow 1 to 126'):
    splits.random_halves(10, 127, seed=0)


def test_subset_reindexes_labels():
  import numpy as np
  labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
  images = np.arange(10)[:, None]
  sub_images, sub_labels = splits.subset(images, labels, [9, 1, 5])
  assert sub_images[:, 0].tolist() == [1, 3, 4, 5, 8]
  assert sub_labels.tolist() == [0, 0, 1, 2, 1]  # sorted classes 1, 5, 9 -> 0, 1, 2
  assert splits.class_indices(labels, [1, 5], per_class=1).tolist() == [1, 4]


@pytest.mark.parametrize('flagfile', sorted(os.listdir(os.path.join(ROOT, 'experiments',
                                                                     'configs'))))
def test_every_flagfile_parses_to_a_valid_study(flagfile, monkeypatch):
  monkeypatch.chdir(ROOT)
  FLAGS.unparse_flags()
  FLAGS(['main', f'--flagfile=experiments/configs/{flagfile}', '--workdir=unused'])
  config = cli.config_from_flags(study.num_layers)
  assert config.epochs >= 1 and config.depths and config.conditions
  if config.sweep:
    study.parse_sweep(config.sweep)
  if flagfile == 'seed.flags':
    assert (config.num_splits, config.epochs, config.depths) == (5, 10, (1, 2, 3, 4, 5, 6))
    assert config.conditions == ('BnB', 'BnB+', 'AnB', 'AnB+') and config.directions == 'both'
