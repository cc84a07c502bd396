"""The stacked trainer: equivalence with separate runs, frozen layers, pruned backward, sharding,
and the accelerator path (members under `vmap`) against the CPU one (`lax.map`)."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtransfer import transfer
from jaxtransfer.data.datasets import normalize
from jaxtransfer.train import trainer
from jaxtransfer.nets.models import FinalNet
from tests.conftest import (CONFIG, DATA, GRAFT_CONFIG, HALVES, MODEL, NAMES, PREFIX,
                            assert_same_training, bn_input_moments, eval_logits, grafted_members,
                            members, take, tiny_data)


def take_result(result: trainer.StackResult, i: int) -> trainer.StackResult:
  """Member i of a stack's result, as a stack of one."""
  return result._replace(
      variables=take(result.variables, i),
      **{f: getattr(result, f)[i:i + 1] for f in ('train_accuracy', 'train_loss', 'test_accuracy')})


def recomputed_accuracy(variables, ms: trainer.Members) -> np.ndarray:
  """Each member's test accuracy from its variables, outside the trainer."""
  logits, labels = np.asarray(eval_logits(variables)), np.asarray(DATA.test_labels)
  return np.array([
      (logits[i][idx].argmax(-1) == lm[labels[idx]]).mean()
      for i, (idx, lm) in enumerate(zip(np.asarray(ms.test_idx), np.asarray(ms.label_map)))
  ])


@pytest.fixture(scope='module')
def separate():
  """Each member of `stacked` trained on its own (K = 1, one program compiled once)."""
  ms = members(HALVES)
  return [
      trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, take(ms, i))
      for i in range(len(HALVES))
  ]


@pytest.fixture(scope='module')
def stacked_vmap():
  return trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES),
                             member_map='vmap')


def test_stack_equals_separate_runs(stacked, separate):
  for i, single in enumerate(separate):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b[0], rtol=1e-5, atol=1e-6),
                 stacked.variables, single.variables)
    np.testing.assert_allclose(stacked.test_accuracy[i], single.test_accuracy[0])
  # Members really differ (own data, keys): not K copies of one model.
  kernels = stacked.variables['params']['head']['dense']['kernel']
  assert not np.allclose(kernels[0], kernels[1])


def test_vmapped_stack_equals_the_loop_and_separate_runs(stacked, stacked_vmap, separate):
  """The accelerators' member map, run here on CPU: the same training as the loop over members
  and as separate runs, and its own evaluation is right."""
  assert_same_training(stacked_vmap, stacked)
  for i, single in enumerate(separate):
    assert_same_training(take_result(stacked_vmap, i), single)
  np.testing.assert_allclose(stacked_vmap.test_accuracy,
                             recomputed_accuracy(stacked_vmap.variables, members(HALVES)),
                             atol=1e-6)
  # The noise the comparison leaves out is real: these leaves did move apart.
  bias = lambda r: r.variables['params']['conv1']['conv']['bias']
  assert not np.allclose(bias(stacked_vmap), bias(stacked), atol=1e-5)


def test_unknown_member_map_is_refused():
  with pytest.raises(ValueError, match="unknown member map 'vamp': expected one of auto, map"):
    trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES),
                        member_map='vamp')
  assert trainer.resolve_member_map('auto') == trainer.resolve_member_map(None) == 'map'  # on CPU


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
  out = trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES),
                            on_epoch=lambda e, m: epochs.append(m), eval_every_epoch=True)
  jax.tree.map(np.testing.assert_array_equal, out.variables, stacked.variables)
  np.testing.assert_array_equal(out.test_accuracy, stacked.test_accuracy)
  assert [m.shape for m in epochs] == [(3, 3), (3, 3)]
  np.testing.assert_array_equal(epochs[-1][:, 2], stacked.test_accuracy)
  np.testing.assert_array_equal(epochs[-1][:, :2],
                                np.stack([stacked.train_loss, stacked.train_accuracy], 1))


