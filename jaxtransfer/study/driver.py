"""Running a study: data -> plan -> stacks trained (resumably) -> results, figures, report.md.

The config (`jaxtransfer.config`), the study in context (`context`), the plan (`plan`), the
workdir (`workdir`), the trainer (`train`) and the layer-similarity analysis (`similarity`) each
live in their own module; this one puts them together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtransfer import conditions
from jaxtransfer import config as config_lib
from jaxtransfer.analysis import plots, report
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer import files
from jaxtransfer.config import RunOptions, StudyConfig
from jaxtransfer.data import cifar, imagefolder
from jaxtransfer.data import datasets as data_lib
from jaxtransfer.data import splits as splits_lib
from jaxtransfer.nets import flops, modelspec
from jaxtransfer.study import context, estimate, migrate
from jaxtransfer.study import plan as plan_lib
from jaxtransfer.study.context import Study
from jaxtransfer.study.plan import Run, Stack
from jaxtransfer.study.progress import Progress
from jaxtransfer.study.workdir import Corrupt, Workdir
from jaxtransfer.train import features as features_lib
from jaxtransfer.train import trainer


class Data(NamedTuple):
  """A study's data in memory: its train and test `imagefolder.ArrayDataset`s and the train
  images' per-channel mean and std, which every model's inputs are normalised by."""

  train: imagefolder.ArrayDataset
  test: imagefolder.ArrayDataset
  mean: np.ndarray
  std: np.ndarray


def resolve(config: StudyConfig, *, image_folder: str | None = None,
            model_fn: modelspec.ModelFn | None = None) -> StudyConfig:
  """The study `config` names, as its workdir records it: validated (a model of your own checked
  on the data's image shape) and identified by its data (`image_folder`'s content fingerprint).
  The one check of a config, for the command line and the Python API alike. Raises ConfigError
  or DataError (one line); writes nothing."""
  fingerprint, shape = imagefolder.identify(image_folder) if image_folder else ('',
                                                                                cifar.IMAGE_SHAPE)
  config = context.validate(config, model_fn=model_fn, image_shape=shape)
  config = config_lib.with_model_source(config, modelspec.source_digest(config.model, model_fn))
  if image_folder and imagefolder.is_sizes_fingerprint(config.data_fingerprint):
    config = dataclasses.replace(
        config, data_fingerprint=migrate.recognised(config.data_fingerprint, image_folder,
                                                    fingerprint))
  return config_lib.with_data(config, fingerprint)


def prepare(config: StudyConfig, workdir: Workdir, image_folder: str | None = None) -> StudyConfig:
  """Make sure `workdir` is new or holds the (`resolve`d) study `config`: a record that named
  this very image folder by path, or by its names and sizes, is migrated (`migrate.adopt`), and
  one of a model of your own recorded without its source's digest adopts it
  (`migrate.adopt_model`), by the workdir's writer before any process checks it; nothing else is
  written."""
  migrate.adopt(workdir.path, image_folder, config.data_fingerprint, write=workdir.writer)
  migrate.adopt_model(workdir.path, config, write=workdir.writer)
  workdir.sync('prepared')
  workdir.check(config)
  return config


def run(config: StudyConfig, workdir: Workdir, *, image_folder: str | None = None,
        model_fn: modelspec.ModelFn | None = None, options: RunOptions = RunOptions(),
        progress: Progress | None = None, mesh=None) -> str:
  """The whole study: data, plan, training (resumable), results, figures, report.md.

  `image_folder`: where the data is, when not a TFDS dataset (the study records its content,
  not its path). `model_fn(num_classes)`: a flax module of your own (`config.model` names it;
  contract in `modelspec`). `options`: how to run it (`config.RunOptions`: not part of the
  study). `progress`: where its progress lines go (default: stderr; `Progress(None)`: nowhere).
  The workdir is locked for the whole run, and every finished stack's rows and checkpoint are
  verified before anything is written."""
  config = resolve(config, image_folder=image_folder, model_fn=model_fn)
  progress = progress or Progress()
  with workdir.lock(options.wait_for_lock, log=progress.log):
    prepare(config, workdir, image_folder)
    workdir.read_metrics()  # checked (a bad line named) before anything is trained or written
    workdir.remove_leftovers()
    data = _load(config, image_folder, options, progress)
    study = context.build(config, data.train, data.test, model_fn)
    workdir.claim(config, data.train.class_names)
    notes = moot_flags(config, context.model_info(config, model_fn, study.image_shape))
    for line in (_summary(study, data, options.member_map),
                 class_counts(data.train, data.test,
                              config.train_per_class), *notes, *one_cpu_device_hint()):
      progress.log(line)
    device_data = trainer.to_device(data.train, data.test, data.mean, data.std)
    rows = train_stacks(study, workdir, device_data, options=options, progress=progress, mesh=mesh)
    return _write_outputs(study, workdir, rows, data, notes, progress,
                          trainer.resolve_member_map(options.member_map))


def _summary(study: Study, data: Data, member_map: str) -> str:
  """The study log's first line: the study, its data and where its members run."""
  return (f'study {study.config.hash()}: {sum(len(s.runs) for s in study.stacks)} models in '
          f'{len(study.stacks)} stacks, {len(data.train)} train / {len(data.test)} test images, '
          f'{jax.device_count()} {jax.default_backend()} device(s), members under '
          f'{trainer.resolve_member_map(member_map)}')


