"""The statistics of result rows: mean ± 95% CI, Welch's interval, paired differences, and the
learning-curve summaries of metrics.jsonl.

Differences are paired within a unit (`rows.unit_key`: split, target half and seed), whose runs
share one base net: pairing removes the spread between splits and halves from a comparison.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxtransfer import conditions
from jaxtransfer.analysis.rows import select, unit_key


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Mean and the half-width of its Student-t confidence interval (nan for one value)."""
  from scipy import stats  # scipy ships with jax
  x = np.asarray(values, np.float64)
  if x.size < 2:
    return float(x.mean()), float('nan')
  half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
  return float(x.mean()), float(half)


def paired_to_base(rows: Sequence[dict], condition: str, depth: int) -> list[float]:
  """Test accuracy of `condition` at `depth` minus its target's base net (same split, half and
  seed): paired differences remove the split-to-split spread from the comparison."""
  base = {unit_key(r): r['test_accuracy'] for r in select(rows, condition=conditions.BASE.name)}
  return [
      r['test_accuracy'] - base[unit_key(r)]
      for r in select(rows, condition=condition, depth=depth)
      if unit_key(r) in base
  ]


def paired(rows: Sequence[dict], cond_a: str, cond_b: str, depth: int) -> list[float]:
  """`cond_a` minus `cond_b` at `depth`, paired on (split, target, seed)."""
  b = {unit_key(r): r['test_accuracy'] for r in select(rows, condition=cond_b, depth=depth)}
  return [
      r['test_accuracy'] - b[unit_key(r)]
      for r in select(rows, condition=cond_a, depth=depth)
      if unit_key(r) in b
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
