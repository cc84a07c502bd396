"""Progress output of a long run: stage and stack lines, per-epoch metrics and an ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import numpy as np


class Progress:
  """Writes progress lines to `stream` (stderr by default); `Progress(None)` is silent.

  The ETA counts work: `plan` sets the total, `skip` removes finished stacks, `epoch` adds a
  stack's epoch as it ends. A unit of work is the caller's (the driver weighs an epoch of a
  stack by its FLOPs on the busiest device, so cheap frozen stacks do not inflate the ETA; the
  default, one unit per member, counts model-epochs).
  """
  def __init__(self, stream: TextIO | None = sys.stderr):
    self.stream = stream
    self.total = self.done = 0
    self.start = time.perf_counter()

  def log(self, message: str) -> None:
    if self.stream is not None:
      print(message, file=self.stream, flush=True)

  def plan(self, work: float) -> None:
    self.total, self.done, self.start = work, 0, time.perf_counter()

  def skip(self, work: float) -> None:
    self.total -= work

  def epoch(self, label: str, epoch: int, epochs: int, metrics: np.ndarray,
            work: float | None = None) -> None:
    """`metrics`: [K, 2] (mean loss, train accuracy) of the stack's K members, or [K, 3] with
    their test accuracy; `work`: that epoch's (default: K)."""
    self.done += len(metrics) if work is None else work
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * max(self.total - self.done, 0)
    test = f' test acc {metrics[:, 2].mean():.3f}' if metrics.shape[1] > 2 else ''
    self.log(f'{label} epoch {epoch + 1}/{epochs}: loss {metrics[:, 0].mean():.3f} '
             f'train acc {metrics[:, 1].mean():.3f}{test} | ETA {eta / 60:.1f} min')
