"""The workdir: the per-epoch metrics file survives a kill mid-line; one run at a time holds it;
a failed save loses nothing."""

import dataclasses
import fcntl
import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from jaxtransfer.config import StudyConfig
from jaxtransfer.study import driver, plan
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.study import workdir as workdir_lib
from jaxtransfer.study.workdir import Workdir
from tests.conftest import ROOT, copy_study, run_cli, tiny_args


def test_metrics_lines_survive_a_killed_writer(tmp_path):
  workdir = Workdir(str(tmp_path))
  assert workdir.read_metrics() == []
  m = lambda run, epoch, loss: {
      'run': run, 'epoch': epoch, 'loss': loss, 'condition': 'base', 'depth': 0,
      'train_accuracy': 0.5
  }
  workdir.append_metrics([m('a', 1, 2.0), m('b', 1, 3.0)])
  with open(workdir.file('metrics.jsonl'), 'a') as f:
    f.write('{"run": "a", "epoch": 2, "lo')  # a kill in the middle of a write
  assert sorted(r['run'] for r in workdir.read_metrics()) == ['a', 'b']
  # The stack is retrained after the kill: its records come again and the last ones count.
  workdir.append_metrics([m('a', 1, 1.5), m('a', 2, 1.0)])
  records = {(r['run'], r['epoch']): r['loss'] for r in workdir.read_metrics()}
  assert records == {('a', 1): 1.5, ('b', 1): 3.0, ('a', 2): 1.0}
  lines = open(workdir.file('metrics.jsonl')).read().split('\n')
  assert lines[2] == '{"run": "a", "epoch": 2, "lo' and len(lines) == 6 and lines[-1] == ''


# A second process holding a workdir's lock for argv[2] seconds, or until a line on its stdin.
HOLDER = r'''
import select, sys
from jaxtransfer.study.workdir import Workdir
with Workdir(sys.argv[1]).lock():
  print('locked', flush=True)
  select.select([sys.stdin], [], [], float(sys.argv[2]))
'''


def hold(workdir, seconds: float) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, '-c', HOLDER,
                           str(workdir), str(seconds)], cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == 'locked\n'
  return proc


def test_a_second_run_is_refused_at_once_and_a_killed_holder_frees_the_workdir(
    image_folder, tmp_path, capsys):
  workdir = tmp_path / 'wd'
  holder = hold(workdir, 600)
  try:
    assert run_cli(*tiny_args(image_folder, workdir)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: workdir {workdir} is in use by pid {holder.pid} on '
                          f'{socket.gethostname()} since ') and err.count('\n') == 1, err
    assert '--wait_for_lock' in err
    assert os.listdir(workdir) == ['lock']  # the holder's; nothing else was touched
    with pytest.raises(workdir_lib.Busy, match=f'pid {holder.pid}'):
      with Workdir(str(workdir)).lock():
        pass
  finally:
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.wait()
  assert os.path.exists(workdir / 'lock')  # stale: the kernel released its lock
  said = []
  with Workdir(str(workdir)).lock(log=said.append):
    assert open(workdir / 'lock').read().startswith(f'pid {os.getpid()} on ')
  assert not os.path.exists(workdir / 'lock')
  assert len(said) == 1 and said[0].startswith(f'the run of pid {holder.pid} on ') and (
      'ended without releasing' in said[0]), said
  with Workdir(str(workdir)).lock(log=said.append):  # after a clean exit: nothing to say
    pass
  assert len(said) == 1


def test_waiting_for_the_lock_then_resuming_and_cleaning_leftovers(finished, image_folder, tmp_path,
                                                                   monkeypatch):
  workdir = copy_study(finished, tmp_path / 'wd')
  # Partial checkpoints of killed runs: orbax's temporary folder and ours.
  leftovers = [
      os.path.join(workdir, 'checkpoints', name)
      for name in ('base-k2.orbax-checkpoint-tmp-1700000000', '.tmp-frozen-graft-n1-k2')
  ]
  for path in leftovers:
    os.makedirs(path)
  holder = hold(workdir, 60)
  waited = []

  def flock(fd, operation):
    if not operation & fcntl.LOCK_NB:  # the run blocks on the holder's lock: let the holder end
      waited.append(operation)
      holder.stdin.write('go\n')
      holder.stdin.flush()
    return fcntl.flock(fd, operation)

  monkeypatch.setattr(
      workdir_lib, 'fcntl',
      types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
  assert run_cli(*tiny_args(image_folder, workdir, '--wait_for_lock')) == 0
  assert holder.wait() == 0
  assert waited == [fcntl.LOCK_EX]  # it did wait for the holder
  assert not any(os.path.exists(p) for p in leftovers)
  rows = lambda d: [{k: v
                     for k, v in r.items()
                     if k != 'wall_seconds'}
                    for r in rows_lib.read_csv(os.path.join(d, 'results.csv'))]
  assert rows(workdir) == rows(finished)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  workdir = Workdir(str(tmp_path))
  stack = plan.Stack('s', None, (plan.Run(0, 'A', 'base', 0, 0),))
  first = {'params': {'w': np.arange(6, dtype=np.float32).reshape(1, 6)}}
  second = {'params': {'w': np.ones((1, 6), np.float32)}}
  workdir.save(stack, first, [])
  np.testing.assert_array_equal(workdir.restore(stack)['params']['w'], first['params']['w'])

  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  with monkeypatch.context() as patch:
    patch.setattr(ocp.Checkpointer, 'save', full_disk)
    with pytest.raises(workdir_lib.StateError,
                       match=r'cannot save checkpoint .*/checkpoints/s: .*No space left'):
      workdir.save(stack, second, [])
  np.testing.assert_array_equal(workdir.restore(stack)['params']['w'], first['params']['w'])
  workdir.save(stack, second, [])
  np.testing.assert_array_equal(workdir.restore(stack)['params']['w'], second['params']['w'])
  assert os.listdir(workdir.file('checkpoints')) == ['s']


def test_a_field_left_out_of_the_record_reads_at_its_value(tmp_path):
  """--momentum at SGD's 0.9 is not in study.json; another value is another study, named so."""
  sgd = StudyConfig(optimizer='sgd')
  workdir = Workdir(str(tmp_path))
  workdir.claim(sgd)
  assert 'momentum' not in json.load(open(workdir.file('study.json')))['config']
  assert workdir.study().config == driver.resolve(sgd)
  workdir.check(sgd)
  with pytest.raises(ValueError, match=r'other flags \(momentum: 0.9 -> 0.5\)'):
    workdir.check(dataclasses.replace(sgd, momentum=0.5))
