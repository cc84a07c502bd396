"""The stacked trainer: equivalence with separate runs, frozen layers, pruned backward, sharding."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtransfer import train
from jaxtransfer.models import FinalNet
from tests.conftest import CONFIG, DATA, HALVES, MODEL, NAMES, members, take, tiny_data


def test_stack_equals_separate_runs(stacked):
  ms = members(HALVES)
  for i in range(len(HALVES)):
    single = train.train_stack(MODEL, train.Structure(), CONFIG, DATA, take(ms, i))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b[0], rtol=1e-5, atol=1e-6),
                 stacked.variables, single.variables)
    np.testing.assert_allclose(stacked.test_accuracy[i], single.test_accuracy[0])
  # Members really differ (own data, keys): not K copies of one model.
  kernels = stacked.variables['params']['head']['dense']['kernel']
  assert not np.allclose(kernels[0], kernels[1])


def test_learns_and_reports_per_member_metrics(stacked, stacked_epochs):
  assert stacked.variables['params']['conv1']['conv']['kernel'].shape == (3, 3, 3, 3, 2)
  assert stacked.train_accuracy.shape == stacked.test_accuracy.shape == (3,)
  assert [e for e, _ in stacked_epochs] == [0, 1]
  first, last = stacked_epochs[0][1], stacked_epochs[1][1]
  assert first.shape == (3, 2)
  assert np.all(last[:, 0] < first[:, 0])  # every member's loss fell
  np.testing.assert_array_equal(last[:, 0], stacked.train_loss)
  np.testing.assert_array_equal(last[:, 1], stacked.train_accuracy)
  assert np.all((stacked.test_accuracy >= 0) & (stacked.test_accuracy <= 1))
  # Test accuracy is a multiple of 1/12 (12 test images per member).
  np.testing.assert_allclose(stacked.test_accuracy * 12, np.round(stacked.test_accuracy * 12),
                             atol=1e-4)


def test_evaluating_every_epoch_changes_nothing_but_records_test_accuracy(stacked):
  """--eval_every_epoch is read-only: the same trained variables and final test accuracy."""
  epochs = []
  out = train.train_stack(MODEL, train.Structure(), CONFIG, DATA, members(HALVES),
                          on_epoch=lambda e, m: epochs.append(m), eval_every_epoch=True)
  jax.tree.map(np.testing.assert_array_equal, out.variables, stacked.variables)
  np.testing.assert_array_equal(out.test_accuracy, stacked.test_accuracy)
  assert [m.shape for m in epochs] == [(3, 3), (3, 3)]
  np.testing.assert_array_equal(epochs[-1][:, 2], stacked.test_accuracy)
  np.testing.assert_array_equal(epochs[-1][:, :2],
                                np.stack([stacked.train_loss, stacked.train_accuracy], 1))


def test_partial_last_batch_is_trained_on():
  """40 examples at batch 16: 2 full batches + 1 of 8, every epoch."""
  seen = []
  cfg = train.TrainConfig(epochs=1, batch_size=16)
  trainer = train.Trainer(MODEL, train.Structure(), cfg, jnp.zeros((1, 8, 8, 3)))
  original = trainer.step

  def spy(state, batch_idx, **kw):
    seen.append(batch_idx.shape[0])
    return original(state, batch_idx, **kw)

  trainer.step = spy
  m = members(HALVES[:1])
  state = trainer.init(m.init_keys[0], None)
  state, metrics = jax.jit(trainer.epoch)(state, m.shuffle_keys[0], m.train_idx[0], m.label_map[0],
                                          DATA)
  assert seen == [16, 8]  # traced once in the scan body, once for the remainder
  count = [x for x in jax.tree.leaves(state.opt_state) if x.dtype == jnp.int32]
  assert int(count[0]) == 3  # Adam took 3 steps: ceil(40 / 16)


@pytest.mark.parametrize('batchnorm', ['update', 'fixed'])
def test_frozen_prefix_stays_the_source(stacked, batchnorm):
  prefix = tuple(NAMES[:2])
  sources = {c: {n: v[n] for n in prefix} for c, v in stacked.variables.items()}
  structure = train.Structure(prefix, prefix, batchnorm)
  cfg = train.TrainConfig(epochs=1, batch_size=16, optimizer='adam', weight_decay=0.1)
  out = train.train_stack(MODEL, structure, cfg, DATA, members(HALVES, 7, sources))
  for name in prefix:
    jax.tree.map(np.testing.assert_array_equal, out.variables['params'][name],
                 sources['params'][name])
  moved = not np.array_equal(out.variables['batch_stats']['conv1']['bn']['mean'],
                             sources['batch_stats']['conv1']['bn']['mean'])
  assert moved == (batchnorm == 'update')
  assert not np.array_equal(out.variables['params']['conv3']['conv']['kernel'],
                            stacked.variables['params']['conv3']['conv']['kernel'])


def step_flops(depth: int) -> float:
  model = FinalNet(5)
  frozen = tuple(NAMES[:depth])
  trainer = train.Trainer(model, train.Structure((), frozen, 'update'),
                          train.TrainConfig(batch_size=32), jnp.zeros((1, 32, 32, 3)))
  state = trainer.init(jax.random.key(0), None)
  data = tiny_data(num_classes=5, train_per_class=8, size=32)
  step = jax.jit(trainer.step).lower(state, jnp.arange(32), jnp.arange(5), data).compile()
  cost = step.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)['flops'])


def test_frozen_prefix_skips_its_backward_pass():
  flops = [step_flops(n) for n in (0, 2, 4, 6)]
  assert all(a > b for a, b in zip(flops, flops[1:])), flops
  # Freezing conv1..conv2 (the 32x32 layers) removes most of their 2/3 backward share.
  assert flops[1] < 0.8 * flops[0], flops


SHARDED = r'''
import jax, numpy as np
assert jax.device_count() == 4, jax.devices()
from tests.conftest import MODEL, CONFIG, DATA, HALVES, members
from jaxtransfer import train
ms = members(HALVES)  # K=3: padded to 4 over 4 devices
one = jax.make_mesh((1,), (train.MODEL_AXIS,), devices=jax.devices()[:1])
a = train.train_stack(MODEL, train.Structure(), CONFIG, DATA, ms)
b = train.train_stack(MODEL, train.Structure(), CONFIG, DATA, ms, mesh=one)
jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
             a.variables, b.variables)
np.testing.assert_allclose(a.test_accuracy, b.test_accuracy)
print('sharded ok', a.test_accuracy)
'''


def test_sharded_over_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', SHARDED], env=env, cwd=root, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'sharded ok' in proc.stdout


TWO_PROCESSES = r'''
import sys, jax, numpy as np
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'localhost:{sys.argv[1]}', num_processes=2, process_id=int(sys.argv[2]))
assert jax.device_count() == 2 and jax.local_device_count() == 1
from tests.conftest import MODEL, CONFIG, DATA, HALVES, members
from jaxtransfer import train
r = train.train_stack(MODEL, train.Structure(), CONFIG, DATA, members(HALVES))
np.save(sys.argv[3], r.variables['params']['head']['dense']['kernel'])
'''


def test_two_processes_equal_one_process(stacked, tmp_path):
  """The model axis spans hosts through jax.distributed (here: 2 CPU processes, localhost)."""
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = str(s.getsockname()[1])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  outs = [str(tmp_path / f'p{i}.npy') for i in range(2)]
  procs = [
      subprocess.Popen([sys.executable, '-c', TWO_PROCESSES, port,
                        str(i), outs[i]], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True) for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  for out in outs:  # every process gets the whole stack's results
    np.testing.assert_allclose(np.load(out), stacked.variables['params']['head']['dense']['kernel'],
                               rtol=1e-5, atol=1e-6)
