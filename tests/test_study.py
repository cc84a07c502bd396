"""The driver end to end on a tiny generated dataset: outputs, resume, refusals, bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import study_profile
from jaxtransfer.config import ConfigError, StudyConfig
from jaxtransfer.study import driver
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.analysis import stats
from jaxtransfer import files
from jaxtransfer.train import trainer
from jaxtransfer.study.workdir import Workdir
from tests.conftest import ROOT, make_image_folder, run_cli, tiny_args


def without_timings(path):
  rows = rows_lib.read_csv(path)
  for row in rows:
    row.pop('wall_seconds')
  return rows


def test_outputs_exist_and_agree(finished):
  rows = rows_lib.read_csv(os.path.join(finished, 'results.csv'))
  # 2 splits x 2 halves base nets + 2 depths x 4 conditions x 2 splits x 2 targets.
  assert len(rows) == 4 + 32
  assert len(rows_lib.select(rows, condition='base')) == 4
  for row in rows:
    assert 0 <= row['test_accuracy'] <= 1 and row['epochs'] == 1
    assert row['frozen'] == (row['condition'] in ('BnB', 'AnB'))
    a, b = row['classes_A'].split(), row['classes_B'].split()
    assert sorted(a + b) == ['0', '1', '2', '3']
    if row['condition'] in ('AnB', 'AnB+'):
      assert row['source'] != row['target']
    elif row['condition'] != 'base':
      assert row['source'] == row['target']
  json_rows = json.load(open(os.path.join(finished, 'results.json')))
  assert [r['test_accuracy'] for r in json_rows] == [r['test_accuracy'] for r in rows]
  cka = json.load(open(os.path.join(finished, 'figures', 'cka.json')))
  assert len(cka['layers']) == 7 and len(cka['records']) == 4 * (8 + 1)  # + 'other base' once
  assert {r['row'] for r in cka['records'] if r['condition'] == 'AnB'} == {'AnB n=1', 'AnB n=2'}
  for name in ('transfer', 'transfer_relative', 'cka'):
    for ext in ('png', 'pdf'):
      assert os.path.getsize(os.path.join(finished, 'figures', f'{name}.{ext}')) > 1000
  report = open(os.path.join(finished, 'report.md')).read()
  base = [r['test_accuracy'] for r in rows_lib.select(rows, condition='base')]
  mean, half = stats.mean_ci(base)
  assert f'base (n = 0): {mean:.3f} ± {half:.3f} (n=4)' in report
  for claim in ('fine-tuning improves', 'co-adaptation', 'specificity'):
    assert claim in report
  assert not [f for f in os.listdir(finished) if f.startswith('.tmp')]


def test_interrupted_run_resumes_to_the_same_results(finished, image_folder, tmp_path, monkeypatch):
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
  original = trainer.train_stack
  monkeypatch.setattr(trainer, 'train_stack',
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
def test_bad_input_is_one_line_and_destroys_nothing(finished, image_folder, capsys, extra, message):
  snapshot = {
      f: open(os.path.join(finished, f), 'rb').read()
      for f in ('results.csv', 'report.md', 'study.json')
  }
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
  assert not os.path.exists(tmp_path / 'wd')  # a bad flag is refused before the workdir is made
  blocker = tmp_path / 'file'
  blocker.write_text('')
  assert run_cli(*tiny_args(image_folder, blocker / 'wd')) == 2
  assert 'not writable' in capsys.readouterr().err


def test_cli_rejects_unknown_flag_value(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.main', '--model=resnet', f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.endswith("error: --model 'resnet': expected initial, final, MODULE:ATTR or "
                              'path/to/file.py:ATTR\n')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('fields', [{'depths': (7,)}, {'depths': (0, 2)}, {'conditions':
    ()}, {'conditions': ('BnB', 'XnB')}, {'widths': (2, 'x', 2)}, {'epochs': 0}, {'splits':
        (1, 2)}])
def test_python_api_refuses_what_the_cli_refuses(image_folder, tmp_path, capsys, fields):
  """The same validator, the same one-line message, nothing written."""
  flag = lambda v: ','.join(map(str, v)) if isinstance(v, tuple) else v
  extra = [f'--{k}={flag(v)}' for k, v in fields.items()]
  assert run_cli(*tiny_args(image_folder, tmp_path / 'cli', *extra)) == 2
  cli_error = capsys.readouterr().err.strip().removeprefix('error: ')
  assert not os.path.exists(tmp_path / 'cli')
  config = StudyConfig(**{
      'widths': (2, 2, 2), 'num_splits': 2, 'depths': (1, 2), 'epochs': 1, 'batch_size': 8, **fields
  })
  with pytest.raises(ConfigError) as excinfo:
    driver.run(config, Workdir(str(tmp_path / 'api')), image_folder=image_folder)
  assert str(excinfo.value) == cli_error
  assert not os.path.exists(tmp_path / 'api')


@pytest.mark.parametrize('batchnorm, conditions, stacks', [('fixed', 'BnB,AnB', 1),
                                                           ('target', 'AnB,random', 2)])
def test_frozen_prefixes_computed_once_give_the_plain_results(image_folder, tmp_path, capfd,
                                                              batchnorm, conditions, stacks):
  """Under `fixed` and `target`, frozen prefixes, grafted or random, are precomputed (within
  --feature_budget_mb) and the study's numbers are those of the plain path, to float rounding."""
  args = lambda name, *extra: tiny_args(image_folder, tmp_path / name, f'--conditions={conditions}',
                                        f'--frozen_batchnorm={batchnorm}', '--num_splits=1',
                                        '--depths=2', *extra)
  assert run_cli(*args('plain', '--feature_budget_mb=0')) == 0
  assert run_cli(*[a for a in args('cached') if a != '--quiet']) == 0
  # n = 2: the grafted stack (BnB and AnB together), and the random one
  assert capfd.readouterr().err.count('(prefix features: 0 MB) training') == stacks
  plain, cached = (
      rows_lib.read_csv(str(tmp_path / n / 'results.csv')) for n in ('plain', 'cached'))
  assert len(plain) == len(cached) == 2 + 2 * 2
  for a, b in zip(plain, cached):
    assert (a['condition'], a['depth'], a['target']) == (b['condition'], b['depth'], b['target'])
    assert a['train_accuracy'] == pytest.approx(b['train_accuracy'], abs=1e-6)
    assert a['final_loss'] == pytest.approx(b['final_loss'], rel=1e-5)


