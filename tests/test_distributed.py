"""Multi-process runs from the command line (2 CPU processes on 127.0.0.1, gloo): one writer for
every shared file, the same results as one process, and the cluster's refusals in one line."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxtransfer.analysis import rows as rows_lib
from tests.conftest import ROOT, run_cli

# Process 1 runs under this: any write, rename or removal under the workdir fails it.
READ_ONLY = r'''
import os, runpy, sys
workdir = os.path.realpath(sys.argv[1])
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {'os.mkdir', 'os.rename', 'os.replace', 'os.remove', 'os.rmdir', 'os.truncate',
          'shutil.rmtree', 'os.symlink', 'os.link', 'os.chmod', 'os.utime'}

def inside(path):
  return isinstance(path, (str, os.PathLike)) and (
      os.path.realpath(path) + os.sep).startswith(workdir + os.sep)

def hook(event, args):
  if event == 'open':
    path, mode, flags = args
    written = (mode and any(c in mode for c in 'wax+')) or (isinstance(flags, int) and flags & WRITE)
    paths = [path] if written else []
  else:
    paths = args[:2] if event in EVENTS else []
  for path in paths:
    if inside(path):
      raise PermissionError(f'process 1 wrote in the workdir: {event} {path}')

sys.addaudithook(hook)
sys.argv = ['main', *sys.argv[2:]]
runpy.run_module('experiments.main', run_name='__main__')
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def study_args(image_folder, workdir, *extra):
  """One split, base nets and BnB at depth 1, one epoch: 4 models in 2 stacks."""
  return [
      f'--image_folder={image_folder}', f'--workdir={workdir}', '--widths=2,2,2', '--num_splits=1',
      '--depths=1', '--conditions=BnB', '--epochs=1', '--batch_size=8', '--cka_images=8',
      f'--cache_dir={workdir}-cache', '--quiet', *extra
  ]


def two_processes(argvs, timeout=600):
  """Run `python -m experiments.main` once per argv (argv[0] process 0 ...) as one distributed
  run; process 1 under READ_ONLY. Returns [(returncode, stderr)]."""
  port = free_port()
  procs = []
  for i, argv in enumerate(argvs):
    cluster = [
        '--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
        f'--process_id={i}', '--cpu_devices=1'
    ]
    workdir = next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))
    cmd = ([sys.executable, '-c', READ_ONLY, workdir]
           if i == 1 else [sys.executable, '-m', 'experiments.main'])
    procs.append(
        subprocess.Popen(cmd + argv + cluster, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True))
  return [(p.wait(timeout), p.stderr.read()) for p in procs]


def errors_of(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_two_processes_write_every_file_once_and_equal_one_process(image_folder, tmp_path):
  """The model axis spans hosts: with one direction the BnB stack has one member, padded to
  one per process, and every process gets the whole stack's results back."""
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  args = lambda workdir: study_args(image_folder, workdir, '--directions=AtoB')
  assert run_cli(*args(one)) == 0
  for rc, err in two_processes([args(two)] * 2):
    assert rc == 0, err[-3000:]
  for name in ('study.json', 'report.md', 'results.csv', 'figures/cka.json', 'figures/curves.png'):
    assert os.path.exists(os.path.join(two, name)), name
  lines = open(os.path.join(two, 'metrics.jsonl')).read().splitlines()
  assert len(lines) == len(set(lines)) == len(open(os.path.join(one, 'metrics.jsonl')).readlines())
  rows = json.load(open(os.path.join(two, 'results.json')))
  assert rows_lib.read_csv(os.path.join(two, 'results.csv')) == rows  # one writer wrote both
  expected = json.load(open(os.path.join(one, 'results.json')))
  assert len(rows) == len(expected) == 3  # base A, base B, BnB on B
  for got, want in zip(rows, expected):
    for key, value in want.items():
      if key != 'wall_seconds':
        assert got[key] == (pytest.approx(value, abs=1e-5) if isinstance(value, float) else value)


def test_processes_with_different_study_flags_all_refuse_alike(image_folder, tmp_path):
  workdir = str(tmp_path / 'wd')
  start = time.monotonic()
  results = two_processes(
      [study_args(image_folder, workdir),
       study_args(image_folder, workdir, '--learning_rate=0.5')], timeout=120)
  assert time.monotonic() - start < 90
  lines = [errors_of(err) for _, err in results]
  assert [rc for rc, _ in results] == [2, 2], results
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  assert 'different study flags' in lines[0][0] and 'process 1: study' in lines[0][0]
  assert not os.path.exists(workdir)


def test_cluster_flags_without_distributed_are_refused(image_folder, tmp_path, capsys):
  workdir = tmp_path / 'wd'
  assert run_cli(*study_args(image_folder, workdir), '--coordinator_address=127.0.0.1:1234',
                 '--num_processes=2') == 2
  err = capsys.readouterr().err
  assert 'error: --coordinator_address, --num_processes only apply with --distributed' in err
  assert not workdir.exists()


def test_an_unreachable_coordinator_fails_within_the_timeout(image_folder, tmp_path):
  workdir = tmp_path / 'wd'
  cmd = [
      sys.executable, '-m', 'experiments.main', *study_args(image_folder, workdir), '--distributed',
      f'--coordinator_address=127.0.0.1:{free_port()}', '--num_processes=2', '--process_id=1',
      '--coordinator_timeout=3'
  ]
  start = time.monotonic()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  elapsed = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert errors_of(proc.stderr) == [
      f'error: process 1 did not meet process 0 at {cmd[-4].split("=")[1]} within 3 s '
      '(--coordinator_timeout): start process 0 on that host, and the same command on every host'
  ]
  assert elapsed < 3 + 40  # the start of Python and JAX on a busy machine, then the 3 s
  assert not workdir.exists()
