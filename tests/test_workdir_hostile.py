"""Hostile workdirs: a folder of another study, paths orbax could misread, symlinks, damaged
inputs, hand-edited records, leftovers and interrupts. Nothing is lost and nothing is mixed."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jaxtransfer import config as config_lib
from jaxtransfer import files
from jaxtransfer.analysis import report
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.data import imagefolder
from jaxtransfer.data.types import DataError
from jaxtransfer.study import campaigns, plan
from jaxtransfer.study import workdir as workdir_lib
from jaxtransfer.study.workdir import Workdir
from tests.conftest import copy_study, make_image_folder, run_cli, tiny_args
from tests.test_campaigns import _shard


def tree_bytes(folder) -> dict:
  """Every file under `folder` (links as their target's name): what a refusal must leave."""
  out = {}
  for root, dirs, names in os.walk(folder):
    for name in dirs + names:
      path = os.path.join(root, name)
      if os.path.islink(path):
        out[path] = 'link ' + os.readlink(path)
      elif os.path.isfile(path):
        out[path] = open(path, 'rb').read()
  return out


def one_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and err.startswith('error: '), err
  return err


@pytest.fixture
def pooled(finished, tmp_path):
  """Two one-split shards of the `finished` study and their pool: (shards, pool folder)."""
  one, two, out = (str(tmp_path / n) for n in ('one', 'two', 'pool'))
  _shard(finished, one, 1)
  _shard(finished, two, 0)
  campaigns.pool([one, two], out)
  return [one, two], out


def test_a_run_and_a_pool_write_only_into_their_own_study(finished, image_folder, pooled, tmp_path,
                                                          capsys):
  shards, out = pooled
  # A run into a pool, or into a study's outputs without its record: refused, nothing written.
  loose = copy_study(finished, tmp_path / 'loose')
  os.remove(os.path.join(loose, 'study.json'))
  for folder, holds in ((out, 'a pooled study (pool.json)'),
                        (loose, 'study outputs without a study.json or pool.json (results.csv, '
                         'results.json, report.md, metrics.jsonl, stacks/, checkpoints/, '
                         'figures/)')):
    before = tree_bytes(folder)
    assert run_cli(*tiny_args(image_folder, folder)) == 2
    assert one_line(capsys) == f'error: {folder} holds {holds}; ' + (
        'a run cannot write into it: use a new --workdir'
        if 'pool.json)' in holds else 'use a new --workdir, or delete them')
    assert tree_bytes(folder) == before
  # A pool into a study, another pool, or loose outputs: refused, nothing written.
  other = str(tmp_path / 'other')
  campaigns.pool(shards[::-1], other)  # the same shards in another order: another pool.json
  for folder, message in ((finished, 'holds a study (study.json); pool into a new directory'),
                          (other, 'holds another pool (pool.json with other shards or flags)'),
                          (loose, 'holds study outputs without a study.json or pool.json')):
    before = tree_bytes(folder)
    with pytest.raises(ValueError, match=re.escape(f'{folder} {message}')):
      campaigns.pool(shards, folder)
    assert tree_bytes(folder) == before
  # The same pool of the same shards again: allowed, and it rewrites the very same files.
  text = lambda: {p: v for p, v in tree_bytes(out).items() if not p.endswith('.pdf')}  # dated
  before = text()
  campaigns.pool(shards, out)
  assert text() == before and len(before) > 5
  # A killed claim leaves no loose outputs: the record is written before stacks/.
  fresh = Workdir(str(tmp_path / 'fresh'))
  fresh.claim(config_lib.StudyConfig())
  assert sorted(os.listdir(fresh.path)) == ['stacks', 'study.json']


def test_a_workdir_path_with_glob_characters_saves_and_reads_back(tmp_path, monkeypatch):
  stack = plan.Stack('s', None, (plan.Run(0, 'A', 'base', 0, 0),))
  first = {'params': {'w': np.arange(6, dtype=np.float32).reshape(1, 6)}}
  for name in ('exp[lr=0.1]/w', 'w_run[1]', 'a*b?{c}'):
    workdir = Workdir(str(tmp_path / name))
    workdir.save(stack, first, [])
    np.testing.assert_array_equal(workdir.restore(stack)['params']['w'], first['params']['w'])
  # A save that does not read back as written is not trusted: no rows file, the old state kept.
  second = {'params': {'w': np.ones((1, 6), np.float32)}}
  real = workdir_lib._read_checkpoint
  monkeypatch.setattr(
      workdir_lib, '_read_checkpoint', lambda path: {'params': {'w': np.zeros((1, 6), np.float32)}}
      if '.tmp-' in path else real(path))
  rows_before = open(workdir.rows_file(stack), 'rb').read()
  with pytest.raises(
      workdir_lib.StateError,
      match=r'cannot save checkpoint .*: read back, it does not match what was '
      r'saved \(params/w\)$'):
    workdir.save(stack, second, [])
  assert open(workdir.rows_file(stack), 'rb').read() == rows_before
  monkeypatch.setattr(workdir_lib, '_read_checkpoint', real)
  np.testing.assert_array_equal(workdir.restore(stack)['params']['w'], first['params']['w'])


def test_no_workdir_file_is_written_through_a_symlink(tmp_path):
  workdir = Workdir(str(tmp_path / 'wd'))
  os.makedirs(workdir.path)
  target = tmp_path / 'precious'
  target.write_text('keep me\n')
  for name in (workdir_lib.LOCK, workdir_lib.METRICS):
    os.symlink(target, workdir.file(name))
  with pytest.raises(workdir_lib.StateError, match=f'{workdir.file("lock")} is a symlink'):
    with workdir.lock():
      pass
  record = {
      'run': 'a', 'epoch': 1, 'loss': 1.0, 'condition': 'base', 'depth': 0, 'train_accuracy': 0.5
  }
  with pytest.raises(workdir_lib.StateError, match=f'{workdir.file("metrics.jsonl")} is a symlink'):
    workdir.append_metrics([record])
  with pytest.raises(workdir_lib.StateError, match=f'{workdir.file("metrics.jsonl")} is a symlink'):
    workdir.read_metrics()
  # An atomic write replaces a link in its place; it never writes into the link's target.
  os.symlink(target, workdir.file('results.csv'))
  files.write_text(workdir.file('results.csv'), 'new\n')
  assert not os.path.islink(workdir.file('results.csv'))
  assert open(workdir.file('results.csv')).read() == 'new\n'
  assert target.read_text() == 'keep me\n'


METRICS_LINE = ('{"condition": "base", "depth": 0, "epoch": 1, "loss": 1.0, "run": "a", '
                '"train_accuracy": 0.5}')


@pytest.mark.parametrize('line, problem', [
    (b'\xff\xfegarbage', 'byte 0xff at column 1'),
    (b'42', 'a JSON int, not an object'),
    (b'[1,2]', 'a JSON list, not an object'),
    (b'{"epoch":1}', 'no "run"'),
    (b'{"run": "a", "epoch": 0, "loss": 1, "condition": "base", "depth": 0, "train_accuracy": 1}',
     '"epoch" is 0'),
    (b'hello', 'Expecting value'),
])
def test_a_damaged_input_is_named_before_anything_is_trained_or_written(
    finished, image_folder, tmp_path, capsys, line, problem):
  """metrics.jsonl and a shard's cka.json go through one checking reader each, named with the
  line and the way out; a run or a pool stops before its first write."""
  fix = 'delete the line or the file: it only feeds the learning curves'
  workdir = copy_study(finished, tmp_path / 'wd')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  with open(metrics, 'ab') as f:
    f.write(line + b'\n' + METRICS_LINE.encode() + b'\n')  # mid-file, not a line cut by a kill
  number = open(metrics, 'rb').read().count(b'\n') - 1
  os.remove(os.path.join(workdir, 'stacks', os.listdir(os.path.join(workdir, 'stacks'))[0]))
  before = tree_bytes(workdir)
  assert run_cli(*tiny_args(image_folder, workdir)) == 2
  err = one_line(capsys)
  assert err.startswith(f'error: {metrics} line {number}: not a metrics record ({problem}')
  assert err.endswith(f'); {fix}')
  assert tree_bytes(workdir) == before  # nothing trained (the removed stack stays missing)
  # A pool checks every shard's every input before its first write.
  one, two, out = (str(tmp_path / n) for n in ('one', 'two', 'out'))
  _shard(finished, one, 1)
  _shard(finished, two, 0)
  with open(os.path.join(two, 'metrics.jsonl'), 'ab') as f:
    f.write(line + b'\n' + METRICS_LINE.encode() + b'\n')
  with pytest.raises(
      ValueError, match=re.escape(f'{two}/metrics.jsonl line ') + r'\d+: ' +
      re.escape(f'not a metrics record ({problem}')):
    campaigns.pool([one, two], out)
  assert not os.path.exists(out)
  os.remove(os.path.join(two, 'metrics.jsonl'))
  cka = os.path.join(one, 'figures', 'cka.json')
  data = json.load(open(cka))
  data['records'][3]['cka'] = data['records'][3]['cka'][1:]
  files.write_json(cka, data)
  with pytest.raises(ValueError, match=re.escape(f'{cka} record 3: not a CKA record')):
    campaigns.pool([one, two], out)
  assert not os.path.exists(out)


def test_a_hand_edited_record_is_refused_by_a_resume_and_by_a_pool(finished, image_folder, tmp_path,
                                                                   capsys):
  """A study.json whose config no longer hashes to its `config_hash`, or rows of another
  study's hash, were trained under another config: refused, not pooled or rewritten."""
  workdir = copy_study(finished, tmp_path / 'wd')
  meta = os.path.join(workdir, 'study.json')
  record = json.load(open(meta))
  record['config']['batch_size'] = 4
  files.write_json(meta, record)
  before = tree_bytes(workdir)
  assert run_cli(*tiny_args(image_folder, workdir, '--batch_size=4')) == 2
  assert one_line(capsys) == (
      f'error: {meta}: its config does not match its "config_hash" ({record["config_hash"]!r}, '
      f'the config hashes to {config_lib.config_hash(config_lib.with_defaults(record["config"]))!r}'
      '): edited after its models were trained? Restore the record, or run the changed study in '
      'a new --workdir')
  assert tree_bytes(workdir) == before
  # The same edit in a shard, and a shard whose rows carry another study's hash.
  one, two, out = (str(tmp_path / n) for n in ('one', 'two', 'out'))
  _shard(finished, one, 1)
  _shard(finished, two, 0)
  shard_meta = os.path.join(two, 'study.json')
  good = open(shard_meta, 'rb').read()
  shard_record = json.loads(good)
  shard_record['config']['batch_size'] = 4
  files.write_json(shard_meta, shard_record)
  with pytest.raises(ValueError, match=re.escape(f'{shard_meta}: its config does not match')):
    campaigns.pool([one, two], out)
  open(shard_meta, 'wb').write(good)
  csv = os.path.join(two, 'results.csv')
  rows = rows_lib.read_csv(csv)
  rows_lib.write(
      two, [{**r, 'config_hash': 'f00f00f00f00'} if i == 2 else r for i, r in enumerate(rows)])
  with pytest.raises(
      ValueError, match=re.escape(f'{csv} holds rows of study f00f00f00f00, not of '
                                  f'the study {shard_meta} records')):
    campaigns.pool([one, two], out)
  assert not os.path.exists(out)
  # A resume finds a rows file of another study among its stacks.
  stacks = os.path.join(workdir, 'stacks')
  open(meta, 'wb').write(open(os.path.join(finished, 'study.json'), 'rb').read())
  path = os.path.join(stacks, sorted(os.listdir(stacks))[0])
  rows_file = json.load(open(path))
  rows_file['rows'][0]['config_hash'] = 'f00f00f00f00'
  files.write_json(path, rows_file)
  before = tree_bytes(workdir)
  assert run_cli(*tiny_args(image_folder, workdir)) == 2
  assert one_line(capsys).startswith(f'error: {path} holds rows of study f00f00f00f00, not of the '
                                     'study its study.json records')
  assert tree_bytes(workdir) == before


def test_leftover_temporary_files_are_removed_anywhere_in_the_workdir(finished, image_folder,
                                                                      tmp_path):
  workdir = copy_study(finished, tmp_path / 'wd')
  leftovers = [
      os.path.join(workdir, 'figures', files.TEMP_PREFIX + 'abc123.png'),
      os.path.join(workdir, files.TEMP_PREFIX + 'def456.json'),
      os.path.join(workdir, 'stacks', files.TEMP_PREFIX + '0a0a0a.json')
  ]
  for path in leftovers:
    open(path, 'w').write('half-written')
  assert run_cli(*tiny_args(image_folder, workdir)) == 0
  assert not any(os.path.exists(p) for p in leftovers)
  assert sorted(os.listdir(os.path.join(workdir, 'stacks'))) == sorted(
      os.listdir(os.path.join(finished, 'stacks')))


def test_class_names_are_literal_text_in_the_report():
  names = ('a|b', 'two\nlines', '<img src=x>', 'back\\slash', 'plain')
  rows = [{'split': 0, 'classes_A': '0 1', 'classes_B': '2 3 4'}]
  assert report._halves(rows, names) == [
      r'- split 0: A = a\|b, two lines; B = &lt;img src=x&gt;, back\\slash, plain'
  ]


@pytest.mark.parametrize('workers', [1, 2])
def test_an_odd_image_shape_names_the_first_image_too(tmp_path, monkeypatch, workers):
  root = tmp_path / 'images'
  make_image_folder(root, classes=2, train_per_class=3, test_per_class=1)
  splits = imagefolder.scan_image_folder(root)
  first = splits['train'][0][0]
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(first)  # the odd one is the first
  monkeypatch.setattr(imagefolder, '_MIN_IMAGES_PER_WORKER', 1)
  with pytest.raises(DataError) as excinfo:
    imagefolder.folder_split(splits, 'train', imagefolder.folder_class_names(splits), workers)
  assert str(excinfo.value) == (
      f'image {splits["train"][1][0]} has shape (8, 8, 3), but the first image {first} has '
      '(16, 16, 3): every image of a dataset needs one shape; resize the odd one(s)')


def test_an_interrupted_save_keeps_the_previous_state(finished, image_folder, tmp_path, capsys,
                                                      monkeypatch):
  import orbax.checkpoint as ocp
  workdir = copy_study(finished, tmp_path / 'wd')
  stacks = os.path.join(workdir, 'stacks')
  removed = os.path.join(stacks, sorted(os.listdir(stacks))[-1])
  os.remove(removed)
  before = tree_bytes(stacks)

  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.Checkpointer, 'save', interrupt)
  assert run_cli(*tiny_args(image_folder, workdir)) == 130
  kept = len(os.listdir(stacks))
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'interrupted: {kept} finished stack(s) are kept in {workdir} (a stack in training is '
      'lost); rerun the same command to resume')
  assert tree_bytes(stacks) == before and not os.path.exists(os.path.join(workdir, 'lock'))
  monkeypatch.undo()
  assert run_cli(*tiny_args(image_folder, workdir)) == 0
  assert os.path.exists(removed)
