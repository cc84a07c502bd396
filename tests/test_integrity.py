"""Trusting what a workdir holds: verified checkpoints, checked rows files and study.json, a
failed save that ends at once, and diverged models flagged instead of reported."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxtransfer.analysis import report
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.study import driver
from jaxtransfer.train import trainer
from tests.conftest import DATA, HALVES, MODEL, ROOT, copy_study, members, run_cli, snapshot, tiny_args


def without_timings(path):
  return [{k: v for k, v in r.items() if k != 'wall_seconds'} for r in rows_lib.read_csv(path)]


def one_line_error(capsys) -> str:
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err


def counting_trainer(monkeypatch) -> list:
  trained, original = [], trainer.train_stack
  monkeypatch.setattr(trainer, 'train_stack',
                      lambda *a, **k: trained.append(1) or original(*a, **k))
  return trained


def test_damaged_checkpoint_is_refused_until_retrained(finished, image_folder, tmp_path, capsys,
                                                       monkeypatch):
  import orbax.checkpoint as ocp
  workdir = copy_study(finished, tmp_path / 'wd')
  before = snapshot(workdir)
  ckpt = os.path.join(workdir, 'checkpoints', 'base-k2')
  rows_file = os.path.join(workdir, 'stacks', 'base-k2.json')
  # Damage that orbax cannot see: a valid checkpoint whose values changed.
  variables = ocp.PyTreeCheckpointer().restore(ckpt)
  variables['params']['conv1']['conv']['kernel'][0, 0, 0, 0, 0] += 1.0
  shutil.rmtree(ckpt)
  ocp.PyTreeCheckpointer().save(ckpt, variables)
  assert run_cli(*tiny_args(image_folder, workdir)) == 2
  err = one_line_error(capsys)
  assert f'checkpoint {ckpt} is damaged: it does not match the digest in {rows_file}' in err
  assert '(params/conv1/conv/kernel)' in err
  assert f'rerun with --retrain_corrupt to retrain stack base-k2, or delete {rows_file}' in err
  # Bytes flipped inside the checkpoint's data, size unchanged.
  data = os.path.join(ckpt, 'd')
  for name in os.listdir(data):
    raw = bytearray(open(os.path.join(data, name), 'rb').read())
    raw[100:500] = bytes(b ^ 0xff for b in raw[100:500])
    open(os.path.join(data, name), 'wb').write(bytes(raw))
  assert run_cli(*tiny_args(image_folder, workdir)) == 2
  err = one_line_error(capsys)
  assert f'checkpoint {ckpt}' in err and '--retrain_corrupt' in err
  assert snapshot(workdir) == before  # nothing derived was rewritten
  trained = counting_trainer(monkeypatch)
  assert run_cli(*tiny_args(image_folder, workdir, '--retrain_corrupt')) == 0
  assert len(trained) == 1  # base-k2 only
  assert without_timings(os.path.join(workdir, 'results.csv')) == without_timings(
      os.path.join(finished, 'results.csv'))


STACK = 'finetune-graft-n1-k2'


def _drop_one(record):
  return dict(record, rows=record['rows'][1:])


def _twice(record):
  return dict(record, rows=record['rows'][:1] + record['rows'][:-1])


def _set(column, value):
  return lambda record: dict(record, rows=[dict(record['rows'][0], **{column: value})] + record[
      'rows'][1:])


@pytest.mark.parametrize('damage, message', [
    ('[]', 'no result rows'),
    ('{}', 'is not a rows file'),
    ('[{"split": 0}]', 'row 0: missing column(s) classes_A'),
    ('{"x": 1}', 'is not a rows file'),
    ('garbage', 'is not valid JSON'),
    (_drop_one, '1 planned run(s) missing'),
    (_twice, 'appears more than once'),
    ('other stack', "not in the study's plan"),
    (_set('test_accuracy', 'high'), "row 0: column test_accuracy is 'high', expected float"),
    (_set('frozen', 1), 'row 0: column frozen is 1, expected bool'),
    (_set('epochs', 3), "has epochs 3, the study's plan says 1"),
])
def test_bad_rows_file_is_named_and_destroys_nothing(finished, image_folder, tmp_path, capsys,
                                                     damage, message):
  workdir = copy_study(finished, tmp_path / 'wd')
  before = snapshot(workdir)
  path = os.path.join(workdir, 'stacks', f'{STACK}.json')
  if callable(damage):
    text = json.dumps(damage(json.load(open(path))))
  elif damage == 'other stack':
    text = open(os.path.join(workdir, 'stacks', 'frozen-graft-n2-k2.json')).read()
  else:
    text = damage
  open(path, 'w').write(text)
  assert run_cli(*tiny_args(image_folder, workdir)) == 2
  err = one_line_error(capsys)
  assert err.startswith(f'error: {path}') and message in err, err
  assert f'--retrain_corrupt to retrain stack {STACK}' in err
  assert snapshot(workdir) == before


@pytest.mark.parametrize('content, message', [
    ('garbage', 'is not valid JSON (Expecting value: line 1 column 1'),
    ('{}', 'is not a study record'),
    ('[]', 'is not a study record'),
    ('{"config": {"epochs": "x"}}', 'config field epochs is'),
    ('{"config": {"epochs": 1, "flux": 2}}', 'unknown config field(s) flux'),
])
def test_bad_study_json_is_named(finished, image_folder, tmp_path, capsys, content, message):
  workdir = copy_study(finished, tmp_path / 'wd')
  before = snapshot(workdir, ('results.csv', 'report.md'))
  path = os.path.join(workdir, 'study.json')
  open(path, 'w').write(content)
  assert run_cli(*tiny_args(image_folder, workdir)) == 2
  err = one_line_error(capsys)
  assert err.startswith(f'error: {path}') and message in err, err
  assert snapshot(workdir, ('results.csv', 'report.md')) == before


# The driver with every directory creation under WORKDIR/checkpoints refused, as on a read-only
# folder (chmod does not stop root, who runs these tests).
READ_ONLY_CHECKPOINTS = r'''
import os, sys
blocked = os.path.join(os.path.abspath(sys.argv[1]), 'checkpoints') + os.sep
makedirs, mkdir = os.makedirs, os.mkdir
def guard(path):
  if os.fspath(path).startswith(blocked):
    raise PermissionError(13, 'Permission denied', os.fspath(path))
os.makedirs = lambda p, *a, **k: (guard(p), makedirs(p, *a, **k))[1]
os.mkdir = lambda p, *a, **k: (guard(p), mkdir(p, *a, **k))[1]
from absl import app
from experiments import main
sys.argv = ['main', *sys.argv[2:]]
app.run(main.main)
'''


def test_failed_save_ends_at_once_in_one_line(finished, image_folder, tmp_path):
  """orbax's asynchronous checkpointer held such a process for about 5 minutes after the error
  was printed; timed from the error line, so that a busy machine does not count."""
  workdir = copy_study(finished, tmp_path / 'wd')
  before = snapshot(workdir)
  stack = 'frozen-graft-n2-k2'
  os.remove(os.path.join(workdir, 'stacks', f'{stack}.json'))
  proc = subprocess.Popen(
      [sys.executable, '-c', READ_ONLY_CHECKPOINTS, workdir, *tiny_args(image_folder, workdir)],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  err = proc.stderr.readline()
  printed = time.perf_counter()
  rest = proc.stderr.read()
  code = proc.wait(timeout=600)
  assert time.perf_counter() - printed < 30
  ckpt = os.path.join(workdir, 'checkpoints', stack)
  assert code == 2 and not rest, err + rest[-3000:]
  assert err.startswith(f'error: cannot save checkpoint {ckpt}: [Errno 13] Permission denied')
  assert not os.path.exists(os.path.join(workdir, 'stacks', f'{stack}.json'))
  assert os.path.isdir(ckpt)  # the previous checkpoint is still there
  assert snapshot(workdir) == before


def test_diverged_models_are_flagged_and_left_out(finished, image_folder, tmp_path, monkeypatch,
                                                  caplog):
  workdir = copy_study(finished, tmp_path / 'wd')
  os.remove(os.path.join(workdir, 'stacks', 'frozen-graft-n2-k2.json'))
  original = trainer.train_stack

  def diverging(*args, **kwargs):
    """Member 0 ends with non-finite weights (but a finite loss), member 1 with a NaN loss."""
    result = original(*args, **kwargs)
    variables = jax.tree.map(np.array, result.variables)
    variables['params']['head']['dense']['kernel'][0] = np.inf
    loss = np.array(result.train_loss)
    loss[1] = np.nan
    return result._replace(variables=variables, train_loss=loss)

  monkeypatch.setattr(trainer, 'train_stack', diverging)
  with caplog.at_level(logging.WARNING):
    assert run_cli(*tiny_args(image_folder, workdir)) == 0
  assert any('2 of 36 models diverged' in r.getMessage() for r in caplog.records)
  rows = rows_lib.read_csv(os.path.join(workdir, 'results.csv'))
  diverged = [r for r in rows if r['diverged']]
  assert len(diverged) == 2 and {math.isfinite(r['final_loss']) for r in diverged} == {True, False}
  assert {r['depth'] for r in diverged} == {2} and all(r['frozen'] for r in diverged)
  clean = without_timings(os.path.join(finished, 'results.csv'))
  same = lambda r: {k: v for k, v in r.items() if k != 'wall_seconds'} in clean
  assert all(same(r) for r in rows if r['depth'] != 2 or not r['frozen'])
  text = open(os.path.join(workdir, 'report.md')).read()
  assert '36 trained models (2 diverged, left out)' in text
  assert '## Diverged models (left out)' in text
  for r in diverged:
    assert rows_lib.describe(rows_lib.run_id(r)) in text
  assert report.table(rows_lib.usable(rows)) in text and report.table(rows) not in text
  # Reading back keeps the flags: a rerun trains nothing and writes the same results.
  written = open(os.path.join(workdir, 'results.csv')).read()
  trained = counting_trainer(monkeypatch)
  assert run_cli(*tiny_args(image_folder, workdir)) == 0 and not trained
  assert open(os.path.join(workdir, 'results.csv')).read() == written


def test_a_real_divergence_is_caught():
  """An absurd learning rate: the trainer's output is flagged as the driver flags it."""
  config = trainer.TrainConfig(epochs=1, batch_size=16, optimizer='sgd', learning_rate=1e38)
  result = trainer.train_stack(MODEL, trainer.Structure(), config, DATA, members(HALVES))
  finite = driver._finite_members(result.variables)
  assert all(
      rows_lib.is_diverged(float(loss), bool(ok)) for loss, ok in zip(result.train_loss, finite))
  one_bad = {'a': np.zeros((3, 2), np.float32), 'b': {'c': np.array([[0.], [np.nan], [1.]])}}
  assert driver._finite_members(one_bad).tolist() == [True, False, True]