def test_partial_last_batch_is_trained_on():
  """40 examples at batch 16: 2 full batches + 1 of 8, every epoch, all three by one step body
  (the last padded to 16, its padding masked). Run as `train_stack` runs a stack of one (the
  programs of `separate`), with a spy on the step."""
  seen = []
  example = jnp.zeros((1,) + DATA.train_images.shape[1:], jnp.float32)
  tr = trainer.Trainer(MODEL, trainer.Structure(), CONFIG, example)
  original = tr.step

  def spy(state, batch_idx, mask=None, **kw):
    seen.append((batch_idx.shape[0], mask is not None))
    return original(state, batch_idx, mask=mask, **kw)

  tr.step = spy
  mesh = jax.make_mesh((jax.device_count(),), (trainer.MODEL_AXIS,))
  fns = trainer.stack_functions(tr, mesh, 'map')
  m = jax.device_put(take(members(HALVES), 0), NamedSharding(mesh, P(trainer.MODEL_AXIS)))
  data = jax.device_put(DATA, NamedSharding(mesh, P()))
  init = fns.init.lower(m.init_keys, None, None, m.train_idx,
                        data).compile(trainer.INIT_COMPILER_OPTIONS)
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(m.shuffle_keys, 0)
  state, metrics = fns.epoch(init(m.init_keys, None, None, m.train_idx, data), keys, m.train_idx,
                             m.label_map, data)
  assert seen == [(16, True)]  # traced once: the scan's body, masked
  count = [x for x in jax.tree.leaves(state.opt_state) if x.dtype == jnp.int32]
  assert count[0].shape == (1,) and int(count[0][0]) == 3  # Adam took 3 steps: ceil(40 / 16)


def test_a_padded_masked_batch_steps_as_its_real_examples_alone():
  """The last partial batch runs the full-size step body, padded; masked, the padding changes
  nothing: loss, gradient, BatchNorm statistics (the running variance's n too) and the update
  are those of the real examples alone, whatever fills the padding. (SGD: Adam's first step
  would blow the float noise of the conv biases' gradients up to +-lr; see `no_signal`.)"""
  example = jnp.zeros((1,) + DATA.train_images.shape[1:], jnp.float32)
  tr = trainer.Trainer(MODEL, trainer.Structure(), dataclasses.replace(CONFIG, optimizer='sgd'),
                       example)
  state = jax.jit(tr.init)(jax.random.key(0), None)
  label_map = jnp.array([0, 1, 0, 1], jnp.int32)
  real = jnp.arange(8) * 9
  mask = jnp.arange(16) < 8
  step = jax.jit(lambda idx, mask: tr.step(state, idx, label_map, DATA, mask=mask))
  alone = step(real, None)
  for filler in (jnp.arange(8), jnp.arange(8) * 7 + 3):
    padded = step(jnp.concatenate([real, filler]), mask)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(alone), jax.tree.leaves(padded)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  unmasked = step(jnp.concatenate([real, jnp.arange(8)]), jnp.ones(16, bool))  # filler counted
  assert not np.allclose(unmasked[0].model_state['batch_stats']['conv1']['bn']['var'],
                         alone[0].model_state['batch_stats']['conv1']['bn']['var'])


@pytest.fixture(scope='module', params=['update', 'fixed'])
def frozen(request, grafted):
  """(batchnorm policy, {member map: result}) of a stack grafted from `stacked` with conv1..2
  frozen."""
  return request.param, {m: grafted(request.param, m) for m in ('map', 'vmap')}


def test_frozen_prefix_stays_the_source(stacked, frozen):
  batchnorm, outs = frozen
  sources = grafted_members(stacked).sources
  for member_map, out in outs.items():
    for name in PREFIX:
      jax.tree.map(np.testing.assert_array_equal, out.variables['params'][name],
                   sources['params'][name])
    moved = not np.array_equal(out.variables['batch_stats']['conv1']['bn']['mean'],
                               sources['batch_stats']['conv1']['bn']['mean'])
    assert moved == (batchnorm == 'update'), member_map
    assert not np.array_equal(out.variables['params']['conv3']['conv']['kernel'],
                              stacked.variables['params']['conv3']['conv']['kernel'])


def test_vmapped_frozen_graft_equals_the_loop(frozen):
  _, outs = frozen
  assert_same_training(outs['vmap'], outs['map'], frozen=PREFIX)


