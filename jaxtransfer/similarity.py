"""Layer similarity of a finished study: linear CKA of every model against its base net.

For each model, layer by layer, linear CKA (`cka`) against the base net of its own target half,
on that half's test images; averaged over splits, directions and seeds into one row per
(condition, n), drawn as a heat-map. The row 'other base' compares the two halves'
independently trained base nets: where it falls, the features stop being general.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Sequence

import numpy as np

from jaxtransfer import cka, conditions, data, plots, results
from jaxtransfer import plan as plan_lib
from jaxtransfer import splits as splits_lib
from jaxtransfer.plan import Run, Stack, StudyConfig
from jaxtransfer.workdir import Workdir

OTHER_BASE = 'other base'


def write(config: StudyConfig, workdir: Workdir, stacks: Sequence[Stack], halves, make: Callable,
          layer_names: Sequence[str], test_ds, mean, std,
          exclude: AbstractSet[tuple] = frozenset()) -> list[str]:
  """figures/cka.{png,pdf} for the study in `workdir`; returns their paths. Runs in `exclude`
  (run ids: diverged models) are left out, and so are the models paired with such a base."""
  per_class = max(1, config.cka_images // len(halves[0][1]))
  features = {}  # (split, target) -> normalised test images
  for s in sorted({r.split for stack in stacks for r in stack.runs}):
    for t, classes in zip('AB', halves[s]):
      idx = splits_lib.class_indices(test_ds.labels, classes)
      idx = np.concatenate([idx[test_ds.labels[idx] == c][:per_class] for c in classes])
      features[(s, t)] = np.asarray(data.normalize(test_ds.images[idx], mean, std))
  nets = {
      run: v
      for run, v in workdir.members(stacks).items()
      if results.run_id(plan_lib.run_fields(run)) not in exclude
  }
  base = conditions.BASE.name
  rows: dict[str, list[np.ndarray]] = {}
  for run, variables in sorted(nets.items(), key=lambda item: _sort_key(item[0])):
    base_of = lambda half: nets.get(Run(run.split, half, base, 0, run.seed))
    if run.condition == base or base_of(run.target) is None:
      continue
    model = make(len(plan_lib.half_classes(halves, run.split, run.target)))
    images = features[(run.split, run.target)]
    reference = cka.layer_features(model, base_of(run.target), images)
    other = 'A' if run.target == 'B' else 'B'
    if run.depth == config.depths[0] and base_of(other) is not None:  # once per split/target/seed
      other_model = make(len(plan_lib.half_classes(halves, run.split, other)))
      rows.setdefault(OTHER_BASE, []).append(
          cka.per_layer_cka(cka.layer_features(other_model, base_of(other), images), reference))
    rows.setdefault(f'{run.condition} n={run.depth}', []).append(
        cka.per_layer_cka(cka.layer_features(model, variables, images), reference))
  order = [OTHER_BASE] + [f'{c} n={d}' for c in config.conditions for d in config.depths]
  labels = [label for label in order if label in rows]
  if not labels:
    return []
  matrix = np.stack([np.mean(rows[label], axis=0) for label in labels])
  return plots.heatmap(matrix, labels, list(layer_names), workdir.file('figures', 'cka'),
                       title='Linear CKA with the target half\'s base net, per layer',
                       xlabel='layer', ylabel='model')


def _sort_key(run: Run) -> tuple:
  """The order the analysis visits runs in (as the tuple keys it once sorted by)."""
  return (run.split, run.target, run.condition, run.depth, run.seed)