def one_cpu_device_hint() -> list[str]:
  """On a multi-core CPU seen as one JAX device, how to get more: members then train in turn."""
  cores = os.cpu_count() or 1
  if jax.default_backend() != 'cpu' or jax.device_count() > 1 or cores < 2:
    return []
  return [
      f'note: 1 cpu device on {cores} cores: a stack\'s members train one after another; '
      f'jaxtransfer.use_cpu_devices({min(cores, 8)}) before anything runs JAX (the command '
      'line\'s --cpu_devices) trains them in parallel'
  ]


def _write_outputs(study: Study, workdir: Workdir, rows: list[dict], data: Data,
                   notes: Sequence[str], progress: Progress | None = None,
                   member_map: str = 'map') -> str:
  """results, figures and report.md from every stack's rows; returns the report's path. Only
  the workdir's writer derives them: they hold nothing the training of another process needs."""
  if not workdir.writer:
    return workdir.file('report.md')
  rows_lib.write(workdir.path, rows)
  paths = plots.write_all(rows, workdir.path)
  diverged = [r for r in rows if r['diverged']]
  metrics = workdir.read_metrics()
  if metrics:
    paths += plots.curves_figure(metrics, workdir.file('figures', 'curves'))
  if study.config.cka_images:
    from jaxtransfer.study import similarity  # only when asked
    paths += similarity.write(study, workdir, data.test, data.mean, data.std,
                              exclude={rows_lib.run_id(r) for r in diverged},
                              log=(progress or Progress(None)).log, member_map=member_map)
  figures = [os.path.relpath(p, workdir.path) for p in paths]
  path = workdir.file('report.md')
  files.write_text(
      path,
      report.render(rows, study.config.to_json(), figures, class_names=data.train.class_names,
                    note=' '.join(notes), metrics=metrics))
  if diverged:
    logging.warning(
        '%d of %d models diverged (non-finite loss or weights), e.g. %s: results.csv flags them '
        '(diverged=True); report.md lists them and leaves them out of its tables, figures and '
        'claims', len(diverged), len(rows), rows_lib.describe(rows_lib.run_id(diverged[0])))
  return path


def _load(config: StudyConfig, image_folder: str | None, options: RunOptions,
          progress: Progress | None = None) -> Data:
  """The study's data (through the decoded-array cache), restricted to --classes when given
  (the channel statistics are then those classes' images'); a long decode says how far it is."""
  load = lambda split: data_lib.load(split, dataset=config.dataset, image_folder=image_folder,
                                     data_dir=options.data_dir, manual_dir=options.manual_dir,
                                     cache_dir=options.cache_dir)
  with _data_progress(progress):
    train, test = load('train'), load('test')
  if config.classes:
    train, test = (splits_lib.restrict(ds, config.classes) for ds in (train, test))
  return Data(train, test, *data_lib.channel_stats(train.images))


