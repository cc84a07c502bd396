"""benchmarks/throughput.py's per-platform defaults, peak table and FLOP count (no timing)."""

import importlib.util
import os
import sys

from tests.conftest import ROOT

_SPEC = importlib.util.spec_from_file_location('throughput',
                                               os.path.join(ROOT, 'benchmarks', 'throughput.py'))
throughput = importlib.util.module_from_spec(_SPEC)
sys.modules['throughput'] = throughput  # for its dataclasses
_SPEC.loader.exec_module(throughput)


def defaults(backend, *argv):
  args = throughput.parse_args(list(argv))
  throughput.resolve_defaults(args, backend)
  return args


def test_cpu_defaults_are_unchanged_and_accelerators_get_the_big_stacks():
  cpu, quick = defaults('cpu'), defaults('cpu', '--quick')
  assert (cpu.ks, cpu.maps, cpu.n_per_member, cpu.frozen) == ([2, 4, 8], ['map',
                                                                          'vmap'], 1280, [2, 4, 6])
  assert (quick.ks, quick.maps, quick.n_per_member, quick.frozen) == ([2, 4], ['map'], 640, [])
  gpu = defaults('gpu')
  assert (gpu.ks, gpu.maps, gpu.n_per_member) == ([10, 20, 40], ['map', 'vmap'], 6400)
  names = [v.name for v in throughput.make_variants(gpu, 1)]
  assert names[:7] == [
      'K=1  map  frozen=0', 'K=10 map  frozen=0', 'K=20 map  frozen=0', 'K=40 map  frozen=0',
      'K=10 vmap frozen=0', 'K=20 vmap frozen=0', 'K=40 vmap frozen=0'
  ]
  assert 'K=40 vmap frozen=6' in names  # frozen variants under the accelerators' map
  tpu = defaults('tpu', '--quick', '--ks=8')
  assert (tpu.ks, tpu.maps) == ([8], ['vmap'])  # flags still win


def test_peak_table_and_flops():
  assert throughput.peak_tflops('NVIDIA H100 80GB HBM3') == (66.9, 494.7)
  assert throughput.peak_tflops('NVIDIA H100 PCIe') == (51.2, 378.0)
  assert throughput.peak_tflops('TPU v5 lite') == (197.0, 197.0)
  assert throughput.peak_tflops('TPU v5') == (459.0, 459.0)
  assert throughput.peak_tflops('cpu') is None
  assert throughput.flops_per_image() == 15_055_872
  assert throughput.flops_per_image(frozen=6) == 5_171_200
