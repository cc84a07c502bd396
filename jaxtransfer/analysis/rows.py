"""Tidy results: one row per trained model, its schema, its files and its one checker.

Every reader of rows (results.csv, a workdir's rows files, a shard, a study to compare) goes
through `typed_row` and `check_rows`: one schema, one set of checks, errors that name the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from jaxtransfer import conditions, files

FIELDS = ('split', 'classes_A', 'classes_B', 'source', 'target', 'condition', 'depth', 'frozen',
          'batchnorm', 'seed', 'epochs', 'test_accuracy', 'train_accuracy', 'final_loss',
          'wall_seconds', 'config_hash', 'diverged')
# What identifies a run: at most one row each.
RUN_FIELDS = ('split', 'target', 'condition', 'depth', 'seed')
# What identifies a paired unit: the runs of one split, target half and seed share that half's
# base net, so every paired difference is taken within a unit.
UNIT_FIELDS = ('split', 'target', 'seed')
_TYPES = {
    **dict.fromkeys(('split', 'depth', 'seed', 'epochs'), int),
    **dict.fromkeys(('test_accuracy', 'train_accuracy', 'final_loss', 'wall_seconds'), float),
    **dict.fromkeys(('frozen', 'diverged'), bool),
}


def to_csv(rows: Iterable[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, FIELDS, lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
  return out.getvalue()


def write(directory: str, rows: Sequence[dict]) -> None:
  """`results.csv` and `results.json` in `directory`."""
  files.write_text(os.path.join(directory, 'results.csv'), to_csv(rows))
  files.write_json(os.path.join(directory, 'results.json'), list(rows))


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


def unit_key(row: Mapping) -> tuple:
  """(split, target, seed): the paired unit of a row, whose base net it is compared with."""
  return tuple(row[k] for k in UNIT_FIELDS)


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
    bases = {unit_key(r) for r in rows if r['condition'] == conditions.BASE.name}
    for row in rows:
      if unit_key(row) not in bases:
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


def select(rows: Iterable[dict], **where) -> list[dict]:
  """The rows whose columns have the given values."""
  return [r for r in rows if all(r[k] == v for k, v in where.items())]
