"""Campaigns built on whole studies: a sweep over one flag, and pooling a study's shards."""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

from jaxtransfer import config as config_lib
from jaxtransfer.study import migrate, similarity, driver
from jaxtransfer.nets import modelspec
from jaxtransfer.analysis import plots, report
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer import files
from jaxtransfer.config import RunOptions, StudyConfig
from jaxtransfer.study import plan as plan_lib
from jaxtransfer.study import workdir as workdir_lib
from jaxtransfer.study.progress import Progress
from jaxtransfer.study.workdir import Workdir


def run_sweep(config: StudyConfig, workdir: Workdir, *, image_folder: str | None = None,
              model_fn: modelspec.ModelFn | None = None, options: RunOptions = RunOptions(),
              progress: Progress | None = None, mesh=None) -> str:
  """One full (resumable) study per value of the swept flag in `workdir/<param>-<value>/`,
  then `sweep.md` and a figure of every claim's verdict at each value (`report.sweep_summary`); the
  arguments are `driver.run`'s. The sweep's workdir is locked for the whole sweep, each
  sub-study's for its own run."""
  config = driver.resolve(config, image_folder=image_folder, model_fn=model_fn)
  progress = progress or Progress()
  param, values = config_lib.parse_sweep(config.sweep)
  with workdir.lock(options.wait_for_lock, log=progress.log):
    driver.prepare(config, workdir, image_folder)
    kwargs = dict(image_folder=image_folder, model_fn=model_fn, options=options, mesh=mesh)
    return _sweep_locked(config, workdir, param, values, progress=progress, **kwargs)


def _sweep_locked(config: StudyConfig, workdir: Workdir, param: str, values: Sequence[int], *,
                  progress: Progress, **kwargs) -> str:
  workdir.claim(config)
  rows_by_value = {}
  for value, (folder, sub_config) in zip(values, config_lib.sweep_studies(config)):
    sub = Workdir(workdir.file(folder), writer=workdir.writer)
    sub.check(sub_config)
    progress.log(f'sweep {param}={value}')
    driver.run(sub_config, sub, progress=progress, **kwargs)
    if workdir.writer:  # the others write no results.csv to read
      rows_by_value[value] = rows_lib.read_csv(sub.file('results.csv'))
  if not workdir.writer:
    return workdir.file('sweep.md')
  return write_sweep_summary(workdir.path, param, rows_by_value)


SHARD_FIELDS = ('num_splits', 'splits')


class _Pooled(NamedTuple):
  """A pool read and checked, not yet written: everything `_write_pool` needs."""

  out: str
  record: dict  # pool.json: the pooled study's config and its shards
  rows: list[dict]
  class_names: tuple[str, ...]
  metrics: list[dict]
  cka_data: list[dict | None]
  note: str


def pool(shards: Sequence[str], out: str) -> str:
  """Pool finished shards of one study into `out`: results, figures and report as if a single
  run had trained all their splits.

  Shards are workdirs of studies with the same flags except --num_splits and --splits, and
  disjoint splits. Splits are a prefix-stable sequence of `split_seed` and every model's keys
  come from its run's identity, so a shard trains the same models the whole study would. Every
  input is checked before anything is written: each shard's results.csv must hold exactly the
  runs its own study.json plans (typed, with the planned values, and the config hash the record
  has), their metrics and CKA files must read, no shard may be given twice, and `out` may not lie
  inside one nor hold anything but this very pool (`workdir.check_owner`): pooling the same
  shards again into their pool rewrites the same files.

  Shards of a sweep (`--sweep`) pool value by value into `out/<param>-<value>/`, then `out` gets
  the sweep's summary over the pooled splits (`sweep.md` and its figure); returns its path."""
  if len(shards) < 2:
    raise ValueError('pooling needs at least two shard workdirs')
  real = [os.path.realpath(p) for p in shards]
  for i, path in enumerate(shards):
    if real[i] in real[:i]:
      raise ValueError(f'{path} is given twice (as {shards[real.index(real[i])]})')
  target = os.path.realpath(out)
  for path, r in zip(shards, real):
    if os.path.commonpath([target, r]) == r:
      raise ValueError(f'--out {out} is inside the shard {path}; pool into a new directory')
  migrate.refuse_legacy(shards)
  sweep = _sweep_of(shards)
  if not sweep:
    pooled = _read_pool(shards, out)
    workdir_lib.check_owner(out, study=False, pool=pooled.record)  # the last check: then writes
    return _write_pool(pooled)
  param, values = config_lib.parse_sweep(sweep)
  folders = [f'{param}-{value}' for value in values]
  parts = [_read_pool([os.path.join(s, f) for s in shards], os.path.join(out, f)) for f in folders]
  where = [os.path.relpath(p, out) for p in shards]
  record = {'sweep': sweep, 'shards': where, 'pools': folders}
  workdir_lib.check_owner(out, study=False, pool=record)
  for part in parts:
    workdir_lib.check_owner(part.out, study=False, pool=part.record)
  files.write_json(os.path.join(out, workdir_lib.POOL), record)
  for part in parts:
    _write_pool(part)
  rows_by_value = dict(zip(values, (part.rows for part in parts)))
  return write_sweep_summary(out, param, rows_by_value)


def write_sweep_summary(out: str, param: str, rows_by_value: dict) -> str:
  """`out/sweep.md` and `out/figures/sweep_<param>.png`: every claim at each swept value."""
  summary = report.sweep_summary(rows_by_value)
  figures = plots.sweep_figure(summary, param, os.path.join(out, 'figures', f'sweep_{param}'))
  path = os.path.join(out, 'sweep.md')
  files.write_text(path,
                   report.render_sweep(summary, param, [os.path.relpath(f, out) for f in figures]))
  return path


