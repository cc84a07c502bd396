"""report.md: the accuracy table with 95% CIs and a verdict on each of the seminar's claims."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxtransfer import conditions
from jaxtransfer.analysis import stats
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.conditions import ANB, ANB_PLUS, BASE, BNB, RANDOM

# What the 2022 seminar reported (PyTorch, CIFAR-10, final net, 10 epochs), for comparison.
SEMINAR_BASELINE = 0.689
SEMINAR_VERDICTS = {
    'Transfer plus fine-tuning': 'not supported (✗)',
    'Performance drops through fragile co-adaptation': 'not supported (✗)',
    'Performance drops through representation specificity': 'supported (✓)',
}


def _fmt(values: Sequence[float]) -> str:
  mean, half = stats.mean_ci(values)
  ci = '' if math.isnan(half) else f' ± {half:.3f}'
  return f'{mean:.3f}{ci} (n={len(values)})'


def _side(mean: float, half: float) -> str:
  """'above' / 'below' zero when the 95% CI (mean ± half) excludes zero, else 'within noise'."""
  return 'above' if mean - half > 0 else 'below' if mean + half < 0 else 'within noise'


def _sign(values: Sequence[float]) -> str:
  mean, half = stats.mean_ci(values)
  if math.isnan(half):
    return 'within noise' if mean == 0 else ('above' if mean > 0 else 'below') + ' (one run, no CI)'
  return _side(mean, half)


def conditions_in(rows: Sequence[dict]) -> list[str]:
  """The non-base conditions that `rows` hold, in the paper's order."""
  return [c.name for c in conditions.TRANSFER if rows_lib.select(rows, condition=c.name)]


def table(rows: Sequence[dict]) -> str:
  depths = sorted({r['depth'] for r in rows if r['condition'] != BASE.name})
  conditions = conditions_in(rows)
  lines = ['| n | ' + ' | '.join(conditions) + ' |', '|---' * (len(conditions) + 1) + '|']
  for d in depths:
    cells = [
        _fmt([r['test_accuracy'] for r in rows_lib.select(rows, condition=c, depth=d)])
        if rows_lib.select(rows, condition=c, depth=d) else '' for c in conditions
    ]
    lines.append(f'| {d} | ' + ' | '.join(cells) + ' |')
  base = [r['test_accuracy'] for r in rows_lib.select(rows, condition=BASE.name)]
  return f'base (n = 0): {_fmt(base)}\n\n' + '\n'.join(lines)


def _interval(mean: float, half: float) -> str:
  return f'{mean:+.3f}' + ('' if math.isnan(half) else f' ± {half:.3f}')


def _diff(values: Sequence[float]) -> str:
  return _interval(*stats.mean_ci(values))


def relative_table(columns: Sequence[tuple[str, Sequence[dict], str]]) -> str:
  """Columns (label, rows, condition) of `condition` − base, paired per (split, target, seed).

  The table to read the claims from: the spread of absolute accuracy between halves and splits
  cancels in the pairing. Each column pairs within its own rows, so columns may come from
  different studies (e.g. two BatchNorm policies) without mixing their base nets."""
  depths = sorted(
      {r['depth'] for _, rows, c in columns for r in rows_lib.select(rows, condition=c)})
  lines = [
      '| n | ' + ' | '.join(label for label, _, _ in columns) + ' |',
      '|---' * (len(columns) + 1) + '|'
  ]
  cells = {(d, i): stats.paired_to_base(rows, c, d) for d in depths
           for i, (_, rows, c) in enumerate(columns)}
  counts = {len(v) for v in cells.values() if v}
  show_n = len(counts) > 1  # else said once, below the table
  for d in depths:
    line = [
        _diff(v) + (f' (n={len(v)})' if show_n else '') if (v := cells[(d, i)]) else ''
        for i in range(len(columns))
    ]
    lines.append(f'| {d} | ' + ' | '.join(line) + ' |')
  if len(counts) == 1:
    lines += ['', f'n = {counts.pop()} paired differences per cell.']
  return '\n'.join(lines)


