r"""Prints finished studies' difference-from-base tables side by side, as one markdown table.

  python -m experiments.compare results/cifar10/seed-1split-update \
      results/cifar10/seed-1split-fixed=fixed

Each argument is a study folder holding results.csv, optionally `=LABEL`; a label is appended to
that study's column names. Each study is paired against its own base nets. When every study has
the two conditions of `--contrast` (default AnB,BnB: specificity), a second table gives their
difference per study, clustered by split, and each later study minus the first: paired on
(split, target, seed) when the two hold the same base nets (e.g. studies that differ only in a
flag the base nets never see), else Welch's 95% interval; the lines under the table say which.

  python -m experiments.compare --contrast=random,base results/cifar10/random_frozen-5split \
      results/cifar10/random_fixed-5split=fixed
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from jaxtransfer import conditions as conditions_lib
from jaxtransfer.analysis import report
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.conditions import ANB, BASE, BNB

SPECIFICITY = (ANB.name, BNB.name)
CONTRAST = flags.DEFINE_list(
    'contrast', list(SPECIFICITY), 'Two conditions A,B: the second table is A − B in each '
    'study and each later study minus the first (B may be base).')


def table(studies: list[tuple[str, str]], contrast: tuple[str, str] = SPECIFICITY) -> str:
  """studies: (folder, label) pairs -> the base accuracies, one relative table and, where every
  study has both conditions of `contrast`, their difference table. Each folder once, each label
  (column suffix) once; each results.csv checked by `rows.read_csv`, and diverged models left
  out."""
  contrast = tuple(contrast)
  names = [c.name for c in conditions_lib.TABLE]
  if len(contrast) != 2 or not set(contrast) <= set(names) or contrast[0] == contrast[1]:
    raise ValueError(f'--contrast={",".join(contrast)}: expected two different conditions A,B '
                     f'of {", ".join(names)}')
  columns, bases, seen, labels, contrasts = [], [], {}, {}, []
  for folder, label in studies:
    real = os.path.realpath(folder)
    if real in seen:
      raise ValueError(f'{folder} is given twice (as {seen[real]})')
    if label in labels:
      raise ValueError(f'{folder} and {labels[label]} would both label their columns '
                       f'{label!r}: give one of them a different =LABEL')
    seen[real], labels[label] = folder, folder
    path = os.path.join(folder, 'results.csv')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such file (is {folder} a finished study?)')
    rows = rows_lib.usable(rows_lib.read_csv(path))
    suffix = f' ({label})' if label else ''
    conditions = report.conditions_in(rows)
    columns += [(c + suffix, rows, c) for c in conditions]
    bases.append(f'- base nets{suffix or f" ({folder})"}: {report.base_by_target(rows)}')
    contrasts.append((label, rows, set(conditions)))
  text = '\n'.join(bases) + '\n\n' + report.relative_table(columns)
  needed = set(contrast) - {BASE.name}
  if len(studies) > 1 and all(needed <= conditions for _, _, conditions in contrasts):
    what = 'Specificity' if contrast == SPECIFICITY else ' − '.join(contrast)
    text += (f'\n\n{what}, paired within each study and clustered by split; each later study '
             'minus the first, paired where the two share their base nets, else Welch:\n\n' +
             report.contrast_table([(label, rows) for label, rows, _ in contrasts], *contrast))
  return text


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('give at least one study folder: FOLDER[=LABEL] ...')
  studies = [tuple(a.partition('=')[::2]) for a in argv[1:]]
  try:
    # app.run parses the flags; called as a function, main takes the default.
    print(table(studies, CONTRAST.value if flags.FLAGS.is_parsed() else CONTRAST.default))
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