def _sweep_of(shards: Sequence[str]) -> str:
  """The `--sweep` all shards ran ('' for plain studies); shards of a sweep and plain ones, or of
  different sweeps, do not pool."""
  sweeps = []
  for path in shards:  # a shard without a record is refused by `_read_pool`, naming it
    meta = os.path.join(path, workdir_lib.STUDY)
    sweeps.append(workdir_lib.read_study(meta).recorded['sweep'] if os.path.isfile(meta) else '')
  if len(set(sweeps)) > 1:
    kinds = ', '.join(f'{p}: {s and "--sweep=" + s or "no sweep"}' for p, s in zip(shards, sweeps))
    raise ValueError(f'shards of different sweeps do not pool ({kinds})')
  return sweeps[0]


def _read_pool(shards: Sequence[str], out: str) -> _Pooled:
  """Read and check every shard of one (plain) study for a pool into `out`; writes nothing."""
  records, shard_rows, metrics, cka_data = [], [], [], []
  for path in shards:
    meta, csv = os.path.join(path, 'study.json'), os.path.join(path, 'results.csv')
    if not (os.path.isfile(meta) and os.path.isfile(csv)):
      raise ValueError(f'{path} is not a finished study (no study.json and results.csv)')
    record = workdir_lib.read_study(meta)
    halves = (plan_lib.make_halves(record.config, record.class_names)
              if record.class_names else None)
    expected = plan_lib.expected_rows(record.config, plan_lib.runs(record.config), halves)
    rows = rows_lib.read_csv(csv, expected)
    foreign = next((r['config_hash'] for r in rows if r['config_hash'] not in record.hashes), None)
    if foreign is not None:
      raise ValueError(f'{csv} holds rows of study {foreign}, not of the study {meta} records '
                       f'({record.hashes[0]}); pool the shards as they were run')
    records.append(record)
    shard_rows.append(rows)
    metrics += workdir_lib.read_metrics(os.path.join(path, workdir_lib.METRICS))
    data = os.path.join(path, 'figures', similarity.DATA_FILE)
    cka_data.append(similarity.read_data(data) if os.path.isfile(data) else None)
  configs = [r.recorded for r in records]
  first = config_lib.complete(configs[0])
  for path, config in zip(shards[1:], map(config_lib.complete, configs[1:])):
    diff = config_lib.differing(first, config, ignore=SHARD_FIELDS)
    if diff:
      changes = ', '.join(f'{k}: {first[k]!r} vs {config[k]!r}' for k in diff)
      raise ValueError(f'{path} is not a shard of the same study as {shards[0]} ({changes})')
  owner: dict[int, str] = {}
  for path, rows in zip(shards, shard_rows):
    for split in sorted({r['split'] for r in rows}):
      if split in owner:
        raise ValueError(f'split {split} is in both {owner[split]} and {path}')
      owner[split] = path
  rows = sorted((r for rows in shard_rows for r in rows), key=lambda r: r['split'])
  num_splits = max(c['num_splits'] for c in configs)
  chosen = sorted(owner)
  config = {
      **configs[0], 'num_splits': num_splits,
      'splits': [] if chosen == list(range(num_splits)) else chosen
  }
  # Shards as seen from `out`: no path of the machine that pooled them.
  where = {p: os.path.relpath(p, out) for p in shards}
  parts = [
      f'`{where[p]}` (split {", ".join(str(s) for s in chosen if owner[s] == p)})' for p in shards
  ]
  return _Pooled(out, {'config': config, 'shards': [where[p] for p in shards]}, rows,
                 records[0].class_names, metrics, cka_data,
                 f'Pooled from the shards {", ".join(parts)}; ')


def _write_pool(pooled: _Pooled) -> str:
  """Write a checked pool: results, pool.json, figures and report.md; returns the report's path."""
  out, rows, config = pooled.out, pooled.rows, pooled.record['config']
  rows_lib.write(out, rows)
  files.write_json(os.path.join(out, workdir_lib.POOL), pooled.record)
  figures = [os.path.relpath(p, out) for p in plots.write_all(rows, out)]
  if pooled.metrics:
    figures += [
        os.path.relpath(p, out)
        for p in plots.curves_figure(pooled.metrics, os.path.join(out, 'figures', 'curves'))
    ]
  if all(d is not None for d in pooled.cka_data):
    figures += [os.path.relpath(p, out) for p in _pool_similarity(pooled.cka_data, config, out)]
    cka_note = 'the layer-similarity (CKA) figure averages every shard\'s models.'
  else:
    cka_note = 'their layer-similarity (CKA) figures stay in each shard.'
  path = os.path.join(out, 'report.md')
  files.write_text(
      path,
      report.render(rows, config, figures, class_names=pooled.class_names or None,
                    note=pooled.note + cka_note, metrics=pooled.metrics))
  return path


def _pool_similarity(shards: Sequence[dict], config: dict, out: str) -> list[str]:
  """figures/cka.json and the CKA heat-map of all shards' models together (`shards`: each one's
  cka.json, read by `similarity.read_data`)."""
  layers = shards[0]['layers']
  records = [r for shard in shards for r in shard['records']]
  files.write_json(os.path.join(out, 'figures', similarity.DATA_FILE),
                   {'layers': layers, 'records': records})
  return similarity.draw(records, layers, config['conditions'], config['depths'],
                         os.path.join(out, 'figures', 'cka'))