def _assert_target_statistics(result, starts, ms):
  """Each member's frozen layers are its starting variables' (bit for bit), with the BatchNorm
  statistics of its own training images (`bn_input_moments`), which training did not move."""
  for j, start in enumerate(starts):
    images = normalize(DATA.train_images[ms.train_idx[j]], DATA.mean, DATA.std)
    want = bn_input_moments(MODEL, start, images, PREFIX)
    for name in PREFIX:
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[j], b),
                   result.variables['params'][name], start['params'][name])
      for stat in ('mean', 'var'):
        got = result.variables['batch_stats'][name]['bn'][stat][j]
        np.testing.assert_allclose(got, want[name]['bn'][stat], rtol=1e-5, atol=1e-6,
                                   err_msg=f'member {j} {name} {stat}')
        assert not np.allclose(got, start['batch_stats'][name]['bn'][stat], rtol=1e-3)


def test_target_policy_measures_random_frozen_layers_on_the_target_data(target):
  ms = members(HALVES, 7)
  example = jnp.zeros((1,) + DATA.train_images.shape[1:])
  starts = [jax.jit(MODEL.init)(key, example) for key in ms.init_keys]
  for member_map in ('map', 'vmap'):
    result = target('random', member_map)
    _assert_target_statistics(result, starts, ms)
    assert not np.allclose(result.variables['params']['conv3']['conv']['kernel'][0],
                           starts[0]['params']['conv3']['conv']['kernel'])  # the rest trained
  assert_same_training(target('random', 'vmap'), target('random', 'map'), frozen=PREFIX)


def test_target_policy_measures_grafted_frozen_layers_on_the_target_data(target, stacked):
  ms = grafted_members(stacked)
  example = jnp.zeros((1,) + DATA.train_images.shape[1:])
  starts = [
      transfer.graft(jax.tree.map(lambda x, j=j: x[j], ms.sources),
                     jax.jit(MODEL.init)(key, example), PREFIX)
      for j, key in enumerate(ms.init_keys)
  ]
  _assert_target_statistics(target('grafted'), starts, ms)


def test_vmapped_finetuned_graft_equals_the_loop(stacked):
  """Grafted, nothing frozen (BnB+/AnB+): the same epoch program as the base stack's."""
  structure = trainer.Structure(PREFIX, (), 'update')
  outs = {
      m: trainer.train_stack(MODEL, structure, CONFIG, DATA, grafted_members(stacked), member_map=m)
      for m in ('map', 'vmap')
  }
  assert_same_training(outs['vmap'], outs['map'])
  # Fine-tuned: the grafted layers trained on, away from their source.
  assert not np.allclose(outs['vmap'].variables['params']['conv1']['conv']['kernel'],
                         stacked.variables['params']['conv1']['conv']['kernel'])


def test_structure_as_data_trains_as_the_compiled_structure(stacked, frozen):
  """BnB/AnB under 'update' with the structure as data (every gradient taken, the frozen
  layers' updates and moments dropped) trains as the compiled structure (no backward pass
  through the prefix), up to float noise; the frozen prefix stays the source's either way."""
  batchnorm, outs = frozen
  structure = trainer.Structure(PREFIX, PREFIX, batchnorm)
  assert trainer.structure_as_data(MODEL, structure, GRAFT_CONFIG, (8, 8, 3), 'map', 3,
                                   40) == (batchnorm == 'update')
  if batchnorm != 'update':
    with pytest.raises(ValueError, match='compiled in'):
      trainer.train_stack(MODEL, structure, GRAFT_CONFIG, DATA, grafted_members(stacked),
                          as_data=True)
    return
  compiled = trainer.train_stack(MODEL, structure, GRAFT_CONFIG, DATA, grafted_members(stacked),
                                 as_data=False)
  assert_same_training(outs['map'], compiled, frozen=PREFIX)
  for name in PREFIX:
    jax.tree.map(np.testing.assert_array_equal, compiled.variables['params'][name],
                 outs['map'].variables['params'][name])


