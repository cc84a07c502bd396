"""The study: which models to train (the plan), grouped into stacks, trained resumably.

A `Run` is one trained model: a split, the half it is trained on (target), a condition and a
frozen/grafted depth n. Conditions, as in Yosinski et al. 2014 with B the target half:
  base  -- a fresh net trained on the target half (baseA, baseB);
  BnB   -- selffer: first n layers copied from the target half's own base net and frozen;
  BnB+  -- selffer, all layers fine-tuned;
  AnB   -- transfer: first n layers copied from the other half's base net and frozen;
  AnB+  -- transfer, all layers fine-tuned;
  random -- first n layers left at their random initialisation and frozen (the paper's control).
With `directions='both'` each half serves as target in turn (the paper pooled AnB and BnA).

Runs sharing static structure (grafted and frozen layers) and target size form a `Stack`,
trained in one call of `train.train_stack`. The workdir keeps one checkpoint + one rows file
per finished stack; a rerun skips those, so a kill loses at most the stack in progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtransfer import data as data_lib
from jaxtransfer import models, plots, report, results, train, transfer
from jaxtransfer import splits as splits_lib

CONDITIONS = ('BnB', 'BnB+', 'AnB', 'AnB+', 'random')
FROZEN_CONDITIONS = ('BnB', 'AnB', 'random')


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that changes a study's results; its hash names the study."""

  dataset: str = 'cifar10'
  image_folder: str = ''
  model: str = 'final'
  widths: tuple[int, ...] = (8, 16, 32)
  halves: str = 'random'  # 'random' | 'dissimilar' (man-made vs natural, one split)
  num_splits: int = 5
  split_seed: int = 0
  splits: tuple[int, ...] = ()  # () = all; a subset runs one shard of the study (see pool)
  depths: tuple[int, ...] = ()  # () = 1..L-1
  conditions: tuple[str, ...] = ('BnB', 'BnB+', 'AnB', 'AnB+')
  directions: str = 'both'
  seeds: int = 1
  frozen_batchnorm: str = 'update'
  epochs: int = 10
  batch_size: int = 64
  optimizer: str = 'adam'
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  train_per_class: int = 0  # 0 = all
  sweep: str = ''  # 'param=v1,v2,...': one sub-study per value (see run_sweep)
  cka_images: int = 500  # target test images for the layer-similarity figure; 0 = none

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def hash(self) -> str:
    return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Run:
  split: int
  target: str  # 'A' | 'B'
  condition: str  # 'base' or one of CONDITIONS
  depth: int
  seed: int

  @property
  def source(self) -> str:
    """The half whose base net gives the grafted layers ('' for none)."""
    if self.condition in ('BnB', 'BnB+'):
      return self.target
    if self.condition in ('AnB', 'AnB+'):
      return 'A' if self.target == 'B' else 'B'
    return ''

  @property
  def frozen(self) -> bool:
    return self.condition in FROZEN_CONDITIONS

  @property
  def name(self) -> str:
    return f'split{self.split}-{self.target}-{self.condition}-n{self.depth}-seed{self.seed}'


@dataclasses.dataclass(frozen=True)
class Stack:
  name: str
  structure: train.Structure
  runs: tuple[Run, ...]

  @property
  def is_base(self) -> bool:
    return self.runs[0].condition == 'base'


def with_defaults(recorded: dict) -> dict:
  """A config as recorded in a study.json, with the fields added since at their defaults."""
  return {**StudyConfig().to_json(), **recorded}


def differing(a: dict, b: dict, ignore: Sequence[str] = ()) -> list[str]:
  """The config fields whose values differ between `a` and `b`, sorted."""
  return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


def half_classes(halves: Sequence[splits_lib.Split], split: int, half: str) -> tuple[int, ...]:
  """The classes of half 'A' or 'B' of split `split`."""
  return halves[split][half == 'B']


def structure_for(run: Run, layer_names: Sequence[str], batchnorm: str) -> train.Structure:
  prefix = tuple(layer_names[:run.depth])
  graft = prefix if run.source else ()
  frozen = prefix if run.frozen else ()
  return train.Structure(graft, frozen, batchnorm if frozen else 'update')


