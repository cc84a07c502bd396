"""Layer similarity of a finished study: linear CKA of every model against its base net.

For each model, layer by layer, linear CKA (`cka`) against the base net of its own target half,
on that half's test images; averaged over splits, directions and seeds into one row per
(condition, n), drawn as a heat-map. The row 'other base' compares the two halves'
independently trained base nets: where it falls, the features stop being general.
"""

from __future__ import annotations

import time
from typing import AbstractSet, Callable, Sequence

import jax
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


def write(study: Study, workdir: Workdir, test_ds, mean, std,
          exclude: AbstractSet[tuple] = frozenset(), log: Callable[[str], None] = lambda line: None,
          member_map: str = 'map') -> list[str]:
  """figures/cka.json (every model's per-layer CKA, the data) and figures/cka.{png,pdf} (their
  means) for `study` in `workdir`, on its test images `test_ds` normalised by `mean` and `std`;
  returns the figure paths. Runs in `exclude` (run ids: diverged models) are left out, and so
  are the models paired with such a base. `log` gets its progress lines; `member_map` as in
  training ('map': networks in turn, 'vmap': as many at once as BATCH_BYTES allows)."""
  records = measure(study, workdir, test_ds, mean, std, exclude, log, member_map)
  layers = list(study.layer_names)
  files.write_json(workdir.file('figures', DATA_FILE), {'layers': layers, 'records': records})
  return draw(records, layers, study.config.conditions, study.config.depths,
              workdir.file('figures', 'cka'))


def measure(study: Study, workdir: Workdir, test_ds, mean, std,
            exclude: AbstractSet[tuple] = frozenset(),
            log: Callable[[str], None] = lambda line: None, member_map: str = 'map') -> list[dict]:
  """One record per model and row of the figure: its run's identity, the row label and the
  per-layer CKA with its target half's base net (the reference). Each reference's Grams are
  computed once, then every model of one shape is compared with its reference in one program."""
  images = test_images(study, test_ds, mean, std)
  nets = {
      run: v
      for run, v in workdir.members(study.stacks).items()
      if rows_lib.run_id(plan_lib.run_fields(run)) not in exclude
  }
  base = conditions.BASE.name
  base_of = lambda run, half: Run(run.split, half, base, 0, run.seed)
  pairs, compared = [], set()  # (the run recorded, its row label, the net, its reference)
  for run in sorted(nets, key=_sort_key):
    reference = base_of(run, run.target)
    if run.condition == base or reference not in nets:
      continue
    other = base_of(run, 'A' if run.target == 'B' else 'B')
    if other in nets and reference not in compared:
      compared.add(reference)  # the other half's base net, once per (split, target, seed)
      pairs.append((reference, OTHER_BASE, other, reference))
    pairs.append((run, f'{run.condition} n={run.depth}', run, reference))
  log(f'layer similarity (linear CKA): {len(pairs)} models against {len({p[3] for p in pairs})} '
      f'base nets, on up to {_per_class(study)} test images per class')
  start = time.monotonic()
  values = _compare(study, nets, images, pairs, member_map)
  log(f'layer similarity: done in {time.monotonic() - start:.1f} s')
  return [{**plan_lib.run_fields(run), 'row': label, 'cka': [float(v)
                                                             for v in value]}
          for (run, label, _, _), value in zip(pairs, values)]


def _per_class(study: Study) -> int:
  return max(1, study.config.cka_images // len(study.halves[0][1]))


def test_images(study: Study, test_ds, mean, std) -> dict[tuple[int, str], np.ndarray]:
  """(split, half) -> the test images CKA compares that half's nets on, normalised: the first
  cka_images / (classes per half) of each of its classes."""
  images = {}
  for s in sorted({r.split for stack in study.stacks for r in stack.runs}):
    for t, classes in zip('AB', study.halves[s]):
      idx = splits_lib.class_indices(test_ds.labels, classes)
      idx = np.concatenate([idx[test_ds.labels[idx] == c][:_per_class(study)] for c in classes])
      images[(s, t)] = np.asarray(datasets.normalize(test_ds.images[idx], mean, std))
  return images


# Memory for the networks one CKA program runs at once under vmap (their layer outputs and
# Grams): 250 seed-size nets on 500 images need ~15 GB together, so they go in batches.
BATCH_BYTES = 2 << 30


def _compare(study: Study, nets: dict, images: dict, pairs: list, member_map: str) -> list:
  """[L] CKA values per pair: the references' Grams in one program per reference shape, then
  the nets in one program per net shape."""
  layers = tuple(study.layer_names)
  model_of = lambda run: study.make(len(study.classes(run)))
  shape_of = lambda run: (len(study.classes(run)), len(images[(run.split, run.target)]))
  grams, where = {}, {}  # shape -> references' Grams; reference -> (its shape, its index)
  for shape, refs in _grouped(sorted({p[3] for p in pairs}, key=_sort_key), shape_of).items():
    model, ims = model_of(refs[0]), np.stack([images[(r.split, r.target)] for r in refs])
    stacked = cka.stacked([nets[r] for r in refs])
    grams[shape] = (ims,
                    cka.reference_grams(model, layers, stacked, ims,
                                        batch=_batch(model, layers, stacked, ims, member_map)))
    where.update({r: (shape, i) for i, r in enumerate(refs)})
  values = [None] * len(pairs)
  by_shape = _grouped(range(len(pairs)), lambda i:
                      (len(study.classes(pairs[i][2])), where[pairs[i][3]][0]))
  for (_, ref_shape), indices in by_shape.items():
    ims, ref_grams = grams[ref_shape]
    model = model_of(pairs[indices[0]][2])
    stacked = cka.stacked([nets[pairs[i][2]] for i in indices])
    which = np.array([where[pairs[i][3]][1] for i in indices])
    out = cka.cka_with_references(model, layers, stacked, which, ims, ref_grams,
                                  batch=_batch(model, layers, stacked, ims, member_map))
    for i, value in zip(indices, out):
      values[i] = value
  return values


def _grouped(items, key: Callable) -> dict:
  groups: dict = {}
  for item in items:
    groups.setdefault(key(item), []).append(item)
  return groups


def _batch(model, layers, stacked, images, member_map: str) -> int:
  """Networks per step of a CKA program: 1 (in turn) under 'map', else as many as fit."""
  if member_map == 'map':
    return 1
  one = jax.tree.map(lambda x: x[0], stacked)
  per_net = cka.network_bytes(model, layers, one, images[0])
  return max(1, min(len(jax.tree.leaves(stacked)[0]), BATCH_BYTES // per_net))


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
