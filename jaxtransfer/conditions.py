"""The experimental conditions of Yosinski et al. 2014, as one table every module reads.

With B the target half and n the depth:
  base   -- a fresh net trained on the target half (baseA, baseB); n = 0;
  BnB    -- selffer: first n layers copied from the target half's own base net and frozen;
  BnB+   -- selffer, all layers fine-tuned;
  AnB    -- transfer: first n layers copied from the other half's base net and frozen;
  AnB+   -- transfer, all layers fine-tuned;
  random -- first n layers left at their random initialisation and frozen (the paper's control).

The plan (which layers are grafted and frozen), the figures (colour, marker, label), the report
(row and column order) and the `--conditions` flag (choices, help) all read this table: a new
condition is one row.
"""

from __future__ import annotations

import dataclasses

SELF, OTHER, NONE = 'self', 'other', ''


@dataclasses.dataclass(frozen=True)
class Condition:
  name: str
  source: str  # whose base net gives the first n layers: SELF, OTHER or NONE (fresh/random)
  frozen: bool  # the first n layers are not trained
  description: str
  color: str  # the paper's colours: selffer blue, transfer red, fine-tuned lighter
  marker: str

  @property
  def grafted(self) -> bool:
    return self.source != NONE

  @property
  def label(self) -> str:
    return f'{self.name} ({self.description})'

  def source_half(self, target: str) -> str:
    """The half ('A' | 'B') whose base net gives the grafted layers, '' for none."""
    return {SELF: target, OTHER: 'A' if target == 'B' else 'B', NONE: ''}[self.source]


BASE = Condition('base', NONE, False, 'trained from scratch', 'black', 'o')
BNB = Condition('BnB', SELF, True, 'selffer, frozen', 'tab:blue', 'o')
BNB_PLUS = Condition('BnB+', SELF, False, 'selffer, fine-tuned', 'lightskyblue', 'o')
ANB = Condition('AnB', OTHER, True, 'transfer, frozen', 'tab:red', 'D')
ANB_PLUS = Condition('AnB+', OTHER, False, 'transfer, fine-tuned', 'lightcoral', 'D')
RANDOM = Condition('random', NONE, True, 'random init, frozen', 'grey', 's')
TABLE = (BASE, BNB, BNB_PLUS, ANB, ANB_PLUS, RANDOM)
BY_NAME = {c.name: c for c in TABLE}
# The conditions of transferred depth n >= 1; what `--conditions` may name (the base nets are
# always trained).
TRANSFER = tuple(c for c in TABLE if c is not BASE)
CHOICES = tuple(c.name for c in TRANSFER)
SEMINAR = (BNB, BNB_PLUS, ANB, ANB_PLUS)  # what the 2022 seminar trained: the default


def get(name: str) -> Condition:
  return BY_NAME[name]