def plan(config: StudyConfig, layer_names: Sequence[str],
         halves: Sequence[splits_lib.Split]) -> list[Stack]:
  """All runs, grouped into stacks by (structure, target size): the base models first (every
  later stack grafts from them)."""
  targets = ('B',) if config.directions == 'AtoB' else ('A', 'B')
  seeds = range(config.seeds)
  chosen = config.splits or range(len(halves))
  runs = [Run(s, half, 'base', 0, seed) for s in chosen for half in ('A', 'B') for seed in seeds]
  runs += [Run(s, target, condition, depth, seed) for depth in config.depths
           for condition in config.conditions for s in chosen
           for target in targets for seed in seeds]
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    key = (structure_for(run, layer_names, config.frozen_batchnorm),
           len(half_classes(halves, run.split, run.target)))
    groups.setdefault(key, []).append(run)
  return [Stack(_stack_name(structure, size), structure, tuple(group))
          for (structure, size), group in groups.items()]


def _stack_name(structure: train.Structure, size: int) -> str:
  if structure == train.Structure():
    return f'base-k{size}'
  kind = 'frozen' if structure.frozen_layers else 'finetune'
  graft = 'graft' if structure.graft_layers else 'random'
  depth = max(len(structure.graft_layers), len(structure.frozen_layers))
  return f'{kind}-{graft}-n{depth}-k{size}'


def run_key(run: Run, purpose: str) -> jax.Array:
  """A PRNG key from the run's identity alone, so results do not depend on stack order."""
  return jax.random.fold_in(jax.random.key(run.seed), zlib.crc32(f'{run.name}/{purpose}'.encode()))


class Workdir:
  """Layout: study.json, stacks/<stack>.json (rows, written last), checkpoints/<stack>/."""

  def __init__(self, path: str):
    self.path = path

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  def check(self, config: StudyConfig) -> None:
    """Refuse a workdir that holds a study with other flags (no mixing of studies)."""
    meta = self.file('study.json')
    if os.path.exists(meta):
      with open(meta) as f:
        old = with_defaults(json.load(f)['config'])
      new = config.to_json()
      diff = differing(old, new)
      if diff:
        changes = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)
        raise ValueError(f'workdir {self.path} holds a study with other flags ({changes}); '
                         'use a new --workdir')

  def claim(self, config: StudyConfig, class_names: Sequence[str] = ()) -> None:
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

  def rows(self, stack: Stack) -> list[dict] | None:
    path = self.file('stacks', f'{stack.name}.json')
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def save(self, stack: Stack, variables, rows: list[dict]) -> None:
    """Checkpoint first, rows last: the rows file marks the stack finished."""
    import orbax.checkpoint as ocp  # heavy import, only when something is saved
    ckpt = self.file('checkpoints', stack.name)
    if os.path.exists(ckpt):  # left by a run killed before its rows were written
      shutil.rmtree(ckpt)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.abspath(ckpt), variables)
    results.atomic_write_json(self.file('stacks', f'{stack.name}.json'), rows)

  def restore(self, stack: Stack):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(os.path.abspath(self.file('checkpoints', stack.name)))


class Progress:
  """Stage / stack / epoch lines with running accuracy and an ETA, on stderr."""

  def __init__(self, stacks: Sequence[Stack], epochs: int, log: Callable[[str], None] | None):
    self.total = sum(len(s.runs) for s in stacks) * epochs
    self.done, self.start, self.log = 0, time.perf_counter(), log

  def skip(self, stack: Stack, epochs: int) -> None:
    self.total -= len(stack.runs) * epochs

  def epoch(self, label: str, stack: Stack, epoch: int, epochs: int, metrics: np.ndarray):
    self.done += len(stack.runs)
    if self.log is None:
      return
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done)
    self.log(f'{label} epoch {epoch + 1}/{epochs}: loss {metrics[:, 0].mean():.3f} '
             f'train acc {metrics[:, 1].mean():.3f} | ETA {eta / 60:.1f} min')


def _row(config: StudyConfig, halves, run: Run, structure: train.Structure, test_acc, train_acc,
         loss, seconds) -> dict:
  a, b = halves[run.split]
  return {
      'split': run.split, 'classes_A': ' '.join(map(str, a)), 'classes_B': ' '.join(map(str, b)),
      'source': run.source, 'target': run.target, 'condition': run.condition,
      'depth': run.depth, 'frozen': run.frozen, 'batchnorm': structure.batchnorm,
      'seed': run.seed, 'epochs': config.epochs, 'test_accuracy': float(test_acc),
      'train_accuracy': float(train_acc), 'final_loss': float(loss),
      'wall_seconds': round(float(seconds), 3), 'config_hash': config.hash(),
  }


