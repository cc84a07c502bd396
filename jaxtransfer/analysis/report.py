"""report.md: the accuracy table with 95% CIs and a verdict on each of the seminar's claims."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxtransfer import conditions
from jaxtransfer.analysis import stats, verdicts
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.conditions import ANB, BASE, BNB

SEMINAR_BASELINE = verdicts.SEMINAR_BASELINE  # the seminar's one base net (CIFAR-10, 10 epochs)


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


def _cell(interval: verdicts.Interval) -> str:
  if not interval.n:
    return ''
  if not interval.ok:
    return f'{interval.estimate:+.3f} (n={interval.n}: {verdicts.TOO_SMALL})'
  return f'{_interval(interval.estimate, interval.half)} (n={interval.n})'


def contrast_table(studies: Sequence[tuple[str, Sequence[dict]]], cond_a: str = ANB.name,
                   cond_b: str = BNB.name) -> str:
  """`cond_a` − `cond_b` per depth in each study (paired within it, clustered by split), then
  each later study minus the first: paired on the run identity where the two hold the same base
  nets (`verdicts.pairing`), else Welch's interval; the lines under the table say which.

  The default, AnB − BnB, is the paper's specificity: it cancels co-adaptation, which BnB
  shares, so it compares how specific the features of two kinds of halves are."""
  depths = sorted(
      {r['depth'] for _, rows in studies for r in rows_lib.select(rows, condition=cond_a)})
  first_rows = studies[0][1]
  pairs = [verdicts.pairing(first_rows, rows) for _, rows in studies[1:]]
  within = lambda rows, d: verdicts.t_interval(
      verdicts.cluster(verdicts.differences(rows, cond_a, cond_b, [d])))
  cells = [[within(rows, d) for d in depths] for _, rows in studies]
  labels = [f'{cond_a} − {cond_b}{f" ({label})" if label else ""}' for label, _ in studies]
  names = [
      label or ('first study' if i == 0 else f'study {i + 1}')
      for i, (label, _) in enumerate(studies)
  ]
  methods = [f'{"paired" if paired else "Welch"}, Holm ×{len(depths)}' for paired, _ in pairs]
  labels += [f'{name} − {names[0]} ({how})' for name, how in zip(names[1:], methods)]
  lines = ['| n | ' + ' | '.join(labels) + ' |', '|---' * (len(labels) + 1) + '|']
  diffs = [
      verdicts.difference(first_rows, rows, cond_a, cond_b, depths, paired)
      for (_, rows), (paired, _) in zip(studies[1:], pairs)
  ]
  for j, d in enumerate(depths):
    line = [_cell(c[j]) for c in cells]
    for diff in (c[j] for c in diffs):
      side = {'above': 'above 0', 'below': 'below 0'}.get(_side(diff.estimate, diff.half),
                                                          'contains 0')
      line.append(f'{_cell(diff)} ({side})' if diff.ok else _cell(diff))
    lines.append(f'| {d} | ' + ' | '.join(line) + ' |')
  lines.append('')
  lines += [f'- {name} − {names[0]}: {why}.' for name, (_, why) in zip(names[1:], pairs)]
  lines += [f'- {name}: {verdicts.clustering(rows)}' for name, (_, rows) in zip(names, studies)]
  return '\n'.join(lines)


def base_by_target(rows: Sequence[dict]) -> str:
  """'A 0.631 (n=1), B 0.770 (n=1)': the halves differ in difficulty, so say each."""
  base = rows_lib.select(rows, condition=BASE.name)
  return ', '.join(f'{t} {_fmt([r["test_accuracy"] for r in rows_lib.select(base, target=t)])}'
                   for t in sorted({r['target'] for r in base}))


def _seminar(found: Sequence[verdicts.Verdict], config: dict) -> list[str]:
  """What the seminar said, where the study follows its protocol; else a plain statement that
  its numbers do not apply."""
  why = verdicts.seminar_protocol(config)
  if why:
    return [
        f'The seminar\'s numbers (a base accuracy of {SEMINAR_BASELINE} and its verdicts) come '
        f'from CIFAR-10 random halves, the final net and {verdicts.SEMINAR_EPOCHS} epochs on the '
        f'full training set; they do not apply to this study: {why}.', ''
    ]
  judged = {v.of for v in found}
  said = [(c.name.split(':')[0], c.seminar)
          for c in (verdicts.SPECIFICITY, verdicts.CO_ADAPTATION, verdicts.FINE_TUNING)
          if c.seminar and c.name in judged]
  theirs = (' Its verdicts: ' + '; '.join(f'{name}: {verdict}' for name, verdict in said) +
            '.') if said else ' None of the claims it judged is judged here.'
  return [
      f'The seminar (PyTorch, the same net and protocol) trained one base net, at '
      f'{SEMINAR_BASELINE}: the first row sets it against the prediction interval for one of '
      'our base nets, not the interval of their mean.' + theirs, ''
  ]


def claims(rows: Sequence[dict], config: dict) -> list[str]:
  """The claims section: the rule, what this study's intervals cluster, the table, what the
  seminar said where its protocol applies, and (with several seeds) where the spread comes
  from."""
  found = verdicts.claims(rows, config)
  lines = [verdicts.RULE, '', verdicts.clustering(rows), '', verdicts.table(found), '']
  lines += _seminar(found, config)
  units = {verdicts.unit(r) for r in rows}
  if len(units) > len({u[:2] for u in units}):  # several seeds in a split × direction
    named = [('base accuracy', verdicts.base_accuracies(rows))]
    deepest = max((r['depth'] for r in rows_lib.select(rows, condition=ANB.name)), default=None)
    if deepest is not None and rows_lib.select(rows, condition=BNB.name):
      named.append(
          (f'AnB − BnB at n = {deepest}', verdicts.differences(rows, ANB.name, BNB.name,
                                                               [deepest])))
    lines += [
        '### Where the spread comes from', '',
        'Standard deviation (points) of each level\'s variance component, method of moments on '
        'the nested design (split > direction > seed; negative estimates set to 0): a seed '
        'spread near the size of an effect means one seed per unit cannot tell a bad draw from '
        'the effect.', '',
        verdicts.variance_table(named), ''
    ]
  return lines


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


def _shown(config: dict) -> dict:
  """The configuration as the report shows it: data from an image folder is named so (the
  study's record keeps `dataset`, which then only names the builder it would use otherwise)."""
  if not config.get('data_fingerprint'):
    return config
  return {**config, 'dataset': f'image folder (fingerprint {config["data_fingerprint"]})'}


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
        relative_table([(c, rows, c) for c in conditions_in(rows)]), '', '## The seminar\'s claims',
        '', *claims(rows, config)
    ]
  if metrics:
    parts += curves(metrics, figures)
  if figures:
    parts += ['## Figures', ''] + [f'![{f}]({f})' for f in figures if f.endswith('.png')] + ['']
  parts += [
      '## Configuration', '', '```', *(f'{k} = {v}' for k, v in sorted(_shown(config).items())),
      '```', ''
  ]
  return '\n'.join(parts)