def test_a_moved_image_folder_resumes_without_training(finished, image_folder, tmp_path,
                                                       monkeypatch):
  """The study is its data's content: the same folder elsewhere (another machine, another mount)
  resumes the workdir; --eval_every_epoch, a run option, changes nothing of it either."""
  workdir, moved = str(tmp_path / 'wd'), str(tmp_path / 'mounted' / 'elsewhere')
  shutil.copytree(finished, workdir)
  shutil.copytree(image_folder, moved, copy_function=shutil.copy)  # new paths, new mtimes
  trained = []
  original = trainer.train_stack
  monkeypatch.setattr(trainer, 'train_stack',
                      lambda *a, **k: trained.append(1) or original(*a, **k))
  assert run_cli(*tiny_args(moved, workdir, '--eval_every_epoch')) == 0
  assert trained == []
  assert without_timings(os.path.join(workdir, 'results.csv')) == without_timings(
      os.path.join(finished, 'results.csv'))
  for name in ('study.json', 'report.md', 'results.json', os.path.join('figures', 'cka.json')):
    text = open(os.path.join(workdir, name)).read()
    assert image_folder not in text and moved not in text and str(tmp_path) not in text, name


def test_a_study_recorded_by_path_is_migrated(finished, image_folder, tmp_path, capsys):
  """study.json files of before named their image folder by absolute path: resumed from that very
  path they are migrated on the fly; from elsewhere, `experiments.migrate_study` does it."""
  record = json.load(open(os.path.join(finished, 'study.json')))
  legacy = {
      **record, 'config': {
          **{
              k: v for k, v in record['config'].items() if k != 'data_fingerprint'
          }, 'image_folder': image_folder
      }, 'config_hash': 'legacy'
  }
  migrated = lambda path: json.load(open(os.path.join(path, 'study.json')))
  # At the recorded path: migrated when the study resumes (prepare: before anything else).
  same = tmp_path / 'same'
  files.write_json(str(same / 'study.json'), legacy)
  config = driver.resolve(
      StudyConfig(
          **{'widths': (2, 2, 2), 'num_splits': 2, 'depths': (1, 2), 'epochs': 1, 'batch_size': 8}),
      image_folder=image_folder)
  assert driver.prepare(config, Workdir(str(same)), image_folder) == config
  assert migrated(same) == {**record, 'config_hash_before_migration': 'legacy'}
  # Elsewhere: refused in one line naming the command, which migrates it.
  moved, other = str(tmp_path / 'moved'), str(tmp_path / 'other')
  shutil.copytree(image_folder, moved)
  files.write_json(os.path.join(other, 'study.json'), legacy)
  assert run_cli(*tiny_args(moved, other)) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'records its image folder by path ({image_folder})' in err
  assert f'python -m experiments.migrate_study {other} --image_folder=PATH' in err
  migrate = lambda *argv: subprocess.run([sys.executable, '-m', 'experiments.migrate_study', *argv],
                                         cwd=ROOT, capture_output=True, text=True)
  wrong = tmp_path / 'wrong'
  make_image_folder(wrong, ('x', 'y', 'z', 'w'), 2, 1)
  proc = migrate(other, f'--image_folder={wrong}')
  assert proc.returncode == 2 and 'not the data of that study' in proc.stderr
  assert migrated(other) == legacy  # refused: untouched
  proc = migrate(other, f'--image_folder={moved}')
  assert proc.returncode == 0, proc.stderr
  assert migrated(other) == {**record, 'config_hash_before_migration': 'legacy'}
  assert Workdir(other).check(driver.resolve(config, image_folder=moved)) is None  # resumable
  assert 'nothing to migrate' in migrate(other, f'--image_folder={moved}').stderr


