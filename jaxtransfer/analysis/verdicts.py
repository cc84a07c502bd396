"""The verdict on each of the seminar's claims: one rule, written once, for every study.

A claim is a contrast between two conditions, paired within each unit (one split, target half and
seed, against its own base nets), a predicted sign, the depths it speaks of and a reference size:
the paper's own effect for that claim. "Not supported" is not "absent": an interval that contains
0 but excludes the reference size bounds the effect, one that contains both says nothing.

The two directions of a split share its two base nets, so they are not independent units: the
interval takes the split as the cluster (`cluster`). Studies that share their base nets are
compared paired on the run identity, others with Welch's interval (`pairing`, `difference`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.conditions import ANB, ANB_PLUS, BASE, BNB, BNB_PLUS, RANDOM

ALPHA = 0.05  # two-sided: 95% intervals
MIN_UNITS = 3  # fewer independent values than this: no interval (n = 2 gives mean ± 12.7 se)
TOO_SMALL = 'n too small for an interval'
SUPPORTED, CONTRADICTED, BOUNDED, INCONCLUSIVE = ('supported', 'contradicted', 'bounded',
                                                  'inconclusive')
CONSISTENT, INCONSISTENT = 'consistent', 'inconsistent'

# What the 2022 seminar reported (PyTorch, CIFAR-10 random halves, the final net, 10 epochs).
SEMINAR_BASELINE = 0.689
SEMINAR_EPOCHS = 10

RULE = (
    'Each claim is a contrast between two conditions (e.g. BnB − base), paired within each run\'s '
    'split, target half and seed, with a predicted sign and a reference size: the paper\'s own '
    'effect for that claim. The two directions of a split share its two base nets, so the split '
    'is the cluster: its directions and seeds are averaged into one value, and the 95% interval '
    'is Student t over splits (df = splits − 1); a study of one split falls back to its '
    '(direction, seed) units and says so, and fewer than 3 values give no interval ("n too '
    'small for an interval"). Where a claim spans depths, its per-depth intervals are '
    'Holm-adjusted: the depths are ranked by their t statistic (largest |t| first) and the k-th '
    'of m gets the t quantile at level 0.05/(m − k + 1), until the first interval that contains '
    '0; the depths after it keep that level. Verdict: **supported** if the interval excludes 0 '
    'on the predicted side; **contradicted** if it excludes 0 on the other side; **bounded** if '
    'it contains 0 but excludes the reference size: the effect, if any, is smaller than X '
    'points, X the interval\'s bound on the predicted side; **inconclusive** if it contains both '
    '0 and the reference size. A supported effect whose interval lies wholly short of the '
    'reference size says so. A single net (the seminar\'s base net) is set against the '
    'prediction interval for one more of our base nets, mean ± t·s·√(1 + 1/n) over the n nets: '
    '**consistent** inside it, **inconsistent** outside.')

Unit = tuple  # (split, target, seed): one base net and every net built on it


@dataclasses.dataclass(frozen=True)
class Claim:
  """A contrast `a` − `b` (`b` may be the base net) and what the paper predicts of it."""
  name: str
  a: str
  b: str
  direction: int  # +1: a above b; -1: a below b
  reference: float  # the paper's effect size, as accuracy (0.01 = 1 point), always > 0
  seminar: str = ''  # the seminar's verdict on it, where it gave one


# Reference sizes. The paper (Yosinski et al. 2014, AlexNet on two 500-class ImageNet halves)
# states its fine-tuning boost in numbers (its Table 1); its other effects are read off its
# figures, which give no table, so those claims take 1 point: no more than the smallest of the
# effects its figures draw, so "bounded" means that even a 1-point effect is excluded.

# Fig. 2: AnB falls below BnB from layer 3 on, by about a point there and by several points at
# layers 6-7 (read off the figure).
SPECIFICITY = Claim('Representation specificity: AnB below BnB', ANB.name, BNB.name, direction=-1,
                    reference=0.01, seminar='supported (✓)')
# Fig. 2: BnB dips below baseB at layers 3-5, by one to a few points (read off the figure), and
# recovers at layers 6-7.
CO_ADAPTATION = Claim('Fragile co-adaptation: BnB below base at middle depths', BNB.name, BASE.name,
                      direction=-1, reference=0.01, seminar='not supported (✗)')
# Table 1: mean boost of AnB+ over the selffer BnB+ across layers 1-7, 1.4%. BnB+ is the paper's
# control: it trains as long after the graft as AnB+ does, so only the transfer differs.
FINE_TUNING = Claim('Transfer plus fine-tuning improves generalisation: AnB+ above BnB+',
                    ANB_PLUS.name, BNB_PLUS.name, direction=+1, reference=0.014,
                    seminar='not supported (✗)')
# Table 1: mean boost of AnB+ over baseB across layers 1-7, 1.6%. Shown, but confounded: AnB+
# trains its epochs on top of layers a base net already trained for its own.
FINE_TUNING_VS_BASE = Claim(
    'AnB+ above base (confounded by extra training: its grafted layers train twice as long)',
    ANB_PLUS.name, BASE.name, direction=+1, reference=0.016)
# Fig. 3: random frozen layers lose points from layer 1 on and fall near chance from layer 3.
RANDOM_LAYERS = Claim('Control: random frozen layers fall below base', RANDOM.name, BASE.name,
                      direction=-1, reference=0.01)
# Fig. 3: transferred features, even from the dissimilar half, beat random ones at every layer.
TRANSFER_BEATS_RANDOM = Claim('Control: trained layers beat random ones', ANB.name, RANDOM.name,
                              direction=+1, reference=0.01)


@dataclasses.dataclass(frozen=True)
class Interval:
  """An estimate with its 95% (or Holm-adjusted) interval over `n` independent values; lo and hi
  are nan when n < MIN_UNITS."""
  estimate: float
  lo: float
  hi: float
  n: int
  family: int = 1  # the Holm family it was adjusted in (1: unadjusted)

  @property
  def half(self) -> float:
    return (self.hi - self.lo) / 2

  @property
  def ok(self) -> bool:
    return self.n >= MIN_UNITS and not math.isnan(self.lo)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One row of the claims table."""
  claim: str
  contrast: str
  interval: Interval
  word: str  # SUPPORTED, ..., CONSISTENT, INCONSISTENT or TOO_SMALL
  text: str  # the verdict cell
  kind: str = 'confidence'  # or 'prediction'
  of: str = ''  # the name of the claim it tests (`claim` is blank on a family's later rows)
  depth: int | None = None  # the one depth it tests (None: a mean over depths, or none)