def sweep_summary(rows_by_value: dict) -> dict:
  """Per swept value: the base nets' accuracy (95% interval over splits) and every claim the
  study speaks to, judged by the one rule (`verdicts.claims`), so that a contrast appearing,
  vanishing or changing sign along the sweep is read off the same verdicts as one study's."""
  out = {}
  for value, rows in rows_by_value.items():
    rows = rows_lib.usable(rows)
    base = verdicts.t_interval(verdicts.cluster(verdicts.base_accuracies(rows)))
    out[value] = {
        'base': base, 'claims': verdicts.claims(rows), 'clustering': verdicts.clustering(rows)
    }
  return out


def _claim_cell(v: verdicts.Verdict) -> str:
  """estimate [interval] verdict, as in the claims table (no interval under 3 units)."""
  interval = f' {verdicts.interval_cell(v.interval)}' if v.interval.ok else ''
  return f'{v.interval.estimate:+.3f}{interval} {v.text}'


def render_sweep(summary: dict, param: str, figures: Sequence[str] = ()) -> str:
  """sweep.md: the base accuracy and each claim's contrast at every value of `param`."""
  values = list(summary)
  lines = [
      f'# Sweep over {param}', '',
      f'One study per value of `{param}`; each claim judged at each value by the rule of every '
      "report.md (paired within units, the split as the cluster, Holm across a claim's "
      'depths): supported, contradicted, bounded or inconclusive. '
      f'{summary[values[0]]["clustering"]}', '', '## Base accuracy', '',
      f'| {param} | mean test accuracy | 95% interval |', '|---|---|---|'
  ]
  for value in values:
    base = summary[value]['base']
    lines.append(f'| {value} | {base.estimate:.3f} (n={base.n}) | '
                 f'{verdicts.interval_cell(base).replace("+", "")} |')
  lines += [
      '', '## Claims', '',
      '| claim | contrast | ' + ' | '.join(f'{param} = {v}' for v in values) + ' |',
      '|---|---|' + '---|' * len(values)
  ]
  cells: dict[tuple[str, str], dict] = {}
  for value in values:
    for v in summary[value]['claims']:
      cells.setdefault((v.of, v.contrast), {})[value] = v
  shown = set()
  for (of, contrast), by_value in cells.items():
    name = '' if of in shown else of
    shown.add(of)
    lines.append(f'| {name} | {contrast} | ' +
                 ' | '.join(_claim_cell(by_value[v]) if v in by_value else '' for v in values) +
                 ' |')
  lines += [''] + [f'![{f}]({f})' for f in figures if f.endswith('.png')] + ['']
  return '\n'.join(lines)
