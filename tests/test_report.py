"""report.md's tables, and experiments/compare.py's side-by-side table."""

import os

import numpy as np
import pytest

from jaxtransfer.analysis import report, stats
from jaxtransfer.analysis import rows as rows_lib
from tests.conftest import ROWS


def test_relative_table_pairs_each_column_with_its_own_base_nets(tmp_path):
  from experiments import compare
  # A second study whose base nets are 0.2 better and whose BnB is 0.2 better: its paired
  # differences must be the same as the first study's, not shifted by the other study's bases.
  better = [dict(r, test_accuracy=r['test_accuracy'] + 0.2) for r in ROWS]
  for name, rows in (('one', ROWS), ('two', better)):
    rows_lib.write(str(tmp_path / name), rows)
  text = compare.table([(str(tmp_path / 'one'), ''), (str(tmp_path / 'two'), 'two')])
  mean, half = stats.mean_ci([-0.05] * 3 + [-0.06] * 3)
  assert f'| 1 | {mean:+.3f} ± {half:.3f} | {mean:+.3f} ± {half:.3f} |' in text
  assert '| n | BnB | BnB (two) |' in text
  assert 'n = 6 paired differences per cell.' in text
  assert 'base nets (two): A 0.900 ± 0.248 (n=3), B 0.900 ± 0.248 (n=3)' in text
  with pytest.raises(FileNotFoundError, match='results.csv'):
    compare.table([(str(tmp_path / 'missing'), '')])


def test_compare_tests_the_specificity_of_a_second_study_against_the_first(tmp_path):
  from experiments import compare
  from scipy import stats as scipy_stats

  # AnB is 0.02 below BnB in the first study and 0.05 below in the second (with some spread):
  # each study's column pairs within it and clusters by split; the two share their base nets
  # (ROWS), so the last column pairs them on the run identity.
  def study(drop, spread):
    anb = [
        dict(r, condition='AnB', test_accuracy=r['test_accuracy'] - drop + spread * (i % 3 - 1))
        for i, r in enumerate(rows_lib.select(ROWS, condition='BnB'))
    ]
    return ROWS + anb

  first, second = study(0.02, 0.001), study(0.05, 0.004)
  rows_lib.write(str(tmp_path / 'one'), first)
  rows_lib.write(str(tmp_path / 'two'), second)
  text = compare.table([(str(tmp_path / 'one'), ''), (str(tmp_path / 'two'), 'two')])
  # Rows s0A, s0B, s1A, ... get spread offsets -1, 0, 1, -1, 0, 1: split means -0.5, 0, 0.5.
  offsets = np.array([-0.5, 0, 0.5])

  def cell(values):
    half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)  # df = 3 splits - 1
    return f'{np.mean(values):+.3f} ± {half:.3f} (n=3)'

  assert '| n | AnB − BnB | AnB − BnB (two) | two − first study (paired, Holm ×1) |' in text
  assert (f'| 1 | {cell(-0.02 + 0.001 * offsets)} | {cell(-0.05 + 0.004 * offsets)} | '
          f'{cell(-0.03 + 0.003 * offsets)} (below 0) |') in text
  assert '- two − first study: paired on (split, target, seed)' in text
  # Without AnB in every study there is nothing to contrast.
  assert 'Specificity' not in compare.table([(str(tmp_path / 'one'), '')])


def test_compare_contrasts_any_two_conditions(tmp_path):
  """`--contrast=random,base`: random − base in each study and the second minus the first, by
  Welch between split values where the two studies hold different base nets."""
  from experiments import compare
  from scipy import stats as scipy_stats

  def study(drop, base_shift):
    base = [
        dict(r, test_accuracy=r['test_accuracy'] + base_shift)
        for r in rows_lib.select(ROWS, condition='base')
    ]
    random = [
        dict(r, condition='random', depth=1, frozen=True,
             test_accuracy=r['test_accuracy'] - drop - 0.01 * r['split'] * (r['target'] == 'A'))
        for r in base
    ]
    return base + random

  rows_lib.write(str(tmp_path / 'one'), study(0.10, 0.0))
  rows_lib.write(str(tmp_path / 'two'), study(0.02, 0.05))
  studies = [(str(tmp_path / 'one'), ''), (str(tmp_path / 'two'), 'two')]
  text = compare.table(studies, ('random', 'base'))
  assert 'random − base, paired within each study and clustered by split' in text
  assert '| n | random − base | random − base (two) | two − first study (Welch, Holm ×1) |' in text
  # Per split (the mean of A and B): -drop - 0.005 * split.
  first, later = [-0.10 - 0.005 * s for s in range(3)], [-0.02 - 0.005 * s for s in range(3)]
  welch = scipy_stats.ttest_ind(later, first, equal_var=False)
  half = welch.confidence_interval().high - 0.08
  assert f'| 1 | {-0.105:+.3f} ± ' in text and f'+0.080 ± {half:.3f} (n=3) (above 0)' in text
  assert "Welch: the studies' base nets differ" in text
  assert 'Specificity' not in text and 'random − base' not in compare.table(studies)
  with pytest.raises(ValueError, match='--contrast=random,random: expected two different'):
    compare.table(studies, ('random', 'random'))