def run_study(config: StudyConfig, workdir: Workdir, model, data: train.DeviceData,
              train_labels: np.ndarray, test_labels: np.ndarray, halves, stacks: list[Stack],
              *, log: Callable[[str], None] | None = None, mesh=None) -> list[dict]:
  """Train every unfinished stack in order; return all rows (finished ones read back)."""
  per_class = config.train_per_class or None
  tconfig = train.TrainConfig(config.epochs, config.batch_size, config.optimizer,
                              config.learning_rate, config.weight_decay)
  progress = Progress(stacks, config.epochs, log)
  all_rows, bases = [], None
  for i, stack in enumerate(stacks):
    rows = workdir.rows(stack)
    label = f'[{i + 1}/{len(stacks)} {stack.name} K={len(stack.runs)}]'
    if rows is not None:
      progress.skip(stack, config.epochs)
      if log:
        log(f'{label} done, skipped')
    else:
      sources = None
      if stack.structure.graft_layers:
        bases = bases or _restore_bases(workdir, stacks)
        sources = _stacked_sources(bases, stack.runs, stack.structure.graft_layers)
      classes = [half_classes(halves, r.split, r.target) for r in stack.runs]
      members = _members(stack.runs, classes, train_labels, test_labels, per_class, sources)
      stack_model = model(len(classes[0]))
      if log:
        log(f'{label} training')
      result = train.train_stack(
          stack_model, stack.structure, tconfig, data, members, mesh=mesh,
          on_epoch=lambda e, m: progress.epoch(label, stack, e, config.epochs, m))
      rows = [_row(config, halves, r, stack.structure, result.test_accuracy[j],
                   result.train_accuracy[j], result.train_loss[j],
                   result.seconds / len(stack.runs)) for j, r in enumerate(stack.runs)]
      workdir.save(stack, result.variables, rows)
      if stack.is_base:
        bases = None  # re-read with the new stack included
    all_rows.extend(rows)
  return all_rows


def _members(runs: Sequence[Run], classes: Sequence[Sequence[int]], train_labels: np.ndarray,
             test_labels: np.ndarray, per_class: int | None, sources) -> train.Members:
  """Each run's keys, its target half's train/test indices and label map, stacked."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  stack = lambda xs: jnp.asarray(np.stack(xs))
  return train.Members(
      init_keys=jnp.stack([run_key(r, 'init') for r in runs]),
      shuffle_keys=jnp.stack([run_key(r, 'shuffle') for r in runs]),
      train_idx=stack([splits_lib.class_indices(train_labels, c, per_class) for c in classes]),
      test_idx=stack([splits_lib.class_indices(test_labels, c) for c in classes]),
      label_map=stack([splits_lib.label_map(c, num_classes) for c in classes]),
      sources=sources)


def _restore_bases(workdir: Workdir, stacks: list[Stack]) -> dict:
  """Every base model's variables (host arrays), keyed by (split, half, seed)."""
  out = {}
  for stack in stacks:
    if stack.is_base:
      variables = workdir.restore(stack)
      for j, r in enumerate(stack.runs):
        out[(r.split, r.target, r.seed)] = jax.tree.map(lambda x, j=j: np.asarray(x[j]),
                                                        variables)
  return out


def _stacked_sources(bases: dict, runs: Sequence[Run], layers: Sequence[str]):
  """The grafted layers of each run's source net, stacked. Only those layers: heads of halves
  of different sizes differ in shape and would not stack."""
  prefix = lambda v: {c: {n: sub[n] for n in layers if n in sub} for c, sub in v.items()}
  trees = [prefix(bases[(r.split, r.source, r.seed)]) for r in runs]
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *trees)


def make_halves(config: StudyConfig, class_names: Sequence[str]) -> list[splits_lib.Split]:
  if config.halves == 'dissimilar':
    if config.num_splits != 1:
      raise ValueError('--halves=dissimilar is one fixed split: use --num_splits=1')
    return [splits_lib.dissimilar_halves(class_names)]
  return splits_lib.random_halves(len(class_names), config.num_splits, config.split_seed)


def num_layers(model: str, widths: Sequence[int]) -> int:
  return models.make_model(model, 2, widths).num_layers


