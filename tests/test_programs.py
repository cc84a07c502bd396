"""Compiled programs reused across stacks: a reused program trains exactly as a fresh one, and
anything the program depends on keys a program of its own."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxtransfer.train import programs, trainer
from tests.conftest import CONFIG, DATA, HALVES, MODEL, PREFIX, grafted_members, members

FROZEN = trainer.Structure(PREFIX, PREFIX, 'fixed')
COSINE = dataclasses.replace(CONFIG, lr_schedule='cosine')


def test_a_reused_program_trains_bit_for_bit_as_a_fresh_one(stacked):
  run = lambda ms, cache: trainer.train_stack(MODEL, FROZEN, CONFIG, DATA, ms, programs=cache)
  bnb = grafted_members(stacked)
  anb = bnb._replace(sources=jax.tree.map(lambda x: x[::-1], bnb.sources))
  cache = programs.Cache()
  first = run(bnb, cache)
  assert (cache.hits, cache.misses) == (0, 3)  # init, epoch, evaluate
  # Other sources (AnB beside BnB) are values, not structure: the same three programs.
  reused = run(anb, cache)
  assert (cache.hits, cache.misses) == (3, 3)
  fresh = run(anb, programs.Cache())
  jax.tree.map(np.testing.assert_array_equal, reused.variables, fresh.variables)
  np.testing.assert_array_equal(reused.test_accuracy, fresh.test_accuracy)
  assert not np.array_equal(first.variables['params']['conv1']['conv']['kernel'],
                            reused.variables['params']['conv1']['conv']['kernel'])


class Asked(Exception):
  pass


class KeysOnly(programs.Cache):
  """Records the first key a stack asks for, then stops it: keys without compiling."""
  def get(self, key, compile_):
    self.key = key
    raise Asked


def test_what_a_program_depends_on_keys_its_own():
  ms = members(HALVES[:2])

  def key(model=MODEL, structure=trainer.Structure(), config=CONFIG, ms=ms, **kwargs):
    cache = KeysOnly()
    with pytest.raises(Asked):
      trainer.train_stack(model, structure, config, DATA, ms, programs=cache, **kwargs)
    return cache.key

  keys = [
      key(**change)
      for change in ({}, dict(structure=trainer.Structure((), PREFIX, 'fixed')),
                     dict(structure=trainer.Structure((), PREFIX, 'update'), as_data=False),
                     dict(config=dataclasses.replace(COSINE, epochs=1)), dict(config=COSINE),
                     dict(config=dataclasses.replace(CONFIG, learning_rate=0.1)),
                     dict(model=MODEL.clone(widths=(2, 2, 4))), dict(ms=members(HALVES)),
                     dict(ms=ms._replace(train_idx=ms.train_idx[:, :-1])), dict(member_map='vmap'))
  ]
  assert len(set(keys)) == len(keys)
  assert key() == keys[0] and hash(key()) == hash(keys[0])  # the same stack, the same key
  # The epoch count is the host's loop: only a schedule over the epochs makes it the programs'.
  assert key(config=dataclasses.replace(CONFIG, epochs=CONFIG.epochs + 3)) == keys[0]
  # A structure as data is the programs' arguments, not their key.
  assert key(structure=trainer.Structure(PREFIX, PREFIX, 'update')) == keys[0]


def test_stacks_of_any_structure_share_one_evaluation_program(stacked):
  """Evaluation reads the variables alone: a frozen stack after a plain one compiles two
  programs of its own (init, epoch) and evaluates with the plain one's."""
  cache = programs.Cache()
  trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES), programs=cache)
  assert (cache.hits, cache.misses) == (0, 3)
  frozen = trainer.train_stack(MODEL, FROZEN, CONFIG, DATA, grafted_members(stacked),
                               programs=cache)
  assert (cache.hits, cache.misses) == (1, 5)
  fresh = trainer.train_stack(MODEL, FROZEN, CONFIG, DATA, grafted_members(stacked), programs=None)
  np.testing.assert_array_equal(frozen.test_accuracy, fresh.test_accuracy)


def test_stacks_of_any_structure_as_data_share_every_program(stacked):
  """A base stack, then BnB (grafted, frozen under 'update') and a fine-tuned graft: three
  programs in all, and a reused one trains as a fresh compile."""
  cache = programs.Cache()
  trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES), programs=cache)
  for structure in (trainer.Structure(PREFIX, PREFIX, 'update'), trainer.Structure(PREFIX)):
    run = lambda cache: trainer.train_stack(MODEL, structure, CONFIG, DATA, grafted_members(
        stacked), programs=cache)
    reused = run(cache)
    fresh = run(None)
    jax.tree.map(np.testing.assert_array_equal, reused.variables, fresh.variables)
  assert (cache.hits, cache.misses) == (6, 3)


