"""Result rows: CSV round trip, confidence intervals, paired differences, atomic writes."""

import os

import numpy as np
import pytest

from jaxtransfer import report, results


def row(split, target, condition, depth, acc, seed=0):
  return {'split': split, 'classes_A': '0 1', 'classes_B': '2 3', 'source': '',
          'target': target, 'condition': condition, 'depth': depth, 'frozen': condition == 'BnB',
          'batchnorm': 'update', 'seed': seed, 'epochs': 1, 'test_accuracy': acc,
          'train_accuracy': 0.5, 'final_loss': 0.25, 'wall_seconds': 1.5, 'config_hash': 'abc'}


ROWS = [row(s, t, 'base', 0, 0.6 + 0.1 * s) for s in range(3) for t in 'AB'] + [
    row(s, t, 'BnB', 1, 0.6 + 0.1 * s - 0.05 - 0.01 * (t == 'A')) for s in range(3)
    for t in 'AB']


def test_mean_ci_is_student_t():
  mean, half = results.mean_ci([1.0, 2.0, 3.0])
  assert mean == 2.0
  assert half == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-6)  # t(0.975, 2) s / sqrt(n)
  assert np.isnan(results.mean_ci([0.5])[1])


def test_paired_differences_remove_the_split_spread():
  diffs = results.paired_to_base(ROWS, 'BnB', 1)
  assert sorted(np.round(diffs, 6)) == [-0.06] * 3 + [-0.05] * 3
  # Unpaired, the split spread (0.1 per split) would hide the drop; paired, it is clear.
  assert report._sign(diffs) == 'below'
  assert report._sign([r['test_accuracy'] for r in results.select(ROWS, condition='BnB')]
                      ) == 'above'


def test_pooling_over_depths_counts_each_base_net_once():
  rows = ROWS + [dict(r, depth=2, test_accuracy=r['test_accuracy'] + 0.02)
                 for r in results.select(ROWS, condition='BnB')]
  pooled = results.pooled_over_depths(rows, 'BnB')
  assert len(pooled) == 6  # 3 splits x 2 targets, not x 2 depths
  np.testing.assert_allclose(sorted(pooled), [-0.05] * 3 + [-0.04] * 3, atol=1e-9)


def test_csv_round_trip_and_atomic_write(tmp_path):
  results.write(str(tmp_path), ROWS)
  back = results.read_csv(str(tmp_path / 'results.csv'))
  assert back == ROWS
  with pytest.raises(ZeroDivisionError):
    with results.atomic_path(str(tmp_path / 'results.csv')) as tmp:
      open(tmp, 'w').write('half')
      1 / 0
  assert results.read_csv(str(tmp_path / 'results.csv')) == ROWS  # the old file survives
  assert sorted(os.listdir(tmp_path)) == ['results.csv', 'results.json']


def test_relative_table_pairs_each_column_with_its_own_base_nets(tmp_path):
  from experiments import compare
  # A second study whose base nets are 0.2 better and whose BnB is 0.2 better: its paired
  # differences must be the same as the first study's, not shifted by the other study's bases.
  better = [dict(r, test_accuracy=r['test_accuracy'] + 0.2) for r in ROWS]
  for name, rows in (('one', ROWS), ('two', better)):
    results.write(str(tmp_path / name), rows)
  text = compare.table([(str(tmp_path / 'one'), ''), (str(tmp_path / 'two'), 'two')])
  mean, half = results.mean_ci([-0.05] * 3 + [-0.06] * 3)
  assert f'| 1 | {mean:+.3f} ± {half:.3f} | {mean:+.3f} ± {half:.3f} |' in text
  assert '| n | BnB | BnB (two) |' in text
  assert 'n = 6 paired differences per cell.' in text
  assert 'base nets (two): A 0.900 ± 0.248 (n=3), B 0.900 ± 0.248 (n=3)' in text
  with pytest.raises(FileNotFoundError, match='results.csv'):
    compare.table([(str(tmp_path / 'missing'), '')])


@pytest.mark.parametrize('splits, runs', [(3, 6), (2, 4), (1, 2)])
def test_figures_draw_ci_bands_only_from_three_runs_per_point(splits, runs):
  import matplotlib.pyplot as plt
  from matplotlib.collections import PolyCollection
  from jaxtransfer import plots
  rows = [r for r in ROWS if r['split'] < splits]  # 2 targets per split: `runs` per point
  for relative in (False, True):
    fig, ax = plt.subplots()
    plots.draw_transfer(ax, rows, relative)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    notes = [t.get_text() for t in ax.texts]
    assert len(bands) == (1 if runs >= 3 else 0)
    assert notes == ([] if runs >= 3 else [f'no CI bands: {runs} run(s) per point'])
    plt.close(fig)
