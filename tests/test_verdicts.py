"""The verdict rule on made-up rows with known effects, every number checked against its formula
(numpy and scipy here, not the module's own helpers): the four verdicts, Holm at the margin,
clustering by split, the prediction interval, paired vs Welch between studies, small n."""

import os

import numpy as np
import pytest
from scipy import stats

from jaxtransfer.analysis import report, verdicts
from jaxtransfer.analysis import rows as rows_lib
from tests.conftest import ROOT, row

# Standardised offsets: mean 0, sample standard deviation 1, for any length.
z = lambda k: (np.arange(k) - (k - 1) / 2) / np.std(np.arange(k), ddof=1)
PROTOCOL = {
    'dataset': 'cifar10', 'model': 'final', 'halves': 'random', 'epochs': 10, 'train_per_class': 0
}


def study(effects, splits=5, seeds=1, base=lambda s, t, seed: 0.7 + 0.02 * s, a='AnB', b='BnB'):
  """Rows with base nets and conditions `a` and `b` at each depth of `effects` (depth ->
  split -> the difference a − b of both directions of that split, seed offsets on top)."""
  rows = []
  for s in range(splits):
    for t in 'AB':
      for seed in range(seeds):
        acc = float(base(s, t, seed))
        rows.append(row(s, t, 'base', 0, acc, seed))
        for d, by_split in effects.items():
          rows.append(row(s, t, b, d, acc - 0.01, seed))
          rows.append(row(s, t, a, d, float(acc - 0.01 + by_split(s, t, seed)), seed))
  return rows