# ---- units and clusters

unit = rows_lib.unit_key  # (split, target, seed)


def differences(rows: Sequence[dict], a: str, b: str, depths: Sequence[int]) -> dict[Unit, float]:
  """`a` − `b` per unit, averaged over `depths` within the unit (those it has both at): one
  value per base net. `b` = base pairs every depth with the unit's base net."""
  acc = {(r['condition'], r['depth'], unit(r)): r['test_accuracy'] for r in rows}
  out = {}
  for u in sorted({unit(r) for r in rows}):
    diffs = [
        acc[(a, d, u)] - acc[(b, 0 if b == BASE.name else d, u)]
        for d in depths
        if (a, d, u) in acc and (b, 0 if b == BASE.name else d, u) in acc
    ]
    if diffs:
      out[u] = float(np.mean(diffs))
  return out


def base_accuracies(rows: Sequence[dict]) -> dict[Unit, float]:
  return {unit(r): r['test_accuracy'] for r in rows if r['condition'] == BASE.name}


def cluster(values: Mapping[Unit, float], by_split: bool = True) -> list[float]:
  """The independent values: one per split (the mean of its units) when `by_split` and there is
  more than one split, else one per unit."""
  splits = sorted({u[0] for u in values})
  if by_split and len(splits) > 1:
    return [float(np.mean([v for u, v in values.items() if u[0] == s])) for s in splits]
  return [values[u] for u in sorted(values)]


