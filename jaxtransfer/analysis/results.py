"""Tidy results: one row per trained model, atomic writes, and mean +- 95% CI summaries.

Every reader of rows (results.csv, a workdir's rows files, a shard, a study to compare) goes
through `typed_row` and `check_rows`: one schema, one set of checks, errors that name the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from jaxtransfer import conditions

FIELDS = ('split', 'classes_A', 'classes_B', 'source', 'target', 'condition', 'depth', 'frozen',
          'batchnorm', 'seed', 'epochs', 'test_accuracy', 'train_accuracy', 'final_loss',
          'wall_seconds', 'config_hash', 'diverged')
# What identifies a run: at most one row each.
RUN_FIELDS = ('split', 'target', 'condition', 'depth', 'seed')
_TYPES = {
    **dict.fromkeys(('split', 'depth', 'seed', 'epochs'), int),
    **dict.fromkeys(('test_accuracy', 'train_accuracy', 'final_loss', 'wall_seconds'), float),
    **dict.fromkeys(('frozen', 'diverged'), bool),
}


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


class RowsError(ValueError):
  """Result rows that cannot be trusted: one line naming the file (and row)."""


def read_json(path: str) -> Any:
  """The JSON in `path`; a file that is not JSON is named in the error."""
  try:
    with open(path, 'rb') as f:
      return json.loads(f.read().decode())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RowsError(f'{path} is not valid JSON ({e})') from None


def is_diverged(final_loss: float, finite_variables: bool = True) -> bool:
  """A model whose final loss or any of whose variables is not finite: its accuracy is not a
  result. Rows from before the `diverged` column are judged by their loss alone."""
  return not (math.isfinite(final_loss) and finite_variables)


def run_id(row: Mapping) -> tuple:
  return tuple(row[k] for k in RUN_FIELDS)


def describe(rid: tuple) -> str:
  """A run id as `split=0 target=A condition=base depth=0 seed=0`."""
  return ' '.join(f'{k}={v}' for k, v in zip(RUN_FIELDS, rid))


def _value(column: str, value: Any, where: str) -> Any:
  """`value` as the column's type: from CSV text or JSON, nothing else (no bool as int)."""
  kind = _TYPES.get(column, str)
  try:
    if isinstance(value, str) and kind is not str:
      if kind is bool:
        if value not in ('True', 'False'):
          raise ValueError
        return value == 'True'
      return kind(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      return float(value)
    if type(value) is kind:  # pylint: disable=unidiomatic-typecheck
      return value
  except ValueError:
    pass
  raise RowsError(f'{where}: column {column} is {value!r}, expected {kind.__name__}')


def typed_row(record: Any, where: str) -> dict:
  """One row with every column present and typed (CSV text or JSON values parsed back)."""
  if not isinstance(record, dict):
    raise RowsError(f'{where}: expected a row (an object of columns), got {record!r:.60}')
  missing = [c for c in FIELDS if c != 'diverged' and record.get(c) is None]
  if missing:
    raise RowsError(f'{where}: missing column(s) {", ".join(missing)}')
  row = {c: _value(c, record[c], where) for c in FIELDS if record.get(c) is not None}
  row.setdefault('diverged', is_diverged(row['final_loss']))  # rows from before the column
  if row['target'] not in ('A', 'B') or row['condition'] not in conditions.BY_NAME:
    raise RowsError(f'{where}: unknown run (target {row["target"]!r}, condition '
                    f'{row["condition"]!r})')
  if min(row['split'], row['depth'],
         row['seed']) < 0 or row['epochs'] < 1 or not (0 <= row['test_accuracy'] <= 1 and
                                                       0 <= row['train_accuracy'] <= 1):
    raise RowsError(f'{where}: values out of range in {describe(run_id(row))}')
  return row


def check_rows(rows: Sequence[dict], where: str,
               expected: Mapping[tuple, Mapping[str, Any]] | None = None) -> list[dict]:
  """`rows` (typed) if they hold each run once and, with `expected` (run id -> the values the
  plan fixes), exactly the planned runs with those values; else a RowsError naming `where`.
  Without a plan, every paired run needs its base net's row (the tables pair against it)."""
  if not rows:
    raise RowsError(f'{where}: no result rows')
  seen = set()
  for row in rows:
    rid = run_id(row)
    if rid in seen:
      raise RowsError(f'{where}: run {describe(rid)} appears more than once')
    seen.add(rid)
  if expected is None:
    bases = {
        (r['split'], r['target'], r['seed']) for r in rows if r['condition'] == conditions.BASE.name
    }
    for row in rows:
      if (row['split'], row['target'], row['seed']) not in bases:
        raise RowsError(f'{where}: no base net row for split {row["split"]}, target '
                        f'{row["target"]}, seed {row["seed"]} (needed to pair '
                        f'{describe(run_id(row))})')
    return list(rows)
  extra, missing = sorted(seen - set(expected)), sorted(set(expected) - seen)
  if extra:
    raise RowsError(f'{where}: {len(extra)} run(s) not in the study\'s plan, e.g. '
                    f'{describe(extra[0])}')
  if missing:
    raise RowsError(f'{where}: {len(missing)} planned run(s) missing, e.g. '
                    f'{describe(missing[0])}')
  for row in rows:
    for column, value in expected[run_id(row)].items():
      if row[column] != value:
        raise RowsError(f'{where}: {describe(run_id(row))} has {column} {row[column]!r}, '
                        f'the study\'s plan says {value!r}')
  return list(rows)


def read_csv(path: str, expected: Mapping[tuple, Mapping[str, Any]] | None = None) -> list[dict]:
  """The rows of a results.csv, typed and checked (`check_rows`); any problem is one
  RowsError naming `path`."""
  try:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      records = list(reader)
      header = reader.fieldnames or []
  except (UnicodeDecodeError, csv.Error) as e:
    raise RowsError(f'{path} is not a readable CSV file ({e})') from None
  missing = [c for c in FIELDS if c != 'diverged' and c not in header]
  if missing:
    raise RowsError(f'{path}: missing column(s) {", ".join(missing)}')
  rows = [typed_row(r, f'{path} line {i}') for i, r in enumerate(records, start=2)]
  return check_rows(rows, path, expected)


def usable(rows: Iterable[dict]) -> list[dict]:
  """The rows whose model did not diverge: the only ones any table, figure or claim uses."""
  return [r for r in rows if not r['diverged']]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Mean and the half-width of its Student-t confidence interval (nan for one value)."""
  from scipy import stats  # scipy ships with jax
  x = np.asarray(values, np.float64)
  if x.size < 2:
    return float(x.mean()), float('nan')
  half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
  return float(x.mean()), float(half)


def welch_ci(a: Sequence[float], b: Sequence[float],
             confidence: float = 0.95) -> tuple[float, float]:
  """mean(a) − mean(b) and the half-width of Welch's t interval. For two studies' values:
  their units are different nets, so nothing pairs them and their variances need not agree."""
  from scipy import stats  # scipy ships with jax
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = float(x.mean() - y.mean())
  if x.size < 2 or y.size < 2:
    return diff, float('nan')
  vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
  if vx + vy == 0:
    return diff, 0.0
  df = (vx + vy)**2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
  return diff, float(stats.t.ppf(0.5 + confidence / 2, df) * np.sqrt(vx + vy))


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
      if (r['split'], r['target'], r['seed']) in base
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
    if unit not in base:  # its base net diverged
      continue
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