def test_compare_refuses_what_it_cannot_pair(tmp_path, capsys):
  from experiments import compare
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  rows_lib.write(one, ROWS)
  rows_lib.write(two, ROWS)
  for studies, message in (
      ([(one, ''), (one, 'again')], f'{one} is given twice'),
      ([(one, ''), (two, '')], f'{two} and {one} would both label their columns'),
  ):
    with pytest.raises(ValueError, match=message):
      compare.table(studies)
  rows_lib.write(two, [r for r in ROWS if not (r['condition'] == 'base' and r['split'] == 0)])
  with pytest.raises(ValueError, match=f'{two}/results.csv: no base net row for split 0, target '):
    compare.table([(one, ''), (two, 'two')])
  open(os.path.join(two, 'results.csv'), 'w').write('split,depth\n0,x\n')
  with pytest.raises(SystemExit) as exit_:
    compare.main(['compare', one, f'{two}=two'])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (f'error: {two}/results.csv: missing column(s) classes_A, '
                                     'classes_B, source, target, condition, frozen, batchnorm, '
                                     'seed, epochs, test_accuracy, train_accuracy, final_loss, '
                                     'wall_seconds, config_hash\n')


def test_diverged_rows_are_left_out_and_listed():
  rows = ROWS + [dict(ROWS[-1], depth=2, test_accuracy=0.9, final_loss=float('nan'), diverged=True)]
  text = report.render(rows, {'epochs': 1})
  assert '13 trained models (1 diverged, left out)' in text
  assert '## Diverged models (left out)' in text
  assert '- split=2 target=B condition=BnB depth=2 seed=0: final loss nan' in text
  assert report.table(ROWS) in text and '| 2 |' not in text
  # A diverged base net takes its pairs out of the relative tables, without an error.
  pairs = stats.paired_to_base(rows_lib.usable([dict(ROWS[0], diverged=True)] + ROWS[1:]), 'BnB', 1)
  assert len(pairs) == 5
  assert report.render([dict(r, diverged=True) for r in ROWS], {}).count('nothing to tabulate')


def test_learning_curves_say_how_much_test_accuracy_moves_near_the_end():
  from jaxtransfer.analysis import report
  record = lambda run, condition, epoch, test: {
      'run': run, 'condition': condition, 'depth': 0 if condition == 'base' else 1, 'epoch': epoch,
      'train_accuracy': 0.5 + 0.1 * epoch, **({} if test is None else {'test_accuracy': test})
  }
  records = [record('a', 'base', e, t) for e, t in enumerate([.5, .6, .7, .65, .68], 1)]
  records += [record('b', 'BnB', e, t) for e, t in enumerate([.5, .52, .5, .51, .5], 1)]
  records += [record('c', 'BnB', e, None) for e in range(1, 6)]  # trained without the flag
  assert stats.epoch_changes(records) == {
      'base': [pytest.approx([0.1, 0.05, 0.03])], 'BnB': [pytest.approx([0.02, 0.01, 0.01])]
  }
  text = '\n'.join(report.curves(records, ['figures/curves.png']))
  assert '[figures/curves.png](figures/curves.png)' in text
  assert '| base | 0.060 | 0.100 | 1 |' in text and '| BnB | 0.013 | 0.020 | 1 |' in text
  assert 'not recorded' in '\n'.join(report.curves(records[-5:]))
  epochs, means = stats.curves(records, 'train_accuracy')[('BnB', 1)]
  assert epochs == [1, 2, 3, 4, 5] and means == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])


def test_a_sweep_judges_every_claim_at_every_value_by_the_one_rule(tmp_path):
  """sweep.md holds each value's verdicts (`verdicts.claims` of its rows): here the co-adaptation
  dip at the middle depth is 5 points at 10 epochs (supported) and gone at 30 (bounded)."""
  from jaxtransfer.analysis import plots, verdicts
  from tests.conftest import row
  spread = np.array([-2, -1, 0, 1, 2]) * 0.001

  def study(dip):
    rows = []
    for s in range(5):
      for t in 'AB':
        rows.append(row(s, t, 'base', 0, 0.7 + 0.02 * s))
        rows += [
            row(s, t, 'BnB', d, 0.7 + 0.02 * s + dip * (d == 2) + spread[s]) for d in (1, 2, 3)
        ]
    return rows

  by_value = {10: study(-0.05), 30: study(0.0)}
  summary = report.sweep_summary(by_value)
  for value, rows in by_value.items():
    assert summary[value]['claims'] == verdicts.claims(rows)
  assert summary[10]['base'].estimate == pytest.approx(0.74) and summary[10]['base'].n == 5
  text = report.render_sweep(summary, 'epochs', ['figures/sweep_epochs.png'])
  assert '| claim | contrast | epochs = 10 | epochs = 30 |' in text
  dip = next(line for line in text.splitlines() if '| BnB − base, n = 2 |' in line).split(' | ')
  assert dip[2].startswith('-0.050 [-0.052, -0.048] supported'), dip
  assert dip[3].startswith('+0.000 [-0.002, +0.002] bounded'), dip
  assert '| 10 | 0.740 (n=5) |' in text and '![figures/sweep_epochs.png]' in text
  (png, _) = plots.sweep_figure(summary, 'epochs', str(tmp_path / 'sweep'))
  assert os.path.getsize(png) > 1000