def clustering(rows: Sequence[dict], by_split: bool = True) -> str:
  """One sentence: what the independent values of this study's intervals are."""
  units = sorted({unit(r) for r in rows})
  splits = sorted({u[0] for u in units})
  directions = len({u[1] for u in units})
  seeds = len({u[2] for u in units})
  plural = lambda k, word: f'{k} {word}{"s" if k != 1 else ""}'
  each = f'{plural(directions, "direction")} × {plural(seeds, "seed")}'
  if by_split and len(splits) > 1:
    small = (f' With {len(splits)} splits that is too few for an interval.'
             if len(splits) < MIN_UNITS else '')
    return (f'Clustered by split: {len(splits)} splits, each the mean of its {each}; Student t '
            f'with df = {len(splits) - 1}.{small}')
  where = 'one split' if len(splits) == 1 else 'by request'
  small = (f' {len(units)} units are too few for an interval.' if len(units) < MIN_UNITS else '')
  return (
      f'Not clustered ({where}): the intervals take its {len(units)} (direction, seed) units '
      f'({each}) as independent, which they are not quite: the two directions of a split and '
      f'seed share its two base nets, so the intervals are too narrow by an unknown amount.{small}')


# ---- intervals


@dataclasses.dataclass(frozen=True)
class TTest:
  """A t statistic's parts: an estimate, its standard error and degrees of freedom, over `n`
  independent values (the smaller group's for Welch)."""
  estimate: float
  se: float
  df: float
  n: int

  @property
  def p(self) -> float:
    """Two-sided p value (1 where there is no interval to draw)."""
    if self.n < MIN_UNITS or math.isnan(self.se):
      return 1.0
    if self.se == 0:
      return 1.0 if self.estimate == 0 else 0.0
    return float(2 * stats.t.sf(abs(self.estimate / self.se), self.df))

  def interval(self, alpha: float = ALPHA, family: int = 1) -> Interval:
    if self.n < MIN_UNITS or math.isnan(self.se):
      return Interval(self.estimate, float('nan'), float('nan'), self.n, family)
    half = float(stats.t.ppf(1 - alpha / 2, self.df) * self.se) if self.se else 0.0
    return Interval(self.estimate, self.estimate - half, self.estimate + half, self.n, family)


def one_sample(values: Sequence[float]) -> TTest:
  """Student t on the mean of independent values."""
  x = np.asarray(values, np.float64)
  if x.size < 2:
    return TTest(float(x.mean()) if x.size else float('nan'), float('nan'), 0, int(x.size))
  return TTest(float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)), x.size - 1, int(x.size))


def welch(first: Sequence[float], later: Sequence[float]) -> TTest:
  """mean(later) − mean(first) by Welch: for groups of different nets, whose variances need
  not agree; df by Welch–Satterthwaite."""
  x, y = np.asarray(first, np.float64), np.asarray(later, np.float64)
  estimate = float(y.mean() - x.mean()) if x.size and y.size else float('nan')
  n = int(min(x.size, y.size))
  if n < 2:
    return TTest(estimate, float('nan'), 0, n)
  vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
  if vx + vy == 0:
    return TTest(estimate, 0.0, x.size + y.size - 2, n)
  df = (vx + vy)**2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
  return TTest(estimate, float(np.sqrt(vx + vy)), float(df), n)


def t_interval(values: Sequence[float], alpha: float = ALPHA) -> Interval:
  """Mean and its Student-t interval at level 1 − alpha (nan bounds below MIN_UNITS values)."""
  return one_sample(values).interval(alpha)


def holm(tests: Sequence[TTest], alpha: float = ALPHA) -> list[Interval]:
  """Intervals for a family of tests (a claim's depths), Holm-adjusted: ranked by t (smallest
  p first, the largest |t| where the dfs agree), the k-th of m (from 0) at level alpha / (m − k)
  until the first that contains 0, which fixes the level of the rest. An interval then excludes 0
  exactly when Holm rejects. Tests below MIN_UNITS values get no interval and are not in the
  family."""
  tested = [i for i, t in enumerate(tests) if t.n >= MIN_UNITS and not math.isnan(t.se)]
  order = sorted(tested, key=lambda i: tests[i].p)
  m = len(order)
  out = [t.interval(alpha) for t in tests]  # the untested ones: nan bounds
  level, stopped = alpha, False
  for k, i in enumerate(order):
    if not stopped:
      level = alpha / (m - k)
      stopped = tests[i].p > level
    out[i] = tests[i].interval(level, family=m)
  return out