class _ProgressHandler(logging.Handler):
  def __init__(self, progress: Progress):
    super().__init__(logging.INFO)
    self.progress = progress

  def emit(self, record: logging.LogRecord) -> None:
    self.progress.log(record.getMessage())


@contextlib.contextmanager
def _data_progress(progress: Progress | None):
  """The data modules' progress lines (`imagefolder.PROGRESS_LOGGER`) as `progress` lines."""
  if progress is None:
    yield
    return
  logger = logging.getLogger(imagefolder.PROGRESS_LOGGER)
  handler, level = _ProgressHandler(progress), logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def class_counts(train_ds, test_ds, per_class: int = 0) -> str:
  """The study log's line of images per class, train/test (and the --train_per_class cap)."""
  count = lambda ds: np.bincount(ds.labels, minlength=len(ds.class_names))
  pairs = list(zip(train_ds.class_names, count(train_ds), count(test_ds)))
  cap = f' (training on at most {per_class} per class)' if per_class else ''
  if len({(n, m) for _, n, m in pairs}) == 1:
    return f'images per class: {pairs[0][1]} train / {pairs[0][2]} test, every class{cap}'
  return ('images per class, train/test (unbalanced)' + cap + ': ' +
          ', '.join(f'{name} {n}/{m}' for name, n, m in pairs))


def moot_flags(config: StudyConfig, info: modelspec.ModelInfo) -> list[str]:
  """What a flag cannot do for this model, said in the log and the report, not refused."""
  if info.batchnorm or not any(conditions.get(c).frozen for c in config.conditions):
    return []
  return [
      f'The model `{config.model}` has no BatchNorm layer, so --frozen_batchnorm '
      f'(`{config.frozen_batchnorm}`) changes nothing: frozen layers are fixed functions '
      'of their input either way.'
  ]


def train_stacks(study: Study, workdir: Workdir, data: trainer.DeviceData, *,
                 options: RunOptions = RunOptions(), progress: Progress, mesh=None) -> list[dict]:
  """Train every unfinished stack in order; return all rows (finished ones read back, after
  every one was verified, with this study's config hash: a study renamed by a change of its
  identity fields, e.g. migrated to a data fingerprint, keeps its stacks).

  A stack whose frozen prefix is a fixed function of the image trains on the prefix's output,
  computed once, when it fits in `options.feature_budget_mb` (`features.planned_nbytes`)."""
  config = study.config
  tconfig = context.train_config(config, options)
  member_map = trainer.resolve_member_map(options.member_map)
  done = _finished(workdir, study.stacks,
                   plan_lib.expected_rows(config, plan_lib.runs(config), study.halves),
                   options.retrain_corrupt, progress)
  work = epoch_work(study, mesh.size if mesh else jax.device_count(), options.feature_budget_mb)
  progress.plan(sum(work.values()) * config.epochs)
  all_rows, bases = [], None
  pad_to = plan_lib.largest(study.stacks)
  for i, stack in enumerate(study.stacks):
    rows = done[stack.name]
    label = f'[{i + 1}/{len(study.stacks)} {stack.name} K={len(stack.runs)} {member_map}]'
    if rows is not None:
      rows = [{**r, 'config_hash': config.hash()} for r in rows]
      progress.skip(work[stack.name] * config.epochs)
      progress.log(f'{label} done, skipped')
    else:
      sources = None
      if stack.structure.graft_layers:
        bases = bases or workdir.members(study.stacks, base_only=True)
        sources = _stacked_sources(bases, stack.runs, stack.structure.graft_layers)
      inputs = stack_inputs(study, stack, data, sources, tconfig, options.feature_budget_mb)
      if inputs.features is not None:
        label += f' (prefix features: {inputs.feature_bytes / 2**20:.0f} MB)'
      progress.log(f'{label} training')
      on_epoch = EpochLog(workdir, progress, stack, label, config.epochs, work[stack.name])
      result = trainer.train_stack(inputs.model, inputs.structure, tconfig, data, inputs.members,
                                   mesh=mesh, member_map=member_map, on_epoch=on_epoch,
                                   features=inputs.features,
                                   eval_every_epoch=options.eval_every_epoch, pad_to=pad_to,
                                   chunk=options.members_per_program)
      rows = _rows(study, stack, result)
      saved = time.perf_counter()
      workdir.save(stack, result.variables, rows)
      phases = {**result.timings, 'save': time.perf_counter() - saved}
      if inputs.features is not None:
        phases = {'features': inputs.feature_seconds, **phases}
      progress.log(
          f'{label} done in {result.seconds + phases["save"] + inputs.feature_seconds:.1f} s: ' +
          ', '.join(f'{phase} {seconds:.1f} s' for phase, seconds in phases.items()) +
          _memory_note(result, len(stack.runs)))
      if stack.is_base:
        bases = None  # re-read with the new stack included
    all_rows.extend(rows)
  return all_rows