def contrast_table(studies: Sequence[tuple[str, Sequence[dict]]], cond_a: str = ANB.name,
                   cond_b: str = BNB.name) -> str:
  """`cond_a` − `cond_b` per depth in each study (paired within it), then each later study
  minus the first with Welch's interval: whether one study's effect is larger than another's.

  The default, AnB − BnB, is the paper's specificity: it cancels co-adaptation, which BnB
  shares, so it compares how specific the features of two kinds of halves are."""
  depths = sorted(
      {r['depth'] for _, rows in studies for r in rows_lib.select(rows, condition=cond_a)})
  cells = [[stats.paired(rows, cond_a, cond_b, d) for d in depths] for _, rows in studies]
  labels = [f'{cond_a} − {cond_b}{f" ({label})" if label else ""}' for label, _ in studies]
  first = studies[0][0] or 'first study'
  labels += [
      f'{label or "study " + str(i + 2)} − {first}' for i, (label, _) in enumerate(studies[1:])
  ]
  lines = ['| n | ' + ' | '.join(labels) + ' |', '|---' * (len(labels) + 1) + '|']
  for j, d in enumerate(depths):
    line = [_diff(c[j]) + f' (n={len(c[j])})' if c[j] else '' for c in cells]
    for c in cells[1:]:
      if c[j] and cells[0][j]:
        mean, half = stats.welch_ci(c[j], cells[0][j])
        line.append(f'{_interval(mean, half)} ({_side(mean, half)})')
      else:
        line.append('')
    lines.append(f'| {d} | ' + ' | '.join(line) + ' |')
  return '\n'.join(lines)


def base_by_target(rows: Sequence[dict]) -> str:
  """'A 0.631 (n=1), B 0.770 (n=1)': the halves differ in difficulty, so say each."""
  base = rows_lib.select(rows, condition=BASE.name)
  return ', '.join(f'{t} {_fmt([r["test_accuracy"] for r in rows_lib.select(base, target=t)])}'
                   for t in sorted({r['target'] for r in base}))


def _seminar_baseline(rows: Sequence[dict]) -> str:
  base = [r['test_accuracy'] for r in rows_lib.select(rows, condition=BASE.name)]
  mean, half = stats.mean_ci(base)
  inside = abs(mean - SEMINAR_BASELINE) <= half
  where = ('one base net, no CI' if math.isnan(half) else
           f'the seminar\'s value lies {"inside" if inside else "outside"} our 95% CI')
  return (f'Base accuracy: ours {_fmt(base)}, the seminar\'s {SEMINAR_BASELINE} '
          f'({mean - SEMINAR_BASELINE:+.3f}; {where}).')


