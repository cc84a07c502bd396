r"""The prepared device check: the seed study on one GPU, cold and then warm, in one command.

A lent GPU comes with minutes, a bare machine and no network; its own jax, flax, optax, orbax and
absl run the repository from PYTHONPATH (nothing is installed). Through the device tool:

  mkdir -p gpu-data && cp ../shared/data/cifar10-jpeg.tar.gz gpu-data/  # and: echo /gpu-data/ >> .git/info/exclude
  run(command='PYTHONPATH=. python3 -m benchmarks.gpu_check --archive=gpu-data/cifar10-jpeg.tar.gz --out=$OUT',
      carry=['gpu-data'], timeout_s=540)

Runs `python -m experiments.main --flagfile=STUDY_FLAGS` twice, each in a fresh workdir, with one
array and compilation cache between them: the first run decodes the images and compiles every
program (cold), the second should compile nothing (warm). A run past --budget_s is stopped and
recorded as such, so the command ends within its limit. Writes to --out: cold.log and warm.log
(the progress logs), results.csv of the cold run, and summary.json: the environment, and for each
run its exit status, wall seconds, seconds by phase summed over its stacks (from the stacks'
"done in" lines) and its number of finished stacks.

On the CPU, to try the command itself: `--image_folder=A_SMALL_FOLDER --extra=--widths=2,2,2
--extra=--num_splits=1 --extra=--depths=1`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app, flags

from benchmarks import study_profile

ARCHIVE = flags.DEFINE_string('archive', None, 'A .tar.gz of an image folder (extracted first).')
IMAGE_FOLDER = flags.DEFINE_string('image_folder', None, 'An image folder (instead of --archive).')
FLAGFILE = flags.DEFINE_string('study_flags', 'experiments/configs/seed.flags', 'The study to run.')
EXTRA = flags.DEFINE_multi_string('extra', [], 'A further flag for experiments.main (repeatable).')
OUT = flags.DEFINE_string('out', None, 'Where the logs and summary.json go.', required=True)
BUDGET_S = flags.DEFINE_integer('budget_s', 240, 'Seconds each run may take before it is stopped.')

ENVIRONMENT = (
    'import jax, flax, optax, orbax.checkpoint as ocp; '
    'print({"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,'
    ' "orbax": ocp.__version__, "devices": [str(d) for d in jax.devices()]})')


def environment() -> str:
  """In a child process: this one must not hold the GPU while the runs use it."""
  proc = subprocess.run([sys.executable, '-c', ENVIRONMENT], capture_output=True, text=True)
  return (proc.stdout or proc.stderr).strip()[-2000:]


def run(name: str, folder: str, scratch: str) -> dict:
  cmd = [
      sys.executable, '-m', 'experiments.main', f'--flagfile={FLAGFILE.value}',
      f'--image_folder={folder}', f'--workdir={os.path.join(scratch, name)}',
      f'--cache_dir={os.path.join(scratch, "cache")}', *EXTRA.value
  ]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET_S.value)
    rc, log, timed_out = proc.returncode, proc.stderr, False
  except subprocess.TimeoutExpired as e:
    rc, timed_out = None, True
    log = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or '')
  wall = time.perf_counter() - start
  with open(os.path.join(OUT.value, f'{name}.log'), 'w') as f:
    f.write(log)
  by_phase, stacks = study_profile.phases(log.splitlines())
  by_phase = {k: round(v, 1) for k, v in by_phase.items()}
  print(f'{name}: rc {rc}, {wall:.1f} s, {stacks} stacks, {by_phase}', flush=True)
  return {
      'rc': rc, 'timed_out': timed_out, 'wall_s': round(wall, 1), 'stacks': stacks,
      'phases_s': by_phase, 'command': ' '.join(cmd[1:])
  }


def main(argv):
  del argv
  if (ARCHIVE.value is None) == (IMAGE_FOLDER.value is None):
    raise app.UsageError('give exactly one of --archive and --image_folder')
  os.makedirs(OUT.value, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix='gpu-check-')
  folder = IMAGE_FOLDER.value
  if ARCHIVE.value:
    start = time.perf_counter()
    with tarfile.open(ARCHIVE.value) as tar:
      tar.extractall(os.path.join(scratch, 'data'), filter='data')
    (top,) = os.listdir(os.path.join(scratch, 'data'))
    folder = os.path.join(scratch, 'data', top)
    print(f'extracted {ARCHIVE.value} in {time.perf_counter() - start:.1f} s', flush=True)
  summary = {'environment': environment()}
  print(summary['environment'], flush=True)
  summary['runs'] = {name: run(name, folder, scratch) for name in ('cold', 'warm')}
  results = os.path.join(scratch, 'cold', 'results.csv')
  if os.path.exists(results):
    with open(results) as src, open(os.path.join(OUT.value, 'results.csv'), 'w') as dst:
      dst.write(src.read())
  with open(os.path.join(OUT.value, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)


if __name__ == '__main__':
  app.run(main)
