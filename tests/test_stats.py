"""Statistics of result rows: confidence intervals and paired differences."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxtransfer.analysis import report, stats, verdicts
from jaxtransfer.analysis import rows as rows_lib
from tests.conftest import ROWS


def test_mean_ci_is_student_t():
  mean, half = stats.mean_ci([1.0, 2.0, 3.0])
  assert mean == 2.0
  assert half == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-6)  # t(0.975, 2) s / sqrt(n)
  assert np.isnan(stats.mean_ci([0.5])[1])


def test_welch_is_welchs_interval_and_the_pooled_one_for_equal_groups():
  a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 4.0, 6.0]
  got = verdicts.welch(b, a).interval()  # mean(a) − mean(b)
  mean, half = got.estimate, (got.hi - got.lo) / 2
  assert mean == pytest.approx(-0.5)
  # Welch: se^2 = 1.6667/4 + 6.6667/4, df = 2.0833^2 / (0.4167^2/3 + 1.6667^2/3) = 4.41.
  se = np.sqrt(5 / 12 + 20 / 12)
  df = (25 / 12)**2 / ((5 / 12)**2 / 3 + (20 / 12)**2 / 3)
  assert half == pytest.approx(scipy_stats.t.ppf(0.975, df) * se, rel=1e-9)
  # With equal sizes and variances Welch's df is 2n - 2: the pooled two-sample interval.
  got = verdicts.welch([x + 1 for x in a], a).interval()
  assert (got.estimate, (got.hi - got.lo) / 2) == pytest.approx(
      (-1.0, scipy_stats.t.ppf(0.975, 6) * np.sqrt(2 * 5 / 3 / 4)))
  assert np.isnan(verdicts.welch(a, [0.5]).interval().lo)


def test_paired_differences_remove_the_split_spread():
  diffs = stats.paired_to_base(ROWS, 'BnB', 1)
  assert sorted(np.round(diffs, 6)) == [-0.06] * 3 + [-0.05] * 3
  # Unpaired, the split spread (0.1 per split) would hide the drop; paired, it is clear.
  assert report._sign(diffs) == 'below'
  assert report._sign([r['test_accuracy'] for r in rows_lib.select(ROWS, condition='BnB')
                      ]) == 'above'


def test_pooling_over_depths_counts_each_base_net_once():
  rows = ROWS + [
      dict(r, depth=2, test_accuracy=r['test_accuracy'] + 0.02)
      for r in rows_lib.select(ROWS, condition='BnB')
  ]
  pooled = verdicts.differences(rows, 'BnB', 'base', [1, 2])
  assert len(pooled) == 6  # 3 splits x 2 targets, not x 2 depths
  np.testing.assert_allclose(sorted(pooled.values()), [-0.05] * 3 + [-0.04] * 3, atol=1e-9)