def run(config: StudyConfig, workdir: Workdir, *, data_dir: str | None = None,
        manual_dir: str | None = None, cache_dir: str | None = None,
        log: Callable[[str], None] | None = None, mesh=None) -> str:
  """The whole study: data, plan, training (resumable), results, figures, report.md."""
  load = lambda split: data_lib.load(split, dataset=config.dataset,
                                     image_folder=config.image_folder or None,
                                     data_dir=data_dir, manual_dir=manual_dir, cache_dir=cache_dir)
  train_ds, test_ds = load('train'), load('test')
  halves = make_halves(config, train_ds.class_names)
  make = lambda k: models.make_model(config.model, k, config.widths)
  example = np.zeros((1,) + train_ds.images.shape[1:], np.float32)
  layer_names = transfer.layer_order(make(2), example, train=False)
  stacks = plan(config, layer_names, halves)
  workdir.claim(config, train_ds.class_names)
  if log:
    log(f'study {config.hash()}: {sum(len(s.runs) for s in stacks)} models in {len(stacks)} '
        f'stacks, {len(train_ds)} train / {len(test_ds)} test images, '
        f'{jax.device_count()} {jax.default_backend()} device(s)')
  mean, std = data_lib.channel_stats(train_ds.images)
  device_data = train.to_device(train_ds, test_ds, mean, std)
  rows = run_study(config, workdir, make, device_data, train_ds.labels, test_ds.labels, halves,
                   stacks, log=log, mesh=mesh)
  results.write(workdir.path, rows)
  paths = plots.write_all(rows, workdir.path)
  if config.cka_images:
    paths += similarity(config, workdir, stacks, halves, make, layer_names, test_ds, mean, std)
  figures = [os.path.relpath(p, workdir.path) for p in paths]
  path = workdir.file('report.md')
  results.atomic_write_text(path, report.render(rows, config.to_json(), figures,
                                                class_names=train_ds.class_names))
  return path