def t_bounds(values, level=0.05):
  x = np.asarray(values)
  half = stats.t.ppf(1 - level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
  return x.mean() - half, x.mean() + half


def test_the_four_verdicts_on_known_effects():
  # Specificity predicts AnB below BnB, reference 1 point; one depth each, so no Holm.
  spread = lambda sd: (lambda s, t, seed: sd * z(5)[s])
  cases = {
      'supported': lambda s, t, seed: -0.05 + spread(0.005)(s, t, seed),
      'contradicted': lambda s, t, seed: +0.05 + spread(0.005)(s, t, seed),
      'bounded': lambda s, t, seed: 0.001 + spread(0.002)(s, t, seed),
      'inconclusive': lambda s, t, seed: spread(0.03)(s, t, seed),
  }
  for word, effect in cases.items():
    (found,) = verdicts.per_depth(study({3: effect}), verdicts.SPECIFICITY, [3])
    per_split = [effect(s, 'A', 0) for s in range(5)]
    lo, hi = t_bounds(per_split)
    assert (found.interval.lo, found.interval.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert found.word == word, (word, lo, hi)
    assert found.interval.n == 5 and found.contrast == 'AnB − BnB, n = 3'
  # Bounded: X is the bound on the predicted (negative) side, in points.
  (found,) = verdicts.per_depth(study({3: cases['bounded']}), verdicts.SPECIFICITY, [3])
  lo, _ = t_bounds([cases['bounded'](s, 'A', 0) for s in range(5)])
  assert lo < 0 and found.text == f'bounded: any effect is smaller than {-100 * lo:.1f} points'
  # The same interval under a claim predicting the other sign: its far bound is `hi`.
  iv = verdicts.Interval(0.002, -0.004, 0.008, 5)
  assert verdicts.judge(iv, +1, 0.01) == ('bounded', 'bounded: any effect is smaller than 0.8 '
                                          'points')
  assert verdicts.judge(iv, +1, 0.005)[0] == 'inconclusive'
  assert verdicts.judge(verdicts.Interval(0.005, 0.001, 0.009, 5), +1,
                        0.014)[1] == ("supported (smaller than the paper's 1.4 points)")


def test_holm_turns_a_margin_verdict():
  # Two depths whose t statistics give p = 0.03 each: significant alone (0.03 < 0.05), not after
  # Holm (the smaller p must beat 0.05 / 2 = 0.025 before anything is rejected).
  n, p = 5, 0.03
  t = stats.t.ppf(1 - p / 2, n - 1)
  values = 0.01 + 0.01 * np.sqrt(n) / t * z(n)  # mean 0.01, se 0.01 / t
  assert stats.ttest_1samp(values, 0).pvalue == pytest.approx(p)
  alone = verdicts.t_interval(values)
  assert alone.lo > 0
  assert verdicts.judge(alone, +1, 0.015)[0] == 'supported'
  family = verdicts.holm([verdicts.one_sample(values), verdicts.one_sample(values + 1e-4)])
  for iv, x in zip(family, (values, values + 1e-4)):
    assert iv.family == 2 and iv.lo < 0 < iv.hi
    assert (iv.lo, iv.hi) == pytest.approx(t_bounds(x, 0.05 / 2))  # the first's level, kept
    assert verdicts.judge(iv, +1, 0.015)[0] == 'inconclusive'
  # Step-down: once the strongest depth is rejected at 0.025, the next is tested at 0.05.
  strong = 0.05 + 0.001 * z(n)
  family = verdicts.holm([verdicts.one_sample(values), verdicts.one_sample(strong)])
  assert (family[1].lo, family[1].hi) == pytest.approx(t_bounds(strong, 0.05 / 2))
  assert (family[0].lo, family[0].hi) == pytest.approx(t_bounds(values, 0.05))
  assert family[0].lo > 0 and family[1].lo > 0
  # Through the rows: the same two depths of a claim.
  effect = lambda d: (lambda s, tgt, seed: (values if d == 1 else values + 1e-4)[s])
  rows = study({1: effect(1), 2: effect(2)}, a='AnB+', b='BnB+')
  found = verdicts.per_depth(rows, verdicts.FINE_TUNING, [1, 2])
  assert [v.word for v in found] == ['inconclusive', 'inconclusive']
  assert '(Holm ×2)' in verdicts.table(found)


def test_clustering_by_split_when_directions_share_a_base_net_offset():
  # Both directions of a split share an offset (their base nets), plus a small own noise: the
  # split is the unit, df = splits − 1, and the interval is wider than over directions.
  offset = [0.02, -0.015, 0.01, -0.005]
  noise = {'A': 0.001, 'B': -0.001}
  effect = lambda s, t, seed: -0.01 + offset[s] + noise[t] * (1 + s)
  rows = study({2: effect}, splits=4)
  values = verdicts.differences(rows, 'AnB', 'BnB', [2])
  assert len(values) == 8
  per_split = [np.mean([effect(s, t, 0) for t in 'AB']) for s in range(4)]
  per_unit = [effect(s, t, 0) for s in range(4) for t in 'AB']
  clustered, units = verdicts.t_interval(verdicts.cluster(values)), verdicts.t_interval(
      verdicts.cluster(values, by_split=False))
  assert clustered.n == 4 and units.n == 8
  assert (clustered.lo, clustered.hi) == pytest.approx(t_bounds(per_split), abs=1e-12)
  assert (units.lo, units.hi) == pytest.approx(t_bounds(per_unit), abs=1e-12)
  assert clustered.half > units.half
  assert clustered.half == pytest.approx(stats.t.ppf(0.975, 3) * np.std(per_split, ddof=1) /
                                         2)  # df = 4 splits − 1
  assert 'Clustered by split: 4 splits' in verdicts.clustering(rows)
  assert 'df = 3' in verdicts.clustering(rows)
  # Seeds are averaged into their split too; one split falls back to (direction, seed) units.
  rows = study({2: lambda s, t, seed: -0.01 + 0.002 * seed}, splits=1, seeds=3)
  assert len(verdicts.cluster(verdicts.differences(rows, 'AnB', 'BnB', [2]))) == 6
  assert 'Not clustered (one split)' in verdicts.clustering(rows)
  rows = study({2: lambda s, t, seed: -0.01 + 0.002 * seed + 0.001 * s}, splits=3, seeds=2)
  assert verdicts.cluster(verdicts.differences(rows, 'AnB', 'BnB',
                                               [2])) == pytest.approx([-0.009, -0.008, -0.007])


def test_prediction_interval_for_one_net():
  base = [0.72, 0.86, 0.75, 0.79, 0.81, 0.70, 0.88, 0.77, 0.83, 0.90]
  n, mean, sd = len(base), np.mean(base), np.std(base, ddof=1)
  half = stats.t.ppf(0.975, n - 1) * sd * np.sqrt(1 + 1 / n)
  iv = verdicts.prediction_interval(base)
  assert (iv.estimate, iv.lo, iv.hi) == pytest.approx((mean, mean - half, mean + half))
  # Wider than the mean's interval by sqrt(n + 1): the single net is judged against this one.
  assert iv.half / verdicts.t_interval(base).half == pytest.approx(np.sqrt(n + 1))
  rows = [row(s, t, 'base', 0, base[2 * s + (t == 'B')]) for s in range(5) for t in 'AB']
  found = verdicts.baseline(rows, value=0.689)
  assert found.word == ('consistent' if mean - half <= 0.689 <= mean + half else 'inconsistent')
  assert verdicts.baseline(rows, value=mean + 1.01 * half).word == 'inconsistent'
  assert '(prediction, one net)' in verdicts.table([found])
  # Only where the study follows the seminar's protocol.
  assert verdicts.claims(rows, PROTOCOL)[0].of == 'baseline'
  smoke = dict(PROTOCOL, epochs=1)
  assert not verdicts.claims(rows, smoke)
  assert verdicts.seminar_protocol(smoke) == "it trains 1 epoch(s), not the seminar's 10"
  assert verdicts.seminar_protocol(dict(
      PROTOCOL, halves='dissimilar')) == ('the halves are dissimilar, not random')


def _write(tmp_path, name, rows):
  rows_lib.write(str(tmp_path / name), rows)
  return str(tmp_path / name)


def test_compare_pairs_studies_that_share_their_base_nets_else_welch(tmp_path):
  from experiments import compare
  first = study({1: lambda s, t, seed: -0.02 + 0.004 * z(5)[s] + 0.001 * (t == 'A')})
  # The same base nets, a larger drop with its own spread: paired on the run identity.
  later_effect = lambda s, t, seed: -0.03 + 0.006 * z(5)[s] - 0.002 * (t == 'B')
  later = study({1: later_effect})
  assert verdicts.pairing(first, later)[0]
  text = compare.table([(_write(tmp_path, 'one', first), ''), (_write(tmp_path, 'two',
                                                                      later), 'two')])
  assert 'two − first study (paired, Holm ×1)' in text
  assert 'paired on (split, target, seed): both studies hold the same 10 base nets' in text
  acc = lambda rows, c, s, t: next(r['test_accuracy']
                                   for r in rows
                                   if (r['condition'], r['split'], r['target']) == (c, s, t))
  spec = lambda rows, s, t: acc(rows, 'AnB', s, t) - acc(rows, 'BnB', s, t)
  paired = [np.mean([spec(later, s, t) - spec(first, s, t) for t in 'AB']) for s in range(5)]
  lo, hi = t_bounds(paired)
  assert f'{(lo + hi) / 2:+.3f} ± {(hi - lo) / 2:.3f} (n=5) (below 0)' in text
  # Base nets 0.1 better (other nets): Welch between the two studies' split values.
  other = study({1: later_effect}, base=lambda s, t, seed: 0.8 + 0.02 * s)
  paired_ok, why = verdicts.pairing(first, other)
  assert not paired_ok and why.startswith("Welch: the studies' base nets differ (10 of 10")
  text = compare.table([(_write(tmp_path, 'three', first), ''),
                        (_write(tmp_path, 'four', other), 'other')])
  assert 'other − first study (Welch, Holm ×1)' in text
  x = np.array([np.mean([spec(first, s, t) for t in 'AB']) for s in range(5)])
  y = np.array([np.mean([spec(other, s, t) for t in 'AB']) for s in range(5)])
  vx, vy = x.var(ddof=1) / 5, y.var(ddof=1) / 5
  df = (vx + vy)**2 / (vx**2 / 4 + vy**2 / 4)
  half = stats.t.ppf(0.975, df) * np.sqrt(vx + vy)
  assert f'{y.mean() - x.mean():+.3f} ± {half:.3f} (n=5)' in text
  assert half > (hi - lo) / 2  # unpaired, the split spread stays in
  # Different units (a split missing) do not pair either.
  assert not verdicts.pairing(first, [r for r in later if r['split'] != 4])[0]


def test_small_n_says_so():
  rows = study({2: lambda s, t, seed: -0.02 + 0.01 * s}, splits=2)
  (found,) = verdicts.per_depth(rows, verdicts.SPECIFICITY, [2])
  assert found.interval.n == 2 and found.word == verdicts.TOO_SMALL == 'n too small for an interval'
  assert found.text == 'n too small for an interval'
  assert 'With 2 splits that is too few for an interval.' in verdicts.clustering(rows)
  assert '| -0.015 (n=2) | — | n too small for an interval |' in verdicts.table([found])
  # One split, one seed: two units, no interval either; the report says so rather than ±1.0.
  rows = study({2: lambda s, t, seed: -0.02}, splits=1)
  text = report.render(rows, dict(PROTOCOL, epochs=1))
  assert '2 units are too few for an interval' in text
  assert 'n too small for an interval' in text
  assert "they do not apply to this study: it trains 1 epoch(s), not the seminar's 10" in text
  assert verdicts.RULE in text


def test_report_renders_the_rule_table_and_variance_components():
  effect = lambda s, t, seed: -0.03 + 0.004 * z(5)[s] + 0.002 * seed
  rows = study({1: effect, 2: effect}, seeds=2, base=lambda s, t, seed: 0.7 + 0.02 * s + 0.05 *
               (t == 'B') + 0.003 * seed)
  text = report.render(rows, PROTOCOL)
  assert '| claim | contrast | estimate | 95% interval | verdict |' in text
  assert "| Base accuracy: the seminar's one base net |" in text
  assert 'Its verdicts: Representation specificity: supported (✓); Fragile co-adaptation: not supported (✗).' in text
  # A study of the random control alone judges none of the seminar's claims, and says so.
  control = [r for r in study({1: effect}, a='random') if r['condition'] != 'BnB']
  alone = report.render(control, PROTOCOL)
  assert 'None of the claims it judged is judged here.' in alone and 'Its verdicts' not in alone
  assert '### Where the spread comes from' in text
  # Balanced 5 splits x 2 directions x 2 seeds: mean squares by hand.
  base = np.array([[[0.7 + 0.02 * s + 0.05 * (t == 'B') + 0.003 * seed
                     for seed in range(2)]
                    for t in 'AB']
                   for s in range(5)])
  ms_seed = ((base - base.mean(2, keepdims=True))**2).sum() / (5 * 2 * 1)
  cells = base.mean(2)
  ms_dir = ((cells - cells.mean(1, keepdims=True))**2).sum() / (5 * 1)
  ms_split = cells.mean(1).var(ddof=1)
  expected = [
      np.sqrt(max(ms_split - ms_dir / 2, 0)),
      np.sqrt(max(ms_dir - ms_seed / 2, 0)),
      np.sqrt(ms_seed)
  ]
  comps = verdicts.variance_components(verdicts.base_accuracies(rows))
  assert [c[1] for c in comps] == pytest.approx(expected)
  assert [c[2] for c in comps] == [4, 5, 10]
  assert f'| between splits | {100 * expected[0]:.2f} (df 4) |' in text
  # One seed per unit: no such table.
  assert '### Where the spread comes from' not in report.render(study({1: effect}), PROTOCOL)


def test_the_readme_states_the_rule_the_code_applies():
  """The rule is written once in code and quoted verbatim in the README: they cannot drift."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    assert verdicts.RULE in f.read()
