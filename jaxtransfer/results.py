"""Tidy results: one row per trained model, atomic writes, and mean +- 95% CI summaries."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from jaxtransfer import conditions

FIELDS = ('split', 'classes_A', 'classes_B', 'source', 'target', 'condition', 'depth', 'frozen',
          'batchnorm', 'seed', 'epochs', 'test_accuracy', 'train_accuracy', 'final_loss',
          'wall_seconds', 'config_hash')


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yield a temporary path beside `path`; move it into place only if the block succeeds.

  No reader ever sees a half-written file under the final name, even after `kill -9`.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1]  # keep the extension: savefig picks the format from it
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      f.write(text)


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + '\n')


def to_csv(rows: Iterable[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, FIELDS, lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
  return out.getvalue()


def write(directory: str, rows: Sequence[dict]) -> None:
  """`results.csv` and `results.json` in `directory`."""
  atomic_write_text(os.path.join(directory, 'results.csv'), to_csv(rows))
  atomic_write_json(os.path.join(directory, 'results.json'), list(rows))


def read_csv(path: str) -> list[dict]:
  """Rows with numbers and booleans parsed back."""
  ints = ('split', 'depth', 'seed', 'epochs')
  floats = ('test_accuracy', 'train_accuracy', 'final_loss', 'wall_seconds')
  with open(path) as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    row.update({k: int(row[k]) for k in ints})
    row.update({k: float(row[k]) for k in floats})
    row['frozen'] = row['frozen'] == 'True'
  return rows


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Mean and the half-width of its Student-t confidence interval (nan for one value)."""
  from scipy import stats  # scipy ships with jax
  x = np.asarray(values, np.float64)
  if x.size < 2:
    return float(x.mean()), float('nan')
  half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
  return float(x.mean()), float(half)


def select(rows: Iterable[dict], **where) -> list[dict]:
  return [r for r in rows if all(r[k] == v for k, v in where.items())]


def paired_to_base(rows: Sequence[dict], condition: str, depth: int) -> list[float]:
  """Test accuracy of `condition` at `depth` minus its target's base net (same split, half and
  seed): paired differences remove the split-to-split spread from the comparison."""
  base = {(r['split'], r['target'], r['seed']): r['test_accuracy']
          for r in select(rows, condition=conditions.BASE.name)}
  return [
      r['test_accuracy'] - base[(r['split'], r['target'], r['seed'])]
      for r in select(rows, condition=condition, depth=depth)
  ]


def pooled_over_depths(rows: Sequence[dict], condition: str) -> list[float]:
  """`condition` − base averaged over depths within each (split, target, seed): one value per
  independent unit. Pooling the per-depth differences directly would count the same base net
  once per depth and give a falsely narrow confidence interval."""
  base = {(r['split'], r['target'], r['seed']): r['test_accuracy']
          for r in select(rows, condition=conditions.BASE.name)}
  diffs: dict[tuple, list[float]] = {}
  for r in select(rows, condition=condition):
    unit = (r['split'], r['target'], r['seed'])
    diffs.setdefault(unit, []).append(r['test_accuracy'] - base[unit])
  return [float(np.mean(v)) for _, v in sorted(diffs.items())]


def paired(rows: Sequence[dict], cond_a: str, cond_b: str, depth: int) -> list[float]:
  """`cond_a` minus `cond_b` at `depth`, paired on (split, target, seed)."""
  b = {(r['split'], r['target'], r['seed']): r['test_accuracy']
       for r in select(rows, condition=cond_b, depth=depth)}
  return [
      r['test_accuracy'] - b[(r['split'], r['target'], r['seed'])]
      for r in select(rows, condition=cond_a, depth=depth)
      if (r['split'], r['target'], r['seed']) in b
  ]


# Learning curves: metrics.jsonl records (one per model and epoch, `workdir.read_metrics`).


def curves(records: Sequence[dict], key: str) -> dict[tuple[str, int], tuple[list, list]]:
  """(epochs, mean of `key` over the models at each epoch) per (condition, depth); records
  without `key` (e.g. test accuracy, recorded only with --eval_every_epoch) are left out."""
  values: dict[tuple[str, int], dict[int, list[float]]] = {}
  for r in records:
    if key in r:
      values.setdefault((r['condition'], r['depth']), {}).setdefault(r['epoch'], []).append(r[key])
  return {
      group: (sorted(by_epoch), [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)])
      for group, by_epoch in values.items()
  }


def epoch_changes(records: Sequence[dict], last: int = 3,
                  key: str = 'test_accuracy') -> dict[str, list[list[float]]]:
  """|change of `key`| between consecutive epochs, each model's last `last` changes (fewer when it
  trained fewer epochs), per condition and model: how much a final value rests on the epoch it
  was taken at. Models with an epoch missing `key` are left out."""
  by_run: dict[tuple[str, str], dict[int, float]] = {}
  for r in records:
    by_run.setdefault((r['condition'], r['run']), {})[r['epoch']] = r.get(key)
  out: dict[str, list[list[float]]] = {}
  for (condition, _), by_epoch in sorted(by_run.items()):
    epochs = sorted(by_epoch)
    series = [by_epoch[e] for e in epochs]
    if len(series) < 2 or None in series or epochs != list(range(1, len(epochs) + 1)):
      continue
    out.setdefault(condition, []).append(np.abs(np.diff(series[-(last + 1):])).tolist())
  return out