def prediction_interval(values: Sequence[float], alpha: float = ALPHA) -> Interval:
  """Where one more value would fall: mean ± t·s·√(1 + 1/n). The interval to hold a single net
  against; a mean's confidence interval is √(n + 1) times narrower."""
  x = np.asarray(values, np.float64)
  if x.size < MIN_UNITS:
    return Interval(
        float(x.mean()) if x.size else float('nan'), float('nan'), float('nan'), int(x.size))
  half = float(stats.t.ppf(1 - alpha / 2, x.size - 1) * x.std(ddof=1) * np.sqrt(1 + 1 / x.size))
  mean = float(x.mean())
  return Interval(mean, mean - half, mean + half, int(x.size))


# ---- the rule


def judge(interval: Interval, direction: int, reference: float) -> tuple[str, str]:
  """(verdict word, verdict cell) by the rule in RULE."""
  if not interval.ok:
    return TOO_SMALL, TOO_SMALL
  near, far = sorted((direction * interval.lo, direction * interval.hi))  # predicted side > 0
  if near > 0:
    below = f' (smaller than the paper\'s {100 * reference:.1f} points)' if far < reference else ''
    return SUPPORTED, SUPPORTED + below
  if far < 0:
    return CONTRADICTED, CONTRADICTED
  if far < reference:
    return BOUNDED, f'bounded: any effect is smaller than {100 * far:.1f} points'
  return INCONCLUSIVE, INCONCLUSIVE


def judge_value(interval: Interval, value: float) -> tuple[str, str]:
  """A single value against a prediction interval."""
  if not interval.ok:
    return TOO_SMALL, TOO_SMALL
  inside = interval.lo <= value <= interval.hi
  return (CONSISTENT, f'consistent ({value} inside)') if inside else (
      INCONSISTENT, f'inconsistent ({value} {"below" if value < interval.lo else "above"})')


def _depths(depths: Sequence[int]) -> str:
  return (f'n = {depths[0]}' if len(depths) == 1 else
          f'n = {depths[0]}–{depths[-1]}' if list(depths) == list(range(depths[0], depths[-1] +
                                                                        1)) else 'n = ' +
          ', '.join(map(str, depths)))


def per_depth(rows: Sequence[dict], claim: Claim, depths: Sequence[int],
              by_split: bool = True) -> list[Verdict]:
  """The claim at each depth, Holm-adjusted across `depths`."""
  tests = [one_sample(cluster(differences(rows, claim.a, claim.b, [d]), by_split)) for d in depths]
  out = []
  for i, (d, interval) in enumerate(zip(depths, holm(tests))):
    word, text = judge(interval, claim.direction, claim.reference)
    out.append(
        Verdict(claim.name if i == 0 else '', f'{claim.a} − {claim.b}, n = {d}', interval, word,
                text, of=claim.name, depth=d))
  return out


def pooled(rows: Sequence[dict], claim: Claim, depths: Sequence[int],
           by_split: bool = True) -> Verdict:
  """The claim averaged over `depths` within each unit (then cluster): one test."""
  interval = t_interval(cluster(differences(rows, claim.a, claim.b, depths), by_split))
  word, text = judge(interval, claim.direction, claim.reference)
  return Verdict(claim.name, f'{claim.a} − {claim.b}, mean over {_depths(depths)}', interval, word,
                 text, of=claim.name)


def baseline(rows: Sequence[dict], value: float = SEMINAR_BASELINE) -> Verdict:
  """The seminar's one base net against the prediction interval of ours (each net one unit: the
  interval is for one net, whose spread is that of single nets, not of split means)."""
  interval = prediction_interval([r['test_accuracy'] for r in rows if r['condition'] == BASE.name])
  word, text = judge_value(interval, value)
  return Verdict('Base accuracy: the seminar\'s one base net', f'the seminar\'s {value} vs one net '
                 'of ours', interval, word, text, kind='prediction', of='baseline')


