"""Every figure, written as PNG and PDF: accuracy against transferred depth n (the paper's Fig. 2),
the same relative to the base net (Fig. 3, lower panel), learning curves, sweeps and the CKA
heat-map."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from jaxtransfer import conditions, files  # noqa: E402
from jaxtransfer.analysis import stats  # noqa: E402
from jaxtransfer.analysis import rows as rows_lib  # noqa: E402

# Below this many runs per point a Student-t band (1 degree of freedom at 2 runs: mean ± 12.7 sd)
# says nothing and hides the points, so it is left out and the figure says so.
MIN_BAND_RUNS = 3


def save_figure(fig, stem: str) -> list[str]:
  """`stem`.png and `stem`.pdf, each written atomically; closes `fig`. Cropped to the figure's
  tight box (as `bbox_inches='tight'`), laid out once for both files rather than per file."""
  paths = []
  box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams['savefig.pad_inches'])
  for ext in ('png', 'pdf'):
    path = f'{stem}.{ext}'
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=150, bbox_inches=box)
    paths.append(path)
  plt.close(fig)
  return paths


def transfer_figure(rows: Sequence[dict], stem: str, relative: bool = False,
                    title: str = '') -> list[str]:
  """`draw_transfer` on a new figure, written as PNG and PDF."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  draw_transfer(ax, rows, relative, title)
  return save_figure(fig, stem)


def draw_transfer(ax, rows: Sequence[dict], relative: bool = False, title: str = '') -> None:
  """Every run as a point, the mean as a line, the 95% CI as a band (from MIN_BAND_RUNS runs per
  point)."""
  rng = np.random.default_rng(0)  # jitter only, fixed so figures are reproducible
  base = [r['test_accuracy'] for r in rows_lib.select(rows, condition=conditions.BASE.name)]
  if base and not relative:
    ax.scatter(
        np.zeros(len(base)) + rng.uniform(-.08, .08, len(base)), base, s=14, facecolors='white',
        edgecolors='black', zorder=3, label='base (n = 0)')
  if relative:
    ax.axhline(0, color='black', lw=1, label='base')
  shown_conditions = [c for c in conditions.TRANSFER if rows_lib.select(rows, condition=c.name)]
  shown = list(base) if not relative else [0.0]  # y-limits follow the runs, not the CI bands
  bands, fewest = [], np.inf
  for k, cond in enumerate(shown_conditions):
    condition, color, marker = cond.name, cond.color, cond.marker
    depths = sorted({r['depth'] for r in rows_lib.select(rows, condition=condition)})
    means, lows, highs = [], [], []
    for depth in depths:
      values = (stats.paired_to_base(rows, condition, depth) if relative else [
          r['test_accuracy'] for r in rows_lib.select(rows, condition=condition, depth=depth)
      ])
      x = depth + (k - (len(shown_conditions) - 1) / 2) * 0.08
      shown += values
      ax.scatter(
          np.full(len(values), x) + rng.uniform(-.02, .02, len(values)), values, s=10, color=color,
          marker=marker, alpha=.6, zorder=2)
      mean, half = stats.mean_ci(values)
      half = 0.0 if np.isnan(half) else half
      means.append(mean)
      lows.append(mean - half)
      highs.append(mean + half)
      fewest = min(fewest, len(values))
    ax.plot(depths, means, color=color, lw=2, label=cond.label, zorder=4)
    bands.append((depths, lows, highs, color))
  if fewest >= MIN_BAND_RUNS:
    for depths, lows, highs, color in bands:
      ax.fill_between(depths, lows, highs, color=color, alpha=.15, lw=0)
  elif bands:
    ax.text(0.01, 0.01, f'no CI bands: {fewest} run(s) per point', transform=ax.transAxes,
            fontsize=7, color='dimgrey', va='bottom')
  # With few splits the t-based bands can be very wide; keep every run in view instead.
  low, high = min(shown), max(shown)
  pad = 0.1 * (high - low) or 0.01
  ax.set_ylim(low - pad, high + pad)
  ax.set_xticks(range(0, max([r['depth'] for r in rows], default=0) + 1))
  ax.set_xlabel('layer n at which the network is chopped and retrained')
  ax.set_ylabel('test accuracy relative to base' if relative else 'test accuracy')
  if title:
    ax.set_title(title)
  ax.grid(alpha=.3)
  ax.legend(fontsize=8, loc='best')


def write_all(rows: Sequence[dict], directory: str) -> list[str]:
  """figures/transfer.{png,pdf} and figures/transfer_relative.{png,pdf}, of the models that did
  not diverge."""
  rows = rows_lib.usable(rows)
  if not rows:
    return []
  figures = os.path.join(directory, 'figures')
  return (transfer_figure(rows, os.path.join(figures, 'transfer'),
                          title='Test accuracy vs transferred layers (paper Fig. 2)') +
          transfer_figure(rows, os.path.join(figures, 'transfer_relative'), relative=True,
                          title='Relative to base net (paper Fig. 3, lower)'))


