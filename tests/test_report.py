"""report.md's tables, and experiments/compare.py's side-by-side table."""

import pytest

from jaxtransfer import results
from tests.conftest import ROWS


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