def test_a_stack_padded_to_the_largest_keeps_its_results_and_shares_its_programs(stacked):
  """A base stack of 2 padded to 3 members (the study's largest) trains its 2 as alone, and a
  frozen stack of 3 then reuses its three programs."""
  small = members(HALVES[:2])
  alone = trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, small, programs=None)
  cache = programs.Cache()
  padded = trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, small, programs=cache,
                               pad_to=3)
  assert padded.test_accuracy.shape == (2,)
  jax.tree.map(np.testing.assert_array_equal, padded.variables, alone.variables)
  np.testing.assert_array_equal(padded.train_loss, alone.train_loss)
  trainer.train_stack(MODEL, trainer.Structure(PREFIX, PREFIX, 'update'), CONFIG, DATA,
                      grafted_members(stacked), programs=cache, pad_to=3)
  assert (cache.hits, cache.misses) == (3, 3)


def test_a_stack_in_chunks_trains_as_one_with_one_program_per_phase(stacked, stacked_epochs):
  """--members_per_program=2: the three HALVES as two chunks of 2 (the last padded), each
  epoch of each in turn, train as the whole stack at once."""
  cache, epochs = programs.Cache(), []
  out = trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA, members(HALVES),
                            programs=cache, chunk=2, on_epoch=lambda e, m: epochs.append(m))
  assert cache.misses == 3 and cache.hits == 0  # init, epoch, evaluate: one each
  jax.tree.map(np.testing.assert_array_equal, out.variables, stacked.variables)
  np.testing.assert_array_equal(out.test_accuracy, stacked.test_accuracy)
  for mine, theirs in zip(epochs, stacked_epochs):
    np.testing.assert_array_equal(mine, theirs[1])


def test_a_stack_too_large_for_the_memory_runs_in_chunks_that_fit(stacked):
  """Given a device's bytes (a GPU's `memory_stats`; a CPU reports none), a stack runs in the
  largest chunks whose compiled programs fit: the three HALVES, with the limit that chunks of 1
  measure, run one by one and train as the whole stack; one member that does not fit is a clear
  error. (The whole stack's programs are the `stacked` fixture's, from this process's cache.)"""
  run = lambda **kwargs: trainer.train_stack(MODEL, trainer.Structure(), CONFIG, DATA,
                                             members(HALVES), **kwargs)
  whole, ones = run(memory=2**50), run(chunk=1, memory=2**50)
  assert (whole.members_per_program, ones.members_per_program) == (3, 1)
  assert whole.footprint.members == 3 and whole.footprint.program > ones.footprint.program
  fitted = run(memory=ones.footprint.total(3))
  assert fitted.members_per_program == 1 and fitted.footprint == ones.footprint
  jax.tree.map(np.testing.assert_array_equal, fitted.variables, stacked.variables)
  np.testing.assert_array_equal(fitted.test_accuracy, stacked.test_accuracy)
  assert run(memory=0).footprint is None  # no limit (a CPU's): not measured, one chunk
  with pytest.raises(ValueError, match=r'one member per device needs [0-9.]+ GiB'):
    run(memory=1)


def test_chunk_sizes_are_searched_on_the_line_through_two_measurements():
  low, high = trainer.Footprint(2, 300, 20), trainer.Footprint(8, 900, 80)
  assert high.total(8) == 900 and low.total(8) == 300 + 3 * 20  # four chunks: three held
  # At 4 members: 300 + 100 * 2 = 500 bytes of program, and one more chunk of 40 held.
  assert trainer.between(low, high, 8, 2, limit=540) == 4
  assert trainer.between(low, high, 8, 2, limit=539) is None  # then 2 (low) it is
  assert trainer.between(low, high, 8, 2, limit=10**6) == 6  # strictly below `high`
  assert trainer.between(low, high, 8, 4, limit=10**6) == 4  # multiples of the devices


def test_an_unhashable_key_compiles_every_time_and_the_cache_is_bounded():
  class Listed(nn.Module):
    widths: list

  cache = programs.Cache(size=2)
  calls = []
  compile_ = lambda: calls.append(1) or len(calls)
  assert cache.get((Listed([1]), 'epoch'), compile_) == 1
  assert cache.get((Listed([1]), 'epoch'), compile_) == 2 and len(cache) == 0
  for key in 'abc':
    cache.get(key, compile_)
  assert len(cache) == 2 and cache.get('a', compile_) == 6  # 'a', least recent, was dropped
  assert cache.get('c', compile_) == 5  # still there