def similarity(config: StudyConfig, workdir: Workdir, stacks: Sequence[Stack], halves,
               make: Callable, layer_names: Sequence[str], test_ds, mean, std) -> list[str]:
  """Linear CKA, layer by layer, of every model against its target half's base net, on the
  target half's test images; averaged over splits, directions and seeds, as a heat-map.

  The row 'other base' compares the two halves' independently trained base nets: where it
  falls, the features stop being general."""
  from jaxtransfer import cka  # matplotlib-heavy, only when asked
  per_class = max(1, config.cka_images // len(halves[0][1]))
  features = {}  # (split, target) -> normalised test images
  for s in sorted({r.split for stack in stacks for r in stack.runs}):
    for t, classes in zip('AB', halves[s]):
      idx = splits_lib.class_indices(test_ds.labels, classes)
      idx = np.concatenate([idx[test_ds.labels[idx] == c][:per_class] for c in classes])
      features[(s, t)] = np.asarray(train.normalize(test_ds.images[idx], mean, std))
  nets = {}  # (split, target, condition, depth, seed) -> variables
  for stack in stacks:
    variables = workdir.restore(stack)
    for j, r in enumerate(stack.runs):
      nets[(r.split, r.target, r.condition, r.depth, r.seed)] = jax.tree.map(
          lambda x, j=j: np.asarray(x[j]), variables)
  rows: dict[str, list[np.ndarray]] = {}
  for (s, t, condition, depth, seed), variables in sorted(nets.items()):
    if condition == 'base':
      continue
    base_key = lambda half: (s, half, 'base', 0, seed)
    model = make(len(half_classes(halves, s, t)))
    images = features[(s, t)]
    reference = cka.layer_features(model, nets[base_key(t)], images)
    other = 'A' if t == 'B' else 'B'
    if depth == config.depths[0]:  # once per (split, target, seed)
      other_model = make(len(half_classes(halves, s, other)))
      rows.setdefault('other base', []).append(cka.per_layer_cka(
          cka.layer_features(other_model, nets[base_key(other)], images), reference))
    rows.setdefault(f'{condition} n={depth}', []).append(
        cka.per_layer_cka(cka.layer_features(model, variables, images), reference))
  order = ['other base'] + [f'{c} n={d}' for c in config.conditions for d in config.depths]
  labels = [label for label in order if label in rows]
  matrix = np.stack([np.mean(rows[label], axis=0) for label in labels])
  return cka.heatmap(matrix, labels, list(layer_names), workdir.file('figures', 'cka'),
                     title='Linear CKA with the target half\'s base net, per layer',
                     xlabel='layer', ylabel='model')


SWEEPABLE = ('epochs', 'train_per_class')


def parse_sweep(sweep: str) -> tuple[str, tuple[int, ...]]:
  """'epochs=10,30,100' -> ('epochs', (10, 30, 100))."""
  param, _, values = sweep.partition('=')
  if param not in SWEEPABLE or not values:
    raise ValueError(f'--sweep {sweep!r}: expected PARAM=V1,V2,... with PARAM one of {SWEEPABLE}')
  try:
    parsed = tuple(int(v) for v in values.split(','))
  except ValueError:
    raise ValueError(f'--sweep {sweep!r}: values must be integers') from None
  if min(parsed) < 1:
    raise ValueError(f'--sweep {sweep!r}: values must be at least 1')
  return param, parsed


def run_sweep(config: StudyConfig, workdir: Workdir, **kwargs) -> str:
  """One full (resumable) study per value of the swept flag in `workdir/<param>-<value>/`,
  then a figure and `sweep.md` of how the co-adaptation dip and fine-tuning gain move."""
  param, values = parse_sweep(config.sweep)
  workdir.claim(config)
  rows_by_value = {}
  for value in values:
    sub_config = dataclasses.replace(config, sweep='', **{param: value})
    sub = Workdir(workdir.file(f'{param}-{value}'))
    sub.check(sub_config)
    if kwargs.get('log'):
      kwargs['log'](f'sweep {param}={value}')
    run(sub_config, sub, **kwargs)
    rows_by_value[value] = results.read_csv(sub.file('results.csv'))
  summary = report.sweep_summary(rows_by_value)
  figures = plots.sweep_figure(summary, param, workdir.file('figures', f'sweep_{param}'))
  path = workdir.file('sweep.md')
  results.atomic_write_text(path, report.render_sweep(summary, param, [
      os.path.relpath(f, workdir.path) for f in figures]))
  return path


SHARD_FIELDS = ('num_splits', 'splits')


def pool(shards: Sequence[str], out: str) -> str:
  """Pool finished shards of one study into `out`: results, figures and report as if a single
  run had trained all their splits.

  Shards are workdirs of studies with the same flags except --num_splits and --splits, and
  disjoint splits. Splits are a prefix-stable sequence of `split_seed` and every model's keys
  come from its run's identity, so a shard trains the same models the whole study would."""
  if len(shards) < 2:
    raise ValueError('pooling needs at least two shard workdirs')
  records, shard_rows = [], []
  for path in shards:
    meta, csv = os.path.join(path, 'study.json'), os.path.join(path, 'results.csv')
    if not (os.path.isfile(meta) and os.path.isfile(csv)):
      raise ValueError(f'{path} is not a finished study (no study.json and results.csv)')
    with open(meta) as f:
      records.append(json.load(f))
    shard_rows.append(results.read_csv(csv))
  configs = [with_defaults(r['config']) for r in records]
  for path, config in zip(shards[1:], configs[1:]):
    diff = differing(configs[0], config, ignore=SHARD_FIELDS)
    if diff:
      changes = ', '.join(f'{k}: {configs[0][k]!r} vs {config[k]!r}' for k in diff)
      raise ValueError(f'{path} is not a shard of the same study as {shards[0]} ({changes})')
  owner: dict[int, str] = {}
  for path, rows in zip(shards, shard_rows):
    for split in sorted({r['split'] for r in rows}):
      if split in owner:
        raise ValueError(f'split {split} is in both {owner[split]} and {path}')
      owner[split] = path
  if (os.path.realpath(out) in map(os.path.realpath, shards)
      or os.path.exists(os.path.join(out, 'study.json'))):
    raise ValueError(f'{out} holds a study; pool into a new directory')
  rows = sorted((r for rows in shard_rows for r in rows), key=lambda r: r['split'])
  num_splits = max(c['num_splits'] for c in configs)
  chosen = sorted(owner)
  config = {**configs[0], 'num_splits': num_splits,
            'splits': [] if chosen == list(range(num_splits)) else chosen}
  results.write(out, rows)
  results.atomic_write_json(os.path.join(out, 'pool.json'),
                            {'config': config, 'shards': [os.path.abspath(p) for p in shards]})
  figures = [os.path.relpath(p, out) for p in plots.write_all(rows, out)]
  parts = [f'`{p}` (split {", ".join(str(s) for s in chosen if owner[s] == p)})' for p in shards]
  note = (f'Pooled from the shards {", ".join(parts)}; their layer-similarity (CKA) figures '
          'stay in each shard.')
  path = os.path.join(out, 'report.md')
  results.atomic_write_text(path, report.render(
      rows, config, figures, class_names=records[0].get('class_names') or None, note=note))
  return path