def curves_figure(records: Sequence[dict], stem: str) -> list[str]:
  """Learning curves from metrics.jsonl records: accuracy against epoch, one panel per condition,
  one colour per depth n, the mean over its models; train solid, test dashed where recorded."""
  train, test = stats.curves(records, 'train_accuracy'), stats.curves(records, 'test_accuracy')
  shown = [c for c in conditions.TABLE if any(cond == c.name for cond, _ in train)]
  cols = min(3, len(shown))
  rows = -(-len(shown) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), sharex=True, sharey=True,
                           squeeze=False)
  depths = sorted({d for _, d in train})
  colour = lambda d: plt.get_cmap('viridis')(depths.index(d) / max(len(depths) - 1, 1))
  last = max(max(epochs) for epochs, _ in train.values())
  for ax, cond in zip(axes.flat, shown):
    for (name, depth), (epochs, means) in sorted(train.items()):
      if name == cond.name:
        label = 'base' if cond is conditions.BASE else f'n = {depth}'
        # markers: an epoch is a point, so a 1-epoch run still shows every depth
        ax.plot(epochs, means, color=colour(depth), lw=1.5, marker='o', ms=3, label=label)
        if (name, depth) in test:
          ax.plot(*test[(name, depth)], color=colour(depth), lw=1.5, ls='--', marker='s', ms=3,
                  mfc='none')
    ax.set_title(cond.label, fontsize=9)
    ax.grid(alpha=.3)
    ax.legend(fontsize=7, loc='lower right')
  for ax in axes.flat[len(shown):]:
    ax.axis('off')
  for ax in axes[-1]:
    ax.set_xlabel('epoch')
    # whole epochs: every one of a short run (MaxNLocator needs two integers in view to keep to
    # integers, and fills a 1-epoch axis with fractions)
    ax.xaxis.set_major_locator(
        matplotlib.ticker.FixedLocator(range(1, last +
                                             1)) if last <= 10 else matplotlib.ticker.MaxNLocator(
                                                 integer=True))
    ax.set_xlim(0.5, last + 0.5)
  for ax in axes[:, 0]:
    ax.set_ylabel('accuracy')
  kind = 'train (solid) and test (dashed)' if test else 'train'
  single = ' (one epoch: a point per depth)' if last == 1 else ''
  fig.suptitle(f'Learning curves: {kind} accuracy, mean over models{single}', fontsize=10)
  return save_figure(fig, stem)


def sweep_figure(summary: dict, param: str, stem: str) -> list[str]:
  """The claims along a swept flag (`report.sweep_summary`): the base accuracy against the
  value, then per claim its contrast against depth, one line per value, with the intervals its
  verdicts rest on (Holm-adjusted; none where there are fewer than 3 units)."""
  values = list(summary)
  families: dict[str, str] = {}  # claim -> its contrast's conditions, in the order first met
  for value in values:
    for v in summary[value]['claims']:
      if v.depth is not None:
        families.setdefault(v.of, v.contrast.split(',')[0])
  fig, axes = plt.subplots(1 + len(families), 1, figsize=(6, 2.6 * (1 + len(families))),
                           squeeze=False)
  axes = axes[:, 0]
  half = lambda i: [np.nan_to_num(i.estimate - i.lo), np.nan_to_num(i.hi - i.estimate)]
  bases = [summary[v]['base'] for v in values]
  axes[0].errorbar(range(len(values)), [b.estimate for b in bases],
                   yerr=np.array([half(b) for b in bases]).T, marker='o', capsize=3, color='black')
  axes[0].set_xticks(range(len(values)), [str(v) for v in values])
  axes[0].set(xlabel=param, ylabel='base test accuracy', title=f'Along {param}')
  colours = plt.cm.viridis(np.linspace(0, 0.85, len(values)))
  for ax, (claim, contrast) in zip(axes[1:], families.items()):
    for i, (value, colour) in enumerate(zip(values, colours)):
      found = [v for v in summary[value]['claims'] if v.of == claim and v.depth is not None]
      if found:
        offset = (i - (len(values) - 1) / 2) * 0.08  # side by side at each depth
        ax.errorbar([v.depth + offset for v in found], [v.interval.estimate for v in found],
                    yerr=np.array([half(v.interval) for v in found]).T, marker='o', capsize=3,
                    color=colour, label=f'{param} = {value}')
    ax.axhline(0, color='black', lw=1)
    ax.set(ylabel=contrast, xlabel='depth n', title=claim)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=.3)
  fig.tight_layout()
  return save_figure(fig, stem)


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], stem: str,
            title: str, xlabel: str, ylabel: str) -> list[str]:
  """Annotated CKA heat-map on a fixed 0..1 scale (comparable across figures)."""
  matrix = np.asarray(matrix, dtype=np.float64)
  rows, cols = matrix.shape
  fig, ax = plt.subplots(figsize=(1.5 + 0.75 * cols, 1.0 + 0.6 * rows))
  image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap='viridis', aspect='auto')
  fig.colorbar(image, ax=ax, label='linear CKA')
  for i in range(rows):
    for j in range(cols):
      value = matrix[i, j]
      # Dark text on the bright (yellow) end of viridis, white elsewhere.
      color = 'black' if value > 0.6 else 'white'
      ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=8, color=color)
  ax.set_xticks(range(cols), list(col_labels), rotation=45, ha='right')
  ax.set_yticks(range(rows), list(row_labels))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  return save_figure(fig, stem)
