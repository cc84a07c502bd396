r"""Where a study's wall time goes, from its progress log.

  python benchmarks/study_profile.py LOG[=WALL_SECONDS] [...]

Reads the per-stack lines the driver prints when a stack finishes ("[i/n NAME K=k] done in T s:
compile C s, init I s, train R s, evaluate E s, save S s") and the study's first and last lines,
and prints one table per log: seconds and share per phase, summed over stacks, plus what lies
outside the stacks (data loading, figures, layer similarity, report), and the training seconds
per model-epoch by kind of stack.
"""

from __future__ import annotations

import re
import sys

DONE = re.compile(
    r'^\[\d+/\d+ (?P<stack>\S+) K=(?P<k>\d+)[^\]]*\].* done in (?P<total>[\d.]+) s: (?P<phases>.*)$'
)
PHASE = re.compile(r'(\w+) ([\d.]+) s')
EPOCH = re.compile(r' epoch \d+/(?P<epochs>\d+):')


def phases(lines: list[str]) -> tuple[dict[str, float], int]:
  """Seconds by phase summed over the finished stacks of a progress log, and their number."""
  totals, stacks = {}, 0
  for line in lines:
    m = DONE.match(line.strip())
    if m:
      stacks += 1
      for name, seconds in PHASE.findall(m['phases']):
        totals[name] = totals.get(name, 0.0) + float(seconds)
  return totals, stacks


def profile(lines: list[str], wall: float | None = None) -> str:
  totals, _ = phases(lines)
  per_kind: dict[str, list[float]] = {}
  epochs = None
  for line in lines:
    if (m := EPOCH.search(line)) and epochs is None:
      epochs = int(m['epochs'])
    m = DONE.match(line.strip())
    if not m:
      continue
    kind = re.sub(r'-n\d+', '', m['stack'])
    train = dict(PHASE.findall(m['phases'])).get('train')
    if train and epochs:
      per_kind.setdefault(kind, []).append(float(train) / (int(m['k']) * epochs))
  total = sum(totals.values())
  rows = list(totals.items())
  if wall:
    rows.append(('outside stacks', wall - total))
  denominator = wall or total
  out = ['| phase | seconds | share |', '|---|---|---|']
  out += [f'| {name} | {s:.0f} | {100 * s / denominator:.1f}% |' for name, s in rows]
  out.append(f'| total | {denominator:.0f} | |')
  out += ['', '| stacks | train seconds per model-epoch (mean) |', '|---|---|']
  out += [f'| {kind} | {sum(v) / len(v):.2f} |' for kind, v in sorted(per_kind.items())]
  return '\n'.join(out)


def main(args: list[str]) -> None:
  for arg in args:
    path, _, wall = arg.partition('=')
    lines = open(path).read().splitlines()
    print(f'## {path}\n\n{profile(lines, float(wall) if wall else None)}\n')


if __name__ == '__main__':
  main(sys.argv[1:])