def seminar_protocol(config: Mapping) -> str:
  """'' when the study follows the seminar's protocol (CIFAR-10, random halves of the full
  training set, the final net, 10 epochs), else what differs: its numbers are then no yardstick."""
  wanted = (('dataset', 'cifar10', 'the dataset is {}, not CIFAR-10'),
            ('model', 'final', 'the model is {}, not the final net'),
            ('halves', 'random', 'the halves are {}, not random'),
            ('train_per_class', 0, 'it trains on {} images per class, not the full set'),
            ('epochs', SEMINAR_EPOCHS, 'it trains {} epoch(s), not the seminar\'s 10'))
  defaults = {'halves': 'random', 'train_per_class': 0}  # configs from before these flags
  for key, value, why in wanted:
    got = config.get(key, defaults.get(key))
    if got != value:
      return why.format('not recorded' if got is None else got)
  return ''


def claims(rows: Sequence[dict], config: Mapping | None = None,
           by_split: bool = True) -> list[Verdict]:
  """Every claim the study's conditions can speak to, by the one rule; the seminar's base net
  only when the study follows its protocol (`config`; without one, it is left out)."""
  rows = rows_lib.usable(rows)
  has = lambda c: any(r['condition'] == c for r in rows)
  depths = sorted({r['depth'] for r in rows if r['condition'] != BASE.name})
  out = []
  if config is not None and not seminar_protocol(config) and has(BASE.name):
    out.append(baseline(rows))
  if has(ANB.name) and has(BNB.name):
    out += per_depth(rows, SPECIFICITY, depths, by_split)
  if has(BNB.name):
    bnb = sorted({r['depth'] for r in rows if r['condition'] == BNB.name})
    out += per_depth(rows, CO_ADAPTATION, bnb[1:-1] or bnb, by_split)
  if has(ANB_PLUS.name) and has(BNB_PLUS.name):
    out.append(pooled(rows, FINE_TUNING, depths, by_split))
    out += [
        dataclasses.replace(v, claim='') for v in per_depth(rows, FINE_TUNING, depths, by_split)
    ]
  if has(ANB_PLUS.name):
    out.append(pooled(rows, FINE_TUNING_VS_BASE, depths, by_split))
  if has(RANDOM.name):
    out += per_depth(rows, RANDOM_LAYERS, depths, by_split)
    trained = ANB.name if has(ANB.name) else BNB.name if has(BNB.name) else None
    if trained:
      out += per_depth(rows, dataclasses.replace(TRANSFER_BEATS_RANDOM, a=trained), depths,
                       by_split)
  return out


# ---- rendering


def _signed(x: float) -> str:
  return f'{x:+.3f}'


def interval_cell(interval: Interval, kind: str = 'confidence') -> str:
  if not interval.ok:
    return '—'
  what = (' (prediction, one net)'
          if kind == 'prediction' else f' (Holm ×{interval.family})' if interval.family > 1 else '')
  fmt = (lambda x: f'{x:.3f}') if kind == 'prediction' else _signed
  return f'[{fmt(interval.lo)}, {fmt(interval.hi)}]{what}'


def table(verdicts: Sequence[Verdict]) -> str:
  """claim | contrast | estimate | 95% interval | verdict, one row per test."""
  lines = ['| claim | contrast | estimate | 95% interval | verdict |', '|---|---|---|---|---|']
  for v in verdicts:
    estimate = (f'{v.interval.estimate:.3f} (n={v.interval.n} nets)'
                if v.kind == 'prediction' else f'{_signed(v.interval.estimate)} (n={v.interval.n})')
    lines.append(f'| {v.claim} | {v.contrast} | {estimate} | '
                 f'{interval_cell(v.interval, v.kind)} | {v.text} |')
  return '\n'.join(lines)


# ---- variance components


