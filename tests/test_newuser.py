"""What a new user meets first: devices, the dry run and the Python API for a model of their own,
refusals of studies that mean nothing, warnings about surprising layers, progress and Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, make_image_folder

OWN_MODEL = '--model=examples/small_vgg.py:SmallVGG'


def cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
  """`python -m experiments.main ARGV` in a fresh process (JAX not started yet), from the repo."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'experiments.main', *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, **kwargs)


def tiny_own(folder, workdir, *extra: str) -> tuple[str, ...]:
  return (OWN_MODEL, f'--image_folder={folder}', f'--workdir={workdir}', '--num_splits=1',
          '--depths=1', '--conditions=BnB', '--epochs=1', '--batch_size=8',
          f'--cache_dir={workdir}-cache', *extra)


def test_an_own_model_trains_on_the_cpu_devices_asked_for(tmp_path):
  make_image_folder(tmp_path / 'images')
  proc = cli(*tiny_own(tmp_path / 'images', tmp_path / 'wd', '--cpu_devices=2'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '2 cpu device(s)' in proc.stderr
