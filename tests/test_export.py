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
  # No weight gradient is a convolution (XLA:GPU gives grouped ones whole-image windows): 6
  # forward and 5 input-gradient 3x3 convolutions and 6 kernel-gradient GEMMs in the one step
  # body (the last partial batch is masked, not a second body); the stock build's 6 are refused.
  assert '11 convolutions (6 forward, 5 input-grad), all forward 3x3' in epoch
  assert '6 kernel-gradient GEMMs' in epoch
  assert 'grouped by the 5 members' in epoch
  assert any(
      line.startswith('control cuda  epoch on stock lax.conv: 6 weight-gradient '
                      'convolutions (windows 16x16, 32x32, 8x8)') for line in lines)
  assert lines[-1].startswith('ok: cuda and tpu export')
