"""Compiled programs kept for reuse within a process, keyed by everything they compute from.

Stacks of one study often run the same program: BnB and AnB at a depth differ only in their
sources' values, and the evaluation program ignores which layers were frozen. Tracing, lowering
and loading a program from the persistent compilation cache still costs seconds per stack on
a CPU host; a program found here costs nothing. The key is what the caller says the program
depends on (model, structure, configuration, mesh, ...) plus the abstract values and placements
of its arguments, so a hit is the very program a fresh compile would give.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Hashable

import jax

PyTree = Any


def signature(args: PyTree) -> Hashable:
  """What a program's lowering sees of its arguments: tree structure, shapes, dtypes (weak
  types included) and placements; not their values."""
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple((jax.typeof(x), getattr(x, 'sharding', None)) for x in leaves)


class Cache:
  """At most `size` compiled programs, the least recently used dropped first."""
  def __init__(self, size: int = 64):
    self.size = size
    self._programs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
    self.hits = self.misses = 0

  def get(self, key: Hashable, compile_: Callable[[], Any]) -> Any:
    """The program under `key`, compiled by `compile_()` the first time. A key that cannot be
    hashed (a model with a list attribute, say) is compiled every time, never cached."""
    try:
      hash(key)
    except TypeError:
      self.misses += 1
      return compile_()
    if key in self._programs:
      self.hits += 1
      self._programs.move_to_end(key)
      return self._programs[key]
    self.misses += 1
    program = self._programs[key] = compile_()
    while len(self._programs) > self.size:
      self._programs.popitem(last=False)
    return program

  def clear(self) -> None:
    self._programs.clear()

  def __len__(self) -> int:
    return len(self._programs)
