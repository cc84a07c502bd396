"""The accelerator programs compile without an accelerator: `experiments/export_check.py`."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_seed_stack_exports_for_gpu_and_tpu(record_property):
  """The seed stack's init, epoch and evaluate export for cuda and tpu (4-way sharded model
  axis, members batched into the same kernels, no CPU-only VJP); its lines are shown even
  under -q (at the end of the run, from any xdist worker: see conftest), so CI logs name both
  platforms."""
  proc = subprocess.run([sys.executable, '-m', 'experiments.export_check'], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  record_property('shown', proc.stdout.strip())
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  for platform in ('cuda', 'tpu'):
    for program in ('init', 'epoch', 'evaluate'):
      assert any(line.split()[:2] == [platform, program] for line in lines), (platform, program)
  epoch = next(line for line in lines if line.split()[:2] == ['cuda', 'epoch'])
  assert '34 convolutions (12 forward, 10 input-grad, 12 kernel-grad)' in epoch
  assert 'grouped by the 5 members' in epoch
  assert lines[-1].startswith('ok: cuda and tpu export')