def claims(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
  """(claim, verdict, evidence) for the three claims the seminar checked."""
  depths = sorted({r['depth'] for r in rows if r['condition'] != BASE.name})
  out = []
  has = lambda c: bool(rows_lib.select(rows, condition=c))

  if has(ANB_PLUS.name):
    per_depth = {d: stats.paired_to_base(rows, ANB_PLUS.name, d) for d in depths}
    pooled = stats.pooled_over_depths(rows, ANB_PLUS.name)
    sign = _sign(pooled)
    verdict = {'above': 'supported', 'below': 'contradicted'}.get(sign, 'not supported '
                                                                  '(within noise)')
    evidence = (f'AnB+ − base, averaged over n within each split/half/seed: {_fmt(pooled)}; '
                'per n: ' + ', '.join(f'n={d}: {_fmt(v)}' for d, v in per_depth.items()))
    out.append(
        ('Transfer plus fine-tuning improves generalisation (AnB+ above base)', verdict, evidence))

  if has(BNB.name):
    middle = depths[1:-1] or depths
    per_depth = {d: stats.paired_to_base(rows, BNB.name, d) for d in middle}
    below = [d for d, v in per_depth.items() if _sign(v) == 'below']
    verdict = (f'supported (BnB below base at n = {", ".join(map(str, below))})'
               if below else 'not supported (no middle depth where BnB is below base beyond noise)')
    evidence = 'BnB − base at middle depths: ' + ', '.join(
        f'n={d}: {_fmt(v)}' for d, v in per_depth.items())
    out.append(('Performance drops through fragile co-adaptation (BnB below base at middle '
                'depths)', verdict, evidence))

  if has(ANB.name) and has(BNB.name):
    per_depth = {d: stats.paired(rows, ANB.name, BNB.name, d) for d in depths}
    means = [np.mean(v) for v in per_depth.values()]
    slope = float(np.polyfit(depths, means, 1)[0]) if len(depths) > 1 else float('nan')
    below = [d for d, v in per_depth.items() if _sign(v) == 'below']
    falls = len(depths) > 1 and slope < 0
    supported = falls and bool(below) and below[-1] == depths[-1]
    where = f'at n = {", ".join(map(str, below))}' if below else 'at no depth'
    verdict = ('supported' if supported else 'not supported') + (
        f' (AnB below BnB beyond noise {where}; slope of AnB − BnB over n: {slope:+.4f} '
        'per layer)')
    evidence = 'AnB − BnB: ' + ', '.join(f'n={d}: {_fmt(v)}' for d, v in per_depth.items())
    out.append(('Performance drops through representation specificity (AnB falls with depth, '
                'below BnB)', verdict, evidence))

  if has(RANDOM.name):
    trained = ANB.name if has(ANB.name) else BNB.name if has(BNB.name) else None
    per_depth = {d: stats.paired_to_base(rows, RANDOM.name, d) for d in depths}
    below = [d for d, v in per_depth.items() if _sign(v) == 'below']
    verdict = (f'random frozen layers fall below base beyond noise at n = '
               f'{", ".join(map(str, below))}'
               if below else 'random frozen layers are within noise of base at every n')
    evidence = 'random − base: ' + ', '.join(f'n={d}: {_fmt(v)}' for d, v in per_depth.items())
    if trained:
      evidence += f'; {trained} − random: ' + ', '.join(
          f'n={d}: {_fmt(stats.paired(rows, trained, RANDOM.name, d))}' for d in depths)
    out.append(('Control: what trained lower layers are worth (random frozen layers, the '
                "paper's Fig. 3)", verdict, evidence))
  return out


def escape(text: str) -> str:
  """`text` (a class name: a folder's name, anything) as literal Markdown text, also inside a
  table cell: HTML, pipes and backslashes escaped, line breaks as spaces."""
  text = text.replace('\\', '\\\\').replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
  return ' '.join(text.replace('|', '\\|').splitlines())


def _halves(rows: Sequence[dict], class_names: Sequence[str] | None) -> list[str]:
  name = lambda ids: ', '.join(
      escape(class_names[int(i)]) if class_names else i for i in ids.split())
  seen = {}
  for r in rows:
    seen.setdefault(r['split'], (r['classes_A'], r['classes_B']))
  return [f'- split {s}: A = {name(a)}; B = {name(b)}' for s, (a, b) in sorted(seen.items())]


def curves(records: Sequence[dict], figures: Sequence[str] = (), last: int = 3) -> list[str]:
  """The learning-curves section, from metrics.jsonl records: the figure, and how much test
  accuracy moves from one epoch to the next near the end, per condition."""
  figure = next((f for f in figures if f.endswith('curves.png')), None)
  lines = ['## Learning curves', '']
  if figure:
    lines += [
        f'[{figure}]({figure}): train (solid) and, where recorded, test (dashed) accuracy '
        'per epoch, the mean over the models of each condition and depth.', ''
    ]
  changes = stats.epoch_changes(records, last)
  if not changes:
    lines += [
        'Test accuracy per epoch was not recorded for every epoch of any model (run with '
        '`--eval_every_epoch` to record it), or the models trained one epoch only.', ''
    ]
    return lines
  lines += [
      'How much test accuracy moves from one epoch to the next near the end: |Δ| over each '
      f'model\'s last {last} epoch-to-epoch changes (fewer if it trained fewer epochs). With no '
      'learning-rate decay, a final accuracy is one draw from this wobble.', '',
      '| condition | mean \\|Δ\\| | max \\|Δ\\| | models |', '|---|---|---|---|'
  ]
  for c in conditions.TABLE:
    if c.name in changes:
      flat = [d for model in changes[c.name] for d in model]
      lines.append(f'| {c.name} | {np.mean(flat):.3f} | {np.max(flat):.3f} | '
                   f'{len(changes[c.name])} |')
  return lines + ['']


def at_chance(row: dict) -> bool:
  """Test accuracy at or below 1/k for the k classes of the run's target half: a model that
  learned nothing (kept in the tables: it may be the honest result of its condition)."""
  k = len(row['classes_A' if row['target'] == 'A' else 'classes_B'].split())
  return row['test_accuracy'] <= 1 / k


def _listing(rows: Sequence[dict], detail, limit: int = 10) -> list[str]:
  lines = [f'- {rows_lib.describe(rows_lib.run_id(r))}: {detail(r)}' for r in rows[:limit]]
  return lines + ([f'- ... and {len(rows) - limit} more'] if len(rows) > limit else [])


def flagged(rows: Sequence[dict]) -> list[str]:
  """The sections on models that are not results as they stand: diverged ones (left out of
  everything else) and ones at chance (kept, but named)."""
  parts = []
  diverged = [r for r in rows if r['diverged']]
  if diverged:
    parts += [
        '## Diverged models (left out)', '',
        f'{len(diverged)} of {len(rows)} models diverged (non-finite training loss or weights): '
        'their accuracy is no result, so every table, figure and claim of this report leaves '
        'them out, and no difference is taken against a diverged base net.', '', *_listing(
            diverged, lambda r: f'final loss {r["final_loss"]}, test accuracy '
            f'{r["test_accuracy"]:.3f}'), ''
    ]
  chance = [r for r in rows_lib.usable(rows) if at_chance(r)]
  if chance:
    parts += [
        '## Models at chance', '',
        f'{len(chance)} of {len(rows)} models are at or below chance (test accuracy ≤ 1/k for '
        'the k classes of their target half); they are kept in the tables.', '',
        *_listing(chance, lambda r: f'test accuracy {r["test_accuracy"]:.3f}'), ''
    ]
  return parts


def render(rows: Sequence[dict], config: dict, figures: Sequence[str] = (),
           class_names: Sequence[str] | None = None, note: str = '',
           metrics: Sequence[dict] = ()) -> str:
  """The whole report.md; `note`, if given, is a paragraph under the title; `metrics` (the
  per-epoch records of metrics.jsonl) add the learning-curves section. Diverged models are
  listed, and left out of everything else (`rows.usable`)."""
  everything, rows = rows, rows_lib.usable(rows)
  left_out = f' ({len(everything) - len(rows)} diverged, left out)' if len(rows) < len(
      everything) else ''
  seeds = len({r['seed'] for r in everything})
  splits = len({r['split'] for r in everything})
  targets = sorted({r['target'] for r in everything})
  parts = [
      '# Transferability study report', '', *([note, ''] if note else []),
      f'{len(everything)} trained models{left_out}: {splits} split(s), target halves '
      f'{", ".join(targets)}, {seeds} seed(s), {config.get("epochs")} epochs, model '
      f'`{config.get("model")}`, frozen BatchNorm policy `{config.get("frozen_batchnorm")}`, '
      f'config hash `{everything[0]["config_hash"] if everything else ""}`.', '',
      *_halves(everything, class_names), '', *flagged(everything)
  ]
  if not rows:
    parts += ['No model ended with finite loss and weights: there is nothing to tabulate.', '']
  else:
    parts += [
        '## Test accuracy: mean ± 95% CI over splits × directions × seeds', '',
        table(rows), '', f'Base nets by target half: {base_by_target(rows)}.', '',
        '## Difference from the base net of the same target', '',
        'Each cell: mean ± 95% CI of (model − base net of the same split, target half and seed).',
        '',
        relative_table([(c, rows, c) for c in conditions_in(rows)
                       ]), '', '## The seminar\'s claims', '',
        'A difference counts only when its 95% confidence interval (Student t, paired on split, '
        'target half and seed) excludes zero; otherwise it is reported as within noise.', ''
    ]
    seminar = config.get('dataset') == 'cifar10' and config.get('model') == 'final'
    if seminar:
      parts += [
          f'The seminar (PyTorch, same net, 10 epochs) reported a base accuracy of '
          f'{SEMINAR_BASELINE} and the verdicts quoted after each claim.', '',
          _seminar_baseline(rows), ''
      ]
    for claim, verdict, evidence in claims(rows):
      quoted = next((v for k, v in SEMINAR_VERDICTS.items() if claim.startswith(k)), None)
      parts += [f'- **{claim}**: {verdict}.  ', f'  {evidence}  ']
      if seminar and quoted:
        parts.append(f'  Seminar: {quoted}.')
      parts.append('')
  if metrics:
    parts += curves(metrics, figures)
  if figures:
    parts += ['## Figures', ''] + [f'![{f}]({f})' for f in figures if f.endswith('.png')] + ['']
  parts += [
      '## Configuration', '', '```', *(f'{k} = {v}' for k, v in sorted(config.items())), '```', ''
  ]
  return '\n'.join(parts)


def _dip(rows: Sequence[dict]) -> tuple[int, list[float]]:
  """The middle depth where BnB falls furthest below base, and its paired differences."""
  depths = sorted({r['depth'] for r in rows_lib.select(rows, condition=BNB.name)})
  middle = depths[1:-1] or depths
  per_depth = {d: stats.paired_to_base(rows, BNB.name, d) for d in middle}
  depth = min(per_depth, key=lambda d: np.mean(per_depth[d]))
  return depth, per_depth[depth]


def sweep_summary(rows_by_value: dict) -> dict:
  """Per swept value: base accuracy, the BnB co-adaptation dip and the AnB+ fine-tuning gain,
  each as (mean, CI half-width)."""
  out = {}
  for value, rows in rows_by_value.items():
    rows = rows_lib.usable(rows)
    entry = {
        'base': stats.mean_ci(
            [r['test_accuracy'] for r in rows_lib.select(rows, condition=BASE.name)])
    }
    if rows_lib.select(rows, condition=BNB.name):
      depth, dip = _dip(rows)
      entry['dip'], entry['dip_depth'] = stats.mean_ci(dip), depth
    if rows_lib.select(rows, condition=ANB_PLUS.name):
      entry['gain'] = stats.mean_ci(stats.pooled_over_depths(rows, ANB_PLUS.name))
    out[value] = entry
  return out


def render_sweep(summary: dict, param: str, figures: Sequence[str] = ()) -> str:
  lines = [
      f'# Sweep over {param}', '',
      'base: mean test accuracy of the base nets; dip: BnB − base at the middle depth '
      'where it is lowest (fragile co-adaptation); gain: AnB+ − base averaged over depths '
      '(fine-tuning benefit). Mean ± 95% CI.', '', f'| {param} | base | dip (depth) | gain |',
      '|---|---|---|---|'
  ]
  for value, e in summary.items():
    dip = f'{_interval(*e["dip"])} (n={e["dip_depth"]})' if 'dip' in e else ''
    lines.append(f'| {value} | {e["base"][0]:.3f} | {dip} | '
                 f'{_interval(*e["gain"]) if "gain" in e else ""} |')
  lines.append('')
  for key, label in (('dip', 'co-adaptation dip'), ('gain', 'fine-tuning gain')):
    vals = [(v, e[key]) for v, e in summary.items() if key in e]
    if len(vals) > 1:
      signs = [_sign_of(mc) for _, mc in vals]
      lines.append(f'- {label} along {param}: ' + ', '.join(
          f'{v}: {_interval(*mc)} ({sign})' for (v, mc), sign in zip(vals, signs)))
  lines += [''] + [f'![{f}]({f})' for f in figures if f.endswith('.png')] + ['']
  return '\n'.join(lines)


def _sign_of(mean_ci: tuple[float, float]) -> str:
  side = 'one run' if math.isnan(mean_ci[1]) else _side(*mean_ci)
  return side + ' 0' if side in ('above', 'below') else side
