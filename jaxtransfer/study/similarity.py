"""Layer similarity of a finished study: linear CKA of every model against its base net.

For each model, layer by layer, linear CKA (`cka`) against the base net of its own target half,
on that half's test images; averaged over splits, directions and seeds into one row per
(condition, n), drawn as a heat-map. The row 'other base' compares the two halves'
independently trained base nets: where it falls, the features stop being general.
"""

from __future__ import annotations

import time
from typing import AbstractSet, Callable, Sequence

import numpy as np

from jaxtransfer import conditions
from jaxtransfer.analysis import cka, plots
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer import files
from jaxtransfer.data import datasets
from jaxtransfer.data import splits as splits_lib
from jaxtransfer.study import plan as plan_lib
from jaxtransfer.study.context import Study
from jaxtransfer.study.plan import Run
from jaxtransfer.study.workdir import Workdir

OTHER_BASE = 'other base'
DATA_FILE = 'cka.json'
PROGRESS_SECONDS = 10.0


def write(study: Study, workdir: Workdir, test_ds, mean, std,
          exclude: AbstractSet[tuple] = frozenset(),
          log: Callable[[str], None] = lambda line: None) -> list[str]:
  """figures/cka.json (every model's per-layer CKA, the data) and figures/cka.{png,pdf} (their
  means) for `study` in `workdir`, on its test images `test_ds` normalised by `mean` and `std`;
  returns the figure paths. Runs in `exclude` (run ids: diverged models) are left out, and so
  are the models paired with such a base. `log` gets its progress lines."""
  records = measure(study, workdir, test_ds, mean, std, exclude, log)
  layers = list(study.layer_names)
  files.write_json(workdir.file('figures', DATA_FILE), {'layers': layers, 'records': records})
  return draw(records, layers, study.config.conditions, study.config.depths,
              workdir.file('figures', 'cka'))


def measure(study: Study, workdir: Workdir, test_ds, mean, std,
            exclude: AbstractSet[tuple] = frozenset(),
            log: Callable[[str], None] = lambda line: None) -> list[dict]:
  """One record per model and row of the figure: its run's identity, the row label and the
  per-layer CKA with its target half's base net. `log` hears of it once at the start and then
  at most every PROGRESS_SECONDS (it takes a while: every model's features are computed)."""
  halves, make = study.halves, study.make
  per_class = max(1, study.config.cka_images // len(halves[0][1]))
  features = {}  # (split, target) -> normalised test images
  for s in sorted({r.split for stack in study.stacks for r in stack.runs}):
    for t, classes in zip('AB', halves[s]):
      idx = splits_lib.class_indices(test_ds.labels, classes)
      idx = np.concatenate([idx[test_ds.labels[idx] == c][:per_class] for c in classes])
      features[(s, t)] = np.asarray(datasets.normalize(test_ds.images[idx], mean, std))
  nets = {
      run: v
      for run, v in workdir.members(study.stacks).items()
      if rows_lib.run_id(plan_lib.run_fields(run)) not in exclude
  }
  base = conditions.BASE.name
  records, compared, references = [], set(), {}
  layers = tuple(study.layer_names)  # traced once for the study, not once per model
  record = lambda run, label, values: records.append(
      {**plan_lib.run_fields(run), 'row': label, 'cka': [float(v) for v in values]})
  todo = sorted(nets.items(), key=lambda item: _sort_key(item[0]))
  log(f'layer similarity (linear CKA): {len(todo)} models, on up to {per_class} test images per '
      'class')
  start = said = time.monotonic()
  for i, (run, variables) in enumerate(todo):
    if time.monotonic() - said >= PROGRESS_SECONDS:
      said = time.monotonic()
      log(f'layer similarity: {i} of {len(todo)} models, {said - start:.0f} s')
    base_of = lambda half: nets.get(Run(run.split, half, base, 0, run.seed))
    if run.condition == base or base_of(run.target) is None:
      continue
    model = make(len(study.classes(run)))
    images = features[(run.split, run.target)]
    key = (run.split, run.target, run.seed)
    if key not in references:  # each base net's features (and Gram matrices) once, not per model
      references[key] = [
          cka.Reference(f) for f in cka.layer_features(model, base_of(run.target), images, layers)
      ]
    reference = references[key]
    other = 'A' if run.target == 'B' else 'B'
    if key not in compared and base_of(other) is not None:
      compared.add(key)  # once per (split, target, seed)
      other_model = make(len(plan_lib.half_classes(halves, run.split, other)))
      record(
          Run(run.split, run.target, base, 0, run.seed), OTHER_BASE,
          cka.per_layer_cka(cka.layer_features(other_model, base_of(other), images, layers),
                            reference))
    record(run, f'{run.condition} n={run.depth}',
           cka.per_layer_cka(cka.layer_features(model, variables, images, layers), reference))
  return records


def read_data(path: str) -> dict:
  """The one reader of a cka.json (what pooling averages): the layers and every record checked,
  any problem named with the file and the record."""
  data = rows_lib.read_json(path)
  fix = 'rerun that study to rewrite it, or delete it (the pool then leaves CKA in each shard)'
  layers = data.get('layers') if isinstance(data, dict) else None
  records = data.get('records') if isinstance(data, dict) else None
  if not (isinstance(layers, list) and all(isinstance(n, str) for n in layers) and
          isinstance(records, list)):
    raise ValueError(f'{path} is not a CKA file (expected {{"layers": [...], "records": [...]}}); '
                     f'{fix}')
  for i, r in enumerate(records):
    values = r.get('cka') if isinstance(r, dict) else None
    if not (isinstance(r, dict) and isinstance(r.get('row'), str) and isinstance(values, list) and
            len(values) == len(layers) and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
      raise ValueError(f'{path} record {i}: not a CKA record (a "row" and {len(layers)} '
                       f'"cka" values); {fix}')
  return data


def draw(records: Sequence[dict], layer_names: Sequence[str], condition_names: Sequence[str],
         depths: Sequence[int], stem: str) -> list[str]:
  """The heat-map of the records' mean per row (rows in the order of conditions and depths);
  also what pooling draws from its shards' records."""
  rows: dict[str, list[list[float]]] = {}
  for r in records:
    rows.setdefault(r['row'], []).append(r['cka'])
  order = [OTHER_BASE] + [f'{c} n={d}' for c in condition_names for d in depths]
  labels = [label for label in order if label in rows]
  if not labels:
    return []
  matrix = np.stack([np.mean(rows[label], axis=0) for label in labels])
  return plots.heatmap(matrix, labels, list(layer_names), stem,
                       title='Linear CKA with the target half\'s base net, per layer',
                       xlabel='layer', ylabel='model')


def _sort_key(run: Run) -> tuple:
  """The order the analysis visits runs in (as the tuple keys it once sorted by)."""
  return (run.split, run.target, run.condition, run.depth, run.seed)