def test_structure_is_data_on_accelerators_and_for_stacks_that_train_faster_than_they_compile():
  seed_net, update = FinalNet(5), trainer.Structure(PREFIX, PREFIX, 'update')
  seed = dict(config=trainer.TrainConfig(epochs=10), image_shape=(32, 32, 3), members=20,
              train_images=25_000)
  assert trainer.structure_as_data(seed_net, update, member_map='vmap', **seed)
  assert not trainer.structure_as_data(seed_net, update, member_map='map', **seed)
  assert not trainer.structure_as_data(seed_net, trainer.Structure(PREFIX, PREFIX, 'fixed'),
                                       member_map='vmap', **seed)


def step_flops(depth: int) -> float:
  """XLA's FLOP count of one training step as traced (before XLA's own dead-code elimination:
  the backward pass must be missing from the program itself, not pruned by the compiler)."""
  model = FinalNet(5)
  frozen = tuple(NAMES[:depth])
  tr = trainer.Trainer(model, trainer.Structure((), frozen, 'update'),
                       trainer.TrainConfig(batch_size=32), jnp.zeros((1, 32, 32, 3)))
  state = jax.eval_shape(tr.init, jax.random.key(0), None)
  data = jax.eval_shape(lambda: tiny_data(num_classes=5, train_per_class=8, size=32))
  step = jax.jit(tr.step).lower(state, jnp.arange(32), jnp.arange(5), data)
  cost = step.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)['flops'])


def test_frozen_prefix_skips_its_backward_pass():
  flops = [step_flops(n) for n in (0, 2, 4, 6)]
  assert all(a > b for a, b in zip(flops, flops[1:])), flops
  # Freezing conv1..conv2 (the 32x32 layers) removes most of their 2/3 backward share.
  assert flops[1] < 0.8 * flops[0], flops


SHARDED = r'''
import sys, jax, numpy as np
assert jax.device_count() == 2, jax.devices()
from tests.conftest import MODEL, CONFIG, DATA, HALVES, members
from jaxtransfer.train import trainer
out = {}
for member_map in ('map', 'vmap'):  # K=3: padded to 4, 2 per device
  r = trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES),
                          member_map=member_map)
  out.update({f'{member_map}/{i}': x for i, x in enumerate(jax.tree.leaves(r.variables))})
  out.update({f'{member_map}/{f}': getattr(r, f) for f in ('train_accuracy', 'train_loss',
                                                           'test_accuracy')})
np.savez(sys.argv[1], **out)
'''


def test_sharded_over_two_devices_equals_one_device(stacked, tmp_path):
  """K = 3 over 2 devices (padded to 4, 2 members a device), the loop and vmap, against the loop
  on one device: `stacked`, the same members trained in this process."""
  env = dict(
      os.environ,
      XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / 'sharded.npz')
  proc = subprocess.run([sys.executable, '-c', SHARDED, out], env=env, cwd=root,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = np.load(out)
  structure = jax.tree.structure(stacked.variables)
  result = lambda member_map: stacked._replace(
      variables=jax.tree.unflatten(
          structure, [saved[f'{member_map}/{i}'] for i in range(structure.num_leaves)]), **
      {f: saved[f'{member_map}/{f}'] for f in ('train_accuracy', 'train_loss', 'test_accuracy')})
  a, c = result('map'), result('vmap')
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.variables,
               stacked.variables)
  np.testing.assert_allclose(a.test_accuracy, stacked.test_accuracy)
  assert c.test_accuracy.shape == (3,)
  assert_same_training(c, stacked)


def test_init_compiled_at_a_low_optimisation_level_gives_the_same_state():
  """train_stack compiles initialisation with INIT_COMPILER_OPTIONS (it compiles several times
  faster): the initial state must be XLA's default level's (2; the suite's own default is 1,
  conftest), bit for bit."""
  example = jnp.zeros((1,) + DATA.train_images.shape[1:], jnp.float32)
  tr = trainer.Trainer(MODEL, trainer.Structure(), CONFIG, example)
  key = jax.random.key(7)
  low = jax.jit(tr.init).lower(key, None).compile(trainer.INIT_COMPILER_OPTIONS)(key, None)
  default = jax.jit(tr.init).lower(key, None).compile({'xla_backend_optimization_level': 2})(key,
                                                                                             None)
  assert jax.tree.structure(low) == jax.tree.structure(default)
  for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(default)):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(low.params))
