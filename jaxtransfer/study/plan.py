"""The plan of a study: its runs and their stacks, and what the plan fixes of their results.

A `Run` is one trained model: a split, the half it is trained on (target), a condition (see
`conditions`) and a grafted/frozen depth n. Runs sharing static structure (grafted and frozen
layers) and target size form a `Stack`, trained in one call of `trainer.train_stack`. Every
run's PRNG keys come from its identity alone, so a stack's composition, the order of stacks
and a study's shards never change what a model learns. The study's config, its schema and its
rules are `jaxtransfer.config`'s.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Mapping, Sequence

import jax

from jaxtransfer import conditions
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.config import ConfigError, StudyConfig
from jaxtransfer.data import splits as splits_lib
from jaxtransfer.train import trainer


@dataclasses.dataclass(frozen=True)
class Run:
  split: int
  target: str  # 'A' | 'B'
  condition: str  # a name in `conditions.TABLE`
  depth: int
  seed: int

  @property
  def source(self) -> str:
    """The half whose base net gives the grafted layers ('' for none)."""
    return conditions.get(self.condition).source_half(self.target)

  @property
  def frozen(self) -> bool:
    return conditions.get(self.condition).frozen

  @property
  def name(self) -> str:
    return f'split{self.split}-{self.target}-{self.condition}-n{self.depth}-seed{self.seed}'

  def source_base(self) -> Run:
    """The base run whose net gives this run's grafted layers."""
    return Run(self.split, self.source, conditions.BASE.name, 0, self.seed)


@dataclasses.dataclass(frozen=True)
class Stack:
  name: str
  structure: trainer.Structure
  runs: tuple[Run, ...]

  @property
  def is_base(self) -> bool:
    return self.runs[0].condition == conditions.BASE.name


def largest(stacks: Sequence[Stack]) -> int:
  """Members of a study's largest stack: what stacks with their structure as data are padded
  to (`trainer.train_stack(pad_to=...)`), so that they all share one program shape."""
  return max(len(stack.runs) for stack in stacks)


def half_classes(halves: Sequence[splits_lib.Split], split: int, half: str) -> tuple[int, ...]:
  """The classes of half 'A' or 'B' of split `split`."""
  return halves[split][half == 'B']


def make_halves(config: StudyConfig, class_names: Sequence[str]) -> list[splits_lib.Split]:
  if config.halves == 'dissimilar':
    if config.num_splits != 1:
      raise ConfigError('--halves=dissimilar is one fixed split: use --num_splits=1')
    return [splits_lib.dissimilar_halves(class_names)]
  if config.halves == 'explicit':
    return [splits_lib.explicit_halves(class_names, config.half_classes)]
  return splits_lib.random_halves(len(class_names), config.num_splits, config.split_seed)


def structure_for(run: Run, layer_names: Sequence[str], batchnorm: str) -> trainer.Structure:
  prefix = tuple(layer_names[:run.depth])
  graft = prefix if run.source else ()
  frozen = prefix if run.frozen else ()
  return trainer.Structure(graft, frozen, batchnorm if frozen else 'update')


def runs(config: StudyConfig) -> list[Run]:
  """Every run of a (validated) study: the base nets first (every later run grafts from them)."""
  targets = ('B',) if config.directions == 'AtoB' else ('A', 'B')
  seeds = range(config.seeds)
  chosen = config.splits or range(config.num_splits)
  base = conditions.BASE.name
  out = [Run(s, half, base, 0, seed) for s in chosen for half in ('A', 'B') for seed in seeds]
  return out + [
      Run(s, target, condition, depth, seed)
      for depth in config.depths
      for condition in config.conditions
      for s in chosen
      for target in targets
      for seed in seeds
  ]


def plan(config: StudyConfig, layer_names: Sequence[str], halves: Sequence[splits_lib.Split],
         sizes: Mapping[tuple[int, str], tuple[int, int]] | None = None) -> list[Stack]:
  """All runs, grouped into stacks by (structure, target classes, target examples), base stacks
  first (every later stack grafts from them).

  `sizes[(split, half)]` = (train, test) examples of that half (default: the same for every
  half of a size, as in a balanced dataset). Members of a stack train and evaluate on arrays of
  one shape, so halves with other counts (unbalanced classes) train in stacks of their own,
  named with a `-N<train>-M<test>` suffix where a name would otherwise repeat."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs(config):
    key = (structure_for(run, layer_names, config.frozen_batchnorm),
           len(half_classes(halves, run.split,
                            run.target)), sizes[(run.split, run.target)] if sizes else None)
    groups.setdefault(key, []).append(run)
  names = [_stack_name(structure, size) for structure, size, _ in groups]
  return [
      Stack(name + (f'-N{counts[0]}-M{counts[1]}' if names.count(name) > 1 else ''), structure,
            tuple(group)) for name, ((structure, _, counts), group) in zip(names, groups.items())
  ]


def planned_row(config: StudyConfig, run: Run,
                halves: Sequence[splits_lib.Split] | None = None) -> dict:
  """What the plan fixes of a run's result row (with `halves`, its split's classes too): the
  trainer writes these values, and every reader checks them."""
  row = {**run_fields(run), 'source': run.source, 'frozen': run.frozen, 'epochs': config.epochs}
  if halves is not None:
    a, b = halves[run.split]
    row.update(classes_A=' '.join(map(str, a)), classes_B=' '.join(map(str, b)))
  return row


def expected_rows(config: StudyConfig, planned: Sequence[Run],
                  halves: Sequence[splits_lib.Split] | None = None) -> dict[tuple, dict]:
  """Run id -> `planned_row`, for `rows.check_rows`."""
  return {rows_lib.run_id(row): row for row in (planned_row(config, r, halves) for r in planned)}


def _stack_name(structure: trainer.Structure, size: int) -> str:
  if structure == trainer.Structure():
    return f'base-k{size}'
  kind = 'frozen' if structure.frozen_layers else 'finetune'
  graft = 'graft' if structure.graft_layers else 'random'
  depth = max(len(structure.graft_layers), len(structure.frozen_layers))
  return f'{kind}-{graft}-n{depth}-k{size}'


def run_key(run: Run, purpose: str) -> jax.Array:
  """A PRNG key from the run's identity alone, so results do not depend on stack order."""
  return jax.random.fold_in(jax.random.key(run.seed), zlib.crc32(f'{run.name}/{purpose}'.encode()))


def run_fields(run: Run) -> dict:
  """The columns that identify a run in results and metrics files."""
  return {
      'split': run.split, 'target': run.target, 'condition': run.condition, 'depth': run.depth,
      'seed': run.seed
  }