def _memory_note(result: trainer.StackResult, k: int) -> str:
  """Where the device reports its memory: what the stack's programs held there, and the chunks
  it ran in if it did not fit at once."""
  if result.footprint is None:
    return ''
  note = f'; {result.footprint.total(k) / 2**30:.2f} GiB per device'
  if result.members_per_program < k:
    note += f' in chunks of {result.members_per_program} members (device memory)'
  return note


class StackInputs(NamedTuple):
  """What a stack trains on: its model, its members' inputs and, when its frozen prefix's output
  is computed once, that output (`trainer.Features`) and its size."""

  model: Any
  structure: trainer.Structure  # what the trainer gets: on features, `features.starting_prefix`'s
  members: trainer.Members
  features: trainer.Features | None = None
  feature_bytes: int = 0
  feature_seconds: float = 0.0  # computing them (and the members' starting states they need)


def stack_inputs(study: Study, stack: Stack, data: trainer.DeviceData, sources,
                 config: trainer.TrainConfig, budget_mb: int) -> StackInputs:
  """The model, structure and members of `stack` (`sources`: its grafted layers, stacked), on
  the prefix's features when they fit in `budget_mb` (`features.planned_nbytes`; `config`: the
  training, for the members' starting states, `features.starting_prefix`)."""
  classes = [study.classes(r) for r in stack.runs]
  members = stack_members(stack.runs, classes, study.train_labels, study.test_labels,
                          study.config.train_per_class or None, sources)
  model = study.make(len(classes[0]))
  size = features_lib.planned_nbytes(model, stack.structure, *members.train_idx.shape,
                                     members.test_idx.shape[1], data.train_images.shape[1:],
                                     budget_mb, augment=study.config.augment != 'none')
  if size is None:
    return StackInputs(model, stack.structure, members)
  start = time.perf_counter()
  structure, members = features_lib.starting_prefix(model, stack.structure, config, members, data)
  features, members = features_lib.compute(model, members, data, len(structure.frozen_layers))
  jax.block_until_ready(features.data)
  return StackInputs(model, structure, members, features, size, time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class EpochLog:
  """What a stack's finished epoch writes (`trainer.train_stack`'s `on_epoch`): the progress
  line, and one metrics.jsonl line per member."""

  workdir: Workdir
  progress: Progress
  stack: Stack
  label: str
  epochs: int
  work: float  # an epoch's work, for the ETA (`epoch_work`)

  def __call__(self, epoch: int, metrics: np.ndarray) -> None:
    self.progress.epoch(self.label, epoch, self.epochs, metrics, self.work)
    self.workdir.append_metrics([{
        'stack': self.stack.name, 'run': r.name, **plan_lib.run_fields(r), 'epoch': epoch + 1,
        'loss': float(m[0]), 'train_accuracy': float(m[1]),
        **({'test_accuracy': float(m[2])} if len(m) > 2 else {})
    } for r, m in zip(self.stack.runs, metrics)])


def epoch_work(study: Study, devices: int, budget_mb: int) -> dict[str, float]:
  """One epoch of each stack as the progress ETA weighs it: the training FLOPs of the busiest
  device (`estimate`'s time model: members spread over `devices`, frozen layers pruned, a prefix
  computed once within `budget_mb` skipped), so cheap frozen stacks do not inflate the ETA.
  A model whose layers cannot be counted one by one weighs its whole FLOPs in every stack."""
  work = {}
  for shape in stack_shapes(study, budget_mb):
    per_image, _, _ = estimate.shape_flops(shape)
    work[shape.name] = float(math.ceil(shape.k / devices) * shape.train_images * per_image)
  return work


def stack_shapes(study: Study, budget_mb: int) -> list[estimate.StackShape]:
  """Per stack (in order), what its cost follows from, for the dry run's estimate and the
  progress ETA: per-layer FLOPs where the model's layers can be counted one by one
  (`flops.layer_macs`), else the whole model's (`flops.whole_model_flops`)."""
  counts, shapes = {}, []
  for stack in study.stacks:
    run = stack.runs[0]
    classes = len(study.classes(run))
    n_train, n_test = study.sizes[(run.split, run.target)]
    if classes not in counts:
      model = study.make(classes)
      try:
        counts[classes] = dict(macs=flops.layer_macs(model, study.image_shape))
      except ValueError:
        counts[classes] = dict(macs=(), layers=len(study.layer_names),
                               whole=flops.whole_model_flops(model, study.image_shape))
    once = features_lib.planned_nbytes(study.make(classes), stack.structure, len(stack.runs),
                                       n_train, n_test, study.image_shape, budget_mb,
                                       augment=study.config.augment != 'none') is not None
    shapes.append(
        estimate.StackShape(stack.name, len(stack.runs), len(stack.structure.frozen_layers),
                            train_images=n_train, test_images=n_test, prefix_once=once,
                            **counts[classes]))
  return shapes


def _finished(workdir: Workdir, stacks: Sequence[Stack], expected: dict, retrain_corrupt: bool,
              progress: Progress) -> dict[str, list[dict] | None]:
  """Each stack's verified rows, or None to train it; before anything is written or trained, so
  that a bad file stops the run with nothing changed (or, with `retrain_corrupt`, is retrained)."""
  done = {}
  for stack in stacks:
    try:
      done[stack.name] = workdir.finished(stack, expected)
    except Corrupt as e:
      if not retrain_corrupt:
        raise
      progress.log(f'retraining {stack.name}: {e.problem}')
      workdir.discard(stack)
      done[stack.name] = None
  return done


def _finite_members(variables) -> np.ndarray:
  """[K] bool: whether every floating-point variable of member k is finite."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(variables)]
  finite = np.ones(len(leaves[0]), bool)
  for x in leaves:
    if np.issubdtype(x.dtype, np.floating):
      finite &= np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  return finite


def dry_run(config: StudyConfig, workdir: Workdir | None = None, *, image_folder: str | None = None,
            model_fn: modelspec.ModelFn | None = None, options: RunOptions = RunOptions(),
            mesh=None, progress: Progress | None = None) -> str:
  """The plan and what it will cost here (`estimate`), as text: nothing is trained or written;
  `progress` (default: stderr) says how far a long decode of the data is.

  The data is loaded (class names, halves and sizes come from it) and a small stack is trained
  for a few seconds (`estimate.probe`). A `workdir` is only read: a study with other flags is
  refused as a run would, and its finished stacks are left out of the estimate."""
  config = resolve(config, image_folder=image_folder, model_fn=model_fn)
  member_map = trainer.resolve_member_map(options.member_map)
  if workdir is not None:
    workdir.check(config)
  data = _load(config, image_folder, options, progress or Progress())
  subs = config_lib.sweep_studies(config) if config.sweep else [config_lib.SubStudy('', config)]
  planned = {sub.folder: context.build(sub.config, data.train, data.test, model_fn) for sub in subs}
  mesh = mesh or jax.make_mesh((jax.device_count(),), (trainer.MODEL_AXIS,))

  # The probe: the first study's largest stack, in the base structure (every layer trained).
  first = next(iter(planned.values()))
  largest = max(first.stacks, key=lambda s: len(s.runs))
  run = largest.runs[0]
  k = len(first.classes(run))
  model_epoch = first.sizes[(run.split, run.target)][0]
  probe = estimate.probe(first.make(k), context.train_config(first.config, options),
                         trainer.to_device(data.train, data.test, data.mean, data.std),
                         k=mesh.size if member_map == 'map' else len(largest.runs),
                         n_train=model_epoch, mesh=mesh, member_map=member_map)
  lines = [
      f'dry run of study {config.hash()}: nothing trained, nothing written',
      f'data: {len(data.train):,} train / {len(data.test):,} test images, '
      f'{len(data.train.class_names)} classes; {mesh.size} {jax.default_backend()} device(s), '
      f'members under {member_map}'
  ]
  total, n_models, whole = 0.0, 0, False
  for folder, study in planned.items():
    sub_workdir = Workdir(workdir.file(folder)) if workdir is not None and folder else workdir
    done = lambda stack: sub_workdir is not None and os.path.exists(sub_workdir.rows_file(stack))
    shapes = stack_shapes(study, options.feature_budget_mb)
    whole = whole or any(shape.whole is not None for shape in shapes)
    costs = [
        estimate.stack_cost(shape, epochs=study.config.epochs, probe_=probe, done=done(stack))
        for stack, shape in zip(study.stacks, shapes)
    ]
    if folder:
      lines.append(f'sweep study {folder}:')
    lines += estimate.render_stacks(costs, study.config.epochs)
    total += estimate.total_seconds(costs)
    n_models += sum(c.k for c in costs)
  lines += [estimate.whole_model_note(config.model)] if whole else []
  lines += estimate.render_probe(probe, model_epoch)
  lines.append(f'estimate: {estimate.duration(total)} for {n_models} models on this backend '
               f'({mesh.size} {jax.default_backend()} device(s), members under {member_map})')
  return '\n'.join(lines)


def _rows(study: Study, stack: Stack, result: trainer.StackResult) -> list[dict]:
  """The result rows of a stack just trained, one per member."""
  finite = _finite_members(result.variables)
  seconds = result.seconds / len(stack.runs)
  return [{
      **plan_lib.planned_row(study.config, run, study.halves),
      'batchnorm': stack.structure.batchnorm,
      'test_accuracy': float(result.test_accuracy[j]),
      'train_accuracy': float(result.train_accuracy[j]),
      'final_loss': float(result.train_loss[j]),
      'wall_seconds': round(float(seconds), 3),
      'config_hash': study.config.hash(),
      'diverged': rows_lib.is_diverged(float(result.train_loss[j]), bool(finite[j])),
  } for j, run in enumerate(stack.runs)]


def stack_members(runs: Sequence[Run], classes: Sequence[Sequence[int]], train_labels: np.ndarray,
                  test_labels: np.ndarray, per_class: int | None, sources) -> trainer.Members:
  """Each run's keys (from its identity), its target half's train/test indices and label map,
  stacked: the per-member inputs of `trainer.train_stack`."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  stack = lambda xs: jnp.asarray(np.stack(xs))
  return trainer.Members(
      init_keys=jnp.stack([plan_lib.run_key(r, 'init') for r in runs]),
      shuffle_keys=jnp.stack([plan_lib.run_key(r, 'shuffle') for r in runs]),
      train_idx=stack([splits_lib.class_indices(train_labels, c, per_class) for c in classes]),
      test_idx=stack([splits_lib.class_indices(test_labels, c) for c in classes]),
      label_map=stack([splits_lib.label_map(c, num_classes) for c in classes]), sources=sources)


def _stacked_sources(bases: dict, runs: Sequence[Run], layers: Sequence[str]):
  """The grafted layers of each run's source net, stacked. Only those layers: heads of halves
  of different sizes differ in shape and would not stack."""
  prefix = lambda v: {c: {n: sub[n] for n in layers if n in sub} for c, sub in v.items()}
  trees = [prefix(bases[r.source_base()]) for r in runs]
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *trees)
