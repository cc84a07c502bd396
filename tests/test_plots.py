"""Figures: CI bands only where they mean something, and the CKA heat-map."""

import os

import numpy as np
import pytest

from jaxtransfer.analysis import plots
from tests.conftest import ROWS


@pytest.mark.parametrize('splits, runs', [(3, 6), (2, 4), (1, 2)])
def test_figures_draw_ci_bands_only_from_three_runs_per_point(splits, runs):
  import matplotlib.pyplot as plt
  from matplotlib.collections import PolyCollection
  rows = [r for r in ROWS if r['split'] < splits]  # 2 targets per split: `runs` per point
  for relative in (False, True):
    fig, ax = plt.subplots()
    plots.draw_transfer(ax, rows, relative)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    notes = [t.get_text() for t in ax.texts]
    assert len(bands) == (1 if runs >= 3 else 0)
    assert notes == ([] if runs >= 3 else [f'no CI bands: {runs} run(s) per point'])
    plt.close(fig)


def test_heatmap_writes_png_and_pdf(tmp_path):
  m = np.array([[1.0, 0.42, 0.1], [0.42, 1.0, 0.77]])
  stem = str(tmp_path / 'figs' / 'cka')
  paths = plots.heatmap(m, ['a1', 'a2'], ['b1', 'b2', 'b3'], stem, title='t', xlabel='B',
                        ylabel='A')
  assert paths == [stem + '.png', stem + '.pdf']
  for path in paths:
    assert os.path.getsize(path) > 0
  assert sorted(os.listdir(tmp_path / 'figs')) == ['cka.pdf', 'cka.png']  # no temp files left
