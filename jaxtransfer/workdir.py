"""A study's working directory: its layout, its claim on one config, checkpoints and metrics.

  study.json             the config (and the dataset's class names) this workdir belongs to
  stacks/<stack>.json    one finished stack's result rows; written last, so it marks the stack done
  checkpoints/<stack>/   the stack's final variables (orbax), a leading model axis on every leaf
  metrics.jsonl          per-epoch metrics of every member of every stack, one JSON object a line
  results.csv/json, report.md, figures/   what the study derives from the rows

A rerun skips the stacks whose rows exist, so a kill loses at most the stack in progress.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import jax
import numpy as np

from jaxtransfer import plan as plan_lib
from jaxtransfer import results

METRICS = 'metrics.jsonl'


class Workdir:
  """Layout: study.json, stacks/<stack>.json (rows, written last), checkpoints/<stack>/."""
  def __init__(self, path: str):
    self.path = path

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  def check(self, config: plan_lib.StudyConfig) -> None:
    """Refuse a workdir that holds a study with other flags (no mixing of studies)."""
    meta = self.file('study.json')
    if os.path.exists(meta):
      with open(meta) as f:
        old = plan_lib.with_defaults(json.load(f)['config'])
      new = config.to_json()
      diff = plan_lib.differing(old, new)
      if diff:
        changes = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)
        raise ValueError(f'workdir {self.path} holds a study with other flags ({changes}); '
                         'use a new --workdir')

  def claim(self, config: plan_lib.StudyConfig, class_names: Sequence[str] = ()) -> None:
    """Record `config` as this workdir's study (after `check`), with the dataset's class names
    so that the results can be read (and pooled) without the data."""
    self.check(config)
    os.makedirs(self.file('stacks'), exist_ok=True)
    meta = self.file('study.json')
    record = {'config': config.to_json(), 'config_hash': config.hash()}
    if os.path.exists(meta):
      with open(meta) as f:
        record = json.load(f)
      if record.get('class_names') or not class_names:
        return
    results.atomic_write_json(meta, {**record, 'class_names': list(class_names)})

  def rows(self, stack: plan_lib.Stack) -> list[dict] | None:
    path = self.file('stacks', f'{stack.name}.json')
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def save(self, stack: plan_lib.Stack, variables, rows: list[dict]) -> None:
    """Checkpoint first, rows last: the rows file marks the stack finished."""
    import orbax.checkpoint as ocp  # heavy import, only when something is saved
    ckpt = self.file('checkpoints', stack.name)
    if os.path.exists(ckpt):  # left by a run killed before its rows were written
      shutil.rmtree(ckpt)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.abspath(ckpt), variables)
    results.atomic_write_json(self.file('stacks', f'{stack.name}.json'), rows)

  def restore(self, stack: plan_lib.Stack):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(os.path.abspath(self.file('checkpoints', stack.name)))

  def members(self, stacks: Sequence[plan_lib.Stack], base_only: bool = False) -> dict:
    """Every finished member's variables (host arrays), keyed by its `Run`."""
    out = {}
    for stack in stacks:
      if stack.is_base or not base_only:
        variables = self.restore(stack)
        for j, run in enumerate(stack.runs):
          out[run] = jax.tree.map(lambda x, j=j: np.asarray(x[j]), variables)
    return out

  def append_metrics(self, records: Sequence[dict]) -> None:
    """Append one JSON line per record. One write per call, and a call that finds the file
    ending mid-line (a killed writer) starts on a new line: a kill costs at most its own last
    line, which `read_metrics` skips."""
    text = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
    path = self.file(METRICS)
    with open(path, 'ab') as f:
      if f.tell() and not _ends_with_newline(path):
        text = '\n' + text
      f.write(text.encode())

  def read_metrics(self) -> list[dict]:
    """Every complete metrics line; of records repeated for the same run and epoch (a stack
    retrained after a kill), the last."""
    path = self.file(METRICS)
    if not os.path.exists(path):
      return []
    latest = {}
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        latest[(record['run'], record['epoch'])] = record
    return list(latest.values())


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'