def test_an_unbalanced_image_folder_trains_on_every_image(tmp_path, capfd):
  """Classes with different numbers of images: every member trains on all its half's images
  (--train_per_class a cap), in stacks of equal shapes; the log gives the counts per class."""
  root = tmp_path / 'unbalanced'
  make_image_folder(root, 4, train_per_class=8, test_per_class=4)
  for split, name, keep in (('train', 'class1', 3), ('train', 'class2', 6), ('test', 'class3', 2)):
    for f in sorted(os.listdir(root / split / name))[keep:]:
      os.remove(root / split / name / f)
  workdir = tmp_path / 'wd'
  args = [
      a for a in tiny_args(root, workdir, '--num_splits=1', '--depths=1', '--conditions=BnB+',
                           '--train_per_class=7', '--cka_images=0') if a != '--quiet'
  ]
  assert run_cli(*args) == 0
  err = capfd.readouterr().err
  assert ('images per class, train/test (unbalanced) (training on at most 7 per class): '
          'class0 8/4, class1 3/4, class2 6/4, class3 8/2') in err
  # benchmarks/study_profile.py (and the GPU check) read this log: every stack, every phase.
  seconds, stacks = study_profile.phases(err.splitlines())
  assert stacks == 4 and set(seconds) == {'compile', 'init', 'train', 'evaluate', 'save'}
  rows = rows_lib.read_csv(str(workdir / 'results.csv'))
  assert sorted(r['condition'] for r in rows) == ['BnB+', 'BnB+', 'base', 'base']
  capped = {0: 7, 1: 3, 2: 6, 3: 7}
  for row in rows_lib.select(rows, condition='base'):
    classes = [int(c) for c in row[f'classes_{row["target"]}'].split()]
    train_n, test_n = sum(capped[c] for c in classes), sum(4 - 2 * (c == 3) for c in classes)
    assert f'base-k2-N{train_n}-M{test_n}.json' in os.listdir(workdir / 'stacks')
    assert row['test_accuracy'] * test_n == pytest.approx(round(row['test_accuracy'] * test_n))


def test_the_log_gives_a_stacks_device_memory_and_its_chunks_where_the_device_has_a_limit():
  result = lambda members, footprint: trainer.StackResult({}, None, None, None, 0.0, {}, members,
                                                          footprint)
  assert driver._memory_note(result(10, None), 10) == ''  # a CPU
  footprint = trainer.Footprint(members=4, program=3 * 2**30, held=2**29)
  assert driver._memory_note(result(4, footprint),
                             10) == ('; 4.00 GiB per device in chunks of 4 members (device memory)'
                                    )  # 3 + 2 chunks held
  assert driver._memory_note(result(12, trainer.Footprint(12, 2**30, 1)),
                             10) == ('; 1.00 GiB per device')