def variance_components(values: Mapping[Unit, float]) -> list[tuple[str, float, int]]:
  """(level, standard deviation, df) of a value's spread between splits, between directions
  within a split and between seeds within a split × direction: method of moments on the nested
  design (counts averaged harmonically where unbalanced), negative components set to 0; nan where
  a level has no degrees of freedom. Whether one seed per unit can tell a bad draw from an
  effect: a seed spread as large as the effect says it cannot."""
  cells: dict[tuple, list[float]] = {}
  for (split, target, _), v in sorted(values.items()):
    cells.setdefault((split, target), []).append(v)
  seed_ss = sum(float(np.sum((np.asarray(x) - np.mean(x))**2)) for x in cells.values())
  seed_df = sum(len(x) - 1 for x in cells.values())
  by_split: dict[int, list[float]] = {}
  for (split, _), x in cells.items():
    by_split.setdefault(split, []).append(float(np.mean(x)))
  dir_ss = sum(float(np.sum((np.asarray(x) - np.mean(x))**2)) for x in by_split.values())
  dir_df = sum(len(x) - 1 for x in by_split.values())
  split_means = [float(np.mean(x)) for x in by_split.values()]
  split_df = len(split_means) - 1
  nan = float('nan')
  v_seed = seed_ss / seed_df if seed_df else nan
  v_dir = dir_ss / dir_df if dir_df else nan
  v_split = float(np.var(split_means, ddof=1)) if split_df else nan
  seeds = stats.hmean([len(x) for x in cells.values()])
  directions = stats.hmean([len(x) for x in by_split.values()])
  c_seed = v_seed
  c_dir = v_dir - (0 if math.isnan(v_seed) else v_seed / seeds)
  c_split = v_split - (0 if math.isnan(v_dir) else v_dir / directions)
  sd = lambda c: nan if math.isnan(c) else math.sqrt(max(c, 0.0))
  return [('between splits', sd(c_split), split_df),
          ('between directions within a split', sd(c_dir), dir_df),
          ('between seeds within a split × direction', sd(c_seed), seed_df)]


def variance_table(named: Sequence[tuple[str, Mapping[Unit, float]]]) -> str:
  """level | one column per named value: its component's SD in points (df)."""
  comps = [variance_components(values) for _, values in named]
  lines = [
      '| level | ' + ' | '.join(name for name, _ in named) + ' |', '|---' * (len(named) + 1) + '|'
  ]
  for i, (level, _, _) in enumerate(comps[0]):
    cells = ['—' if math.isnan(c[i][1]) else f'{100 * c[i][1]:.2f} (df {c[i][2]})' for c in comps]
    lines.append(f'| {level} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# ---- two studies


def pairing(first: Sequence[dict], later: Sequence[dict]) -> tuple[bool, str]:
  """Whether two studies pair on the run identity, and why: they do when they hold the same
  units with the same base nets (every base net's halves and test accuracy identical), e.g.
  two studies that differ in a flag that leaves base nets alone. Else they share no nets."""
  key = lambda rows: {
      unit(r): (r['classes_A'], r['classes_B'], r['test_accuracy'])
      for r in rows
      if r['condition'] == BASE.name
  }
  a, b = key(first), key(later)
  if set(a) != set(b):
    return False, (f'Welch: the studies do not hold the same (split, target, seed) units '
                   f'({len(a)} and {len(b)} base nets)')
  differ = [u for u in sorted(a) if a[u] != b[u]]
  if differ:
    s, t, seed = differ[0]
    return False, (f'Welch: the studies\' base nets differ ({len(differ)} of {len(a)}, e.g. '
                   f'split {s} target {t} seed {seed}: {a[differ[0]][2]:.4f} vs '
                   f'{b[differ[0]][2]:.4f})')
  return True, (f'paired on (split, target, seed): both studies hold the same {len(a)} base nets '
                '(identical halves and base test accuracies)')


def difference(first: Sequence[dict], later: Sequence[dict], a: str, b: str, depths: Sequence[int],
               paired: bool, by_split: bool = True) -> list[Interval]:
  """(`a` − `b` in `later`) − (`a` − `b` in `first`) at each depth, Holm-adjusted across them:
  paired per unit, then clustered, when `paired`; else Welch between the two studies' clustered
  values."""
  tests = []
  for d in depths:
    x, y = differences(first, a, b, [d]), differences(later, a, b, [d])
    tests.append(
        one_sample(cluster({u: y[u] - x[u] for u in x if u in y}, by_split)
                  ) if paired else welch(cluster(x, by_split), cluster(y, by_split)))
  return holm(tests)
