"""Result rows: the CSV round trip, rows from before a column, every column typed, paired units."""

import os
import re

import pytest

from jaxtransfer.analysis import rows as rows_lib
from tests.conftest import ROWS


def test_csv_round_trip(tmp_path):
  rows_lib.write(str(tmp_path), ROWS)
  back = rows_lib.read_csv(str(tmp_path / 'results.csv'))
  assert back == ROWS
  assert rows_lib.read_json(str(tmp_path / 'results.json')) == ROWS
  assert sorted(os.listdir(tmp_path)) == ['results.csv', 'results.json']  # no temporary file


def test_rows_from_before_the_diverged_column_read_back(tmp_path):
  """Published results.csv files have no `diverged` column: it follows from the loss."""
  old = [dict(r) for r in ROWS]
  old[1]['final_loss'] = float('nan')
  text = rows_lib.to_csv(old).replace(',diverged', '').replace(',False\n', '\n')
  (tmp_path / 'results.csv').write_text(text)
  back = rows_lib.read_csv(str(tmp_path / 'results.csv'))
  assert [r['diverged'] for r in back] == [i == 1 for i in range(len(ROWS))]


@pytest.mark.parametrize('change, message', [
    ({'split': True}, 'column split is True, expected int'),
    ({'depth': 1.0}, 'column depth is 1.0, expected int'),
    ({'frozen': 'yes'}, "column frozen is 'yes', expected bool"),
    ({'test_accuracy': None}, 'missing column(s) test_accuracy'),
    ({'target': 'C'}, "unknown run (target 'C'"),
    ({'test_accuracy': 1.5}, 'values out of range in split=0 target=A'),
])
def test_every_column_is_typed(change, message):
  with pytest.raises(rows_lib.RowsError, match=re.escape(f'rows.json row 0: {message}')):
    rows_lib.typed_row(dict(ROWS[0], **change), 'rows.json row 0')
  assert rows_lib.typed_row(dict(ROWS[0], test_accuracy=1), 'x')['test_accuracy'] == 1.0


def test_a_paired_unit_is_split_target_and_seed():
  """Every run of one split, target half and seed pairs with that unit's one base net."""
  base, transfer = ROWS[0], next(r for r in ROWS if r['condition'] != 'base')
  assert rows_lib.unit_key(base) == (base['split'], base['target'], base['seed'])
  assert rows_lib.unit_key(dict(base, condition='AnB', depth=3)) == rows_lib.unit_key(base)
  assert rows_lib.unit_key(dict(base, seed=1)) != rows_lib.unit_key(base)
  assert rows_lib.unit_key(transfer) in {rows_lib.unit_key(r) for r in ROWS if r is not transfer}
