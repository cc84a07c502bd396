r"""Pools finished shards of one study (run with --splits, e.g. on different machines) into one
set of results, figures and report.

  python -m experiments.main --flagfile=... --num_splits=5 --splits=0,1 --workdir=/w/s01
  python -m experiments.main --flagfile=... --num_splits=5 --splits=2,3,4 --workdir=/w/s234
  python -m experiments.pool --out=/w/all /w/s01 /w/s234

Shards must share every flag except --num_splits and --splits, and hold disjoint splits. Shards
of a sweep pool value by value into --out/<param>-<value>/, with the sweep's sweep.md in --out.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jaxtransfer.study import campaigns

flags.DEFINE_string(
    'out', None, 'Directory for the pooled results.csv/json, figures and '
    'report.md (not a study workdir).')
flags.mark_flag_as_required('out')
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  try:
    path = campaigns.pool(argv[1:], FLAGS.out)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(path)


if __name__ == '__main__':
  app.run(main)
