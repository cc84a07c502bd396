"""Running a study: data -> plan -> stacks trained (resumably) -> results, figures, report.md.

The plan (`plan`), the workdir (`workdir`), the trainer (`train`) and the layer-similarity
analysis (`similarity`) each live in their own module; this one puts them together.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtransfer.data import cifar, imagefolder
from jaxtransfer import conditions, transfer
from jaxtransfer.study import estimate, migrate
from jaxtransfer.nets import flops, modelspec
from jaxtransfer import files
from jaxtransfer.analysis import plots, report
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.train import trainer
from jaxtransfer.data import datasets as data_lib
from jaxtransfer.train import features as features_lib
from jaxtransfer.study import plan as plan_lib
from jaxtransfer.data import splits as splits_lib
from jaxtransfer.study.plan import RunOptions, Run, Stack, StudyConfig
from jaxtransfer.study.progress import Progress
from jaxtransfer.study.workdir import Corrupt, Workdir


def resolve(config: StudyConfig, *, image_folder: str | None = None,
            model_fn: modelspec.ModelFn | None = None) -> StudyConfig:
  """The study `config` names, as its workdir records it: validated (a model of your own checked
  on the data's image shape) and identified by its data (`image_folder`'s content fingerprint).
  Raises ConfigError or DataError (one line); writes nothing."""
  fingerprint, shape = imagefolder.identify(image_folder) if image_folder else ('',
                                                                                cifar.IMAGE_SHAPE)
  config = plan_lib.validate(config, model_fn=model_fn, image_shape=shape)
  return plan_lib.with_data(config, fingerprint)


def prepare(config: StudyConfig, workdir: Workdir, image_folder: str | None = None) -> StudyConfig:
  """Make sure `workdir` is new or holds the (`resolve`d) study `config`: a record that named
  this very image folder by path is migrated (`migrate.adopt`); nothing else is written."""
  migrate.adopt(workdir.path, image_folder, config.data_fingerprint)
  workdir.check(config)
  return config


def run(config: StudyConfig, workdir: Workdir, *, image_folder: str | None = None,
        model_fn: modelspec.ModelFn | None = None, options: RunOptions = RunOptions(),
        progress: Progress | None = None, mesh=None) -> str:
  """The whole study: data, plan, training (resumable), results, figures, report.md.

  `image_folder`: where the data is, when not a TFDS dataset (the study records its content,
  not its path). `model_fn(num_classes)`: a flax module of your own (`config.model` names it;
  contract in `modelspec`). `options`: how to run it (`plan.RunOptions`: not part of the study).
  The workdir is locked for the whole run, and every finished stack's rows and checkpoint are
  verified before anything is written."""
  config = resolve(config, image_folder=image_folder, model_fn=model_fn)
  progress = progress or Progress(None)
  with workdir.lock(options.wait_for_lock, log=progress.log):
    prepare(config, workdir, image_folder)
    workdir.remove_leftovers()
    return _run_locked(config, workdir, image_folder=image_folder, model_fn=model_fn,
                       options=options, progress=progress, mesh=mesh)


def _run_locked(config: StudyConfig, workdir: Workdir, *, image_folder, model_fn,
                options: RunOptions, progress: Progress, mesh) -> str:
  train_ds, test_ds = _load(config, image_folder, options)
  halves, make, layer_names, stacks = _plan(config, train_ds, test_ds, model_fn)
  workdir.claim(config, train_ds.class_names)
  progress.log(f'study {config.hash()}: {sum(len(s.runs) for s in stacks)} models in '
               f'{len(stacks)} stacks, {len(train_ds)} train / {len(test_ds)} test images, '
               f'{jax.device_count()} {jax.default_backend()} device(s), members under '
               f'{trainer.resolve_member_map(options.member_map)}')
  progress.log(class_counts(train_ds, test_ds, config.train_per_class))
  notes = moot_flags(config, plan_lib.model_info(config, model_fn, train_ds.images.shape[1:]))
  for note in notes:
    progress.log(note)
  mean, std = data_lib.channel_stats(train_ds.images)
  device_data = trainer.to_device(train_ds, test_ds, mean, std)
  rows = train_stacks(config, workdir, make, device_data, train_ds.labels, test_ds.labels, halves,
                      stacks, options=options, progress=progress, mesh=mesh)
  rows_lib.write(workdir.path, rows)
  paths = plots.write_all(rows, workdir.path)
  diverged = [r for r in rows if r['diverged']]
  metrics = workdir.read_metrics()
  if metrics:
    paths += plots.curves_figure(metrics, workdir.file('figures', 'curves'))
  if config.cka_images:
    from jaxtransfer.study import similarity  # only when asked
    paths += similarity.write(config, workdir, stacks, halves, make, layer_names, test_ds, mean,
                              std, exclude={rows_lib.run_id(r) for r in diverged})
  figures = [os.path.relpath(p, workdir.path) for p in paths]
  path = workdir.file('report.md')
  files.write_text(
      path,
      report.render(rows, config.to_json(), figures, class_names=train_ds.class_names,
                    note=' '.join(notes), metrics=metrics))
  if diverged:
    logging.warning(
        '%d of %d models diverged (non-finite loss or weights), e.g. %s: results.csv flags them '
        '(diverged=True); report.md lists them and leaves them out of its tables, figures and '
        'claims', len(diverged), len(rows), rows_lib.describe(rows_lib.run_id(diverged[0])))
  return path


def _load(config: StudyConfig, image_folder: str | None, options: RunOptions):
  """(train, test) `ArrayDataset`s of the study's data (through the decoded-array cache)."""
  load = lambda split: data_lib.load(split, dataset=config.dataset, image_folder=image_folder,
                                     data_dir=options.data_dir, manual_dir=options.manual_dir,
                                     cache_dir=options.cache_dir)
  return load('train'), load('test')


def _plan(config: StudyConfig, train_ds, test_ds, model_fn: modelspec.ModelFn | None = None):
  """(halves, model maker by class count, layer names, stacks) of a study on this data."""
  halves = plan_lib.make_halves(config, train_ds.class_names)
  make = modelspec.factory(config.model, config.widths, config.layer_defaults, model_fn)
  example = np.zeros((1,) + train_ds.images.shape[1:], np.float32)
  layer_names = transfer.layer_order(make(2), example, train=False)
  sizes = half_sizes(config, halves, train_ds.labels, test_ds.labels)
  return halves, make, layer_names, plan_lib.plan(config, layer_names, halves, sizes)


def half_sizes(config: StudyConfig, halves: Sequence[splits_lib.Split], train_labels: np.ndarray,
               test_labels: np.ndarray) -> dict[tuple[int, str], tuple[int, int]]:
  """(train, test) examples of every half of every split, as its members use them (the train
  images capped at --train_per_class per class): the shapes `plan.plan` stacks by."""
  per_class = config.train_per_class or None
  return {(s, half): (len(splits_lib.class_indices(train_labels, classes, per_class)),
                      len(splits_lib.class_indices(test_labels, classes)))
          for s, pair in enumerate(halves) for half, classes in zip('AB', pair)}


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


def train_stacks(config: StudyConfig, workdir: Workdir, make: Callable[[int], Any],
                 data: trainer.DeviceData, train_labels: np.ndarray, test_labels: np.ndarray,
                 halves: Sequence[splits_lib.Split], stacks: list[Stack], *,
                 options: RunOptions = RunOptions(), progress: Progress, mesh=None) -> list[dict]:
  """Train every unfinished stack in order; return all rows (finished ones read back, after
  every one was verified, with this study's config hash: a study renamed by a change of its
  identity fields, e.g. migrated to a data fingerprint, keeps its stacks).

  A stack whose frozen prefix is a fixed function of the image trains on the prefix's output,
  computed once, when it fits in `options.feature_budget_mb` (`features.planned_nbytes`)."""
  per_class = config.train_per_class or None
  tconfig = config.train_config()
  member_map = trainer.resolve_member_map(options.member_map)
  done = _finished(workdir, stacks, plan_lib.expected_rows(config, plan_lib.runs(config), halves),
                   options.retrain_corrupt, progress)
  work = epoch_work(stacks, make, halves, half_sizes(config, halves, train_labels,
                                                     test_labels), data.train_images.shape[1:],
                    mesh.size if mesh else jax.device_count(), options.feature_budget_mb)
  progress.plan(sum(work.values()) * config.epochs)
  all_rows, bases = [], None
  for i, stack in enumerate(stacks):
    rows = done[stack.name]
    label = f'[{i + 1}/{len(stacks)} {stack.name} K={len(stack.runs)} {member_map}]'
    if rows is not None:
      rows = [{**r, 'config_hash': config.hash()} for r in rows]
      progress.skip(work[stack.name] * config.epochs)
      progress.log(f'{label} done, skipped')
    else:
      sources = None
      if stack.structure.graft_layers:
        bases = bases or workdir.members(stacks, base_only=True)
        sources = _stacked_sources(bases, stack.runs, stack.structure.graft_layers)
      classes = [plan_lib.half_classes(halves, r.split, r.target) for r in stack.runs]
      members = stack_members(stack.runs, classes, train_labels, test_labels, per_class, sources)
      model = make(len(classes[0]))
      features = None
      size = features_lib.planned_nbytes(model, stack.structure, *members.train_idx.shape,
                                         members.test_idx.shape[1], data.train_images.shape[1:],
                                         options.feature_budget_mb)
      if size is not None:
        features, members = features_lib.compute(model, members, data,
                                                 len(stack.structure.frozen_layers))
        label += f' (prefix features: {size / 2**20:.0f} MB)'
      progress.log(f'{label} training')

      def on_epoch(epoch, metrics, stack=stack, label=label):
        progress.epoch(label, epoch, config.epochs, metrics, work[stack.name])
        workdir.append_metrics([{
            'stack': stack.name, 'run': r.name, **plan_lib.run_fields(r), 'epoch': epoch + 1,
            'loss': float(m[0]), 'train_accuracy': float(m[1]),
            **({'test_accuracy': float(m[2])} if len(m) > 2 else {})
        } for r, m in zip(stack.runs, metrics)])

      result = trainer.train_stack(model, stack.structure, tconfig, data, members, mesh=mesh,
                                   member_map=member_map, on_epoch=on_epoch, features=features,
                                   eval_every_epoch=options.eval_every_epoch)
      finite = _finite_members(result.variables)
      rows = [
          _row(config, halves, r, stack.structure, result.test_accuracy[j],
               result.train_accuracy[j], result.train_loss[j], result.seconds / len(stack.runs),
               finite[j]) for j, r in enumerate(stack.runs)
      ]
      saved = time.perf_counter()
      workdir.save(stack, result.variables, rows)
      phases = {**result.timings, 'save': time.perf_counter() - saved}
      progress.log(f'{label} done in {result.seconds + phases["save"]:.1f} s: ' +
                   ', '.join(f'{phase} {seconds:.1f} s' for phase, seconds in phases.items()))
      if stack.is_base:
        bases = None  # re-read with the new stack included
    all_rows.extend(rows)
  return all_rows


def epoch_work(stacks: Sequence[Stack], make: Callable[[int], Any],
               halves: Sequence[splits_lib.Split], sizes: dict[tuple[int, str], tuple[int, int]],
               image_shape: Sequence[int], devices: int, budget_mb: int) -> dict[str, float]:
  """One epoch of each stack as the progress ETA weighs it: the training FLOPs of the busiest
  device (`estimate`'s time model: members spread over devices, frozen layers pruned, a prefix
  computed once skipped), so cheap frozen stacks do not inflate the ETA. Models whose layers
  cannot be counted (`flops.layer_macs`) weigh one unit per member."""
  try:
    shapes = list(stack_shapes(stacks, make, halves, sizes, image_shape, budget_mb))
  except ValueError:
    return {s.name: float(len(s.runs)) for s in stacks}
  work = {}
  for stack, macs, n_train, _, once in shapes:
    per_image, _, _ = estimate.member_flops_per_image(macs, len(stack.structure.frozen_layers),
                                                      once)
    work[stack.name] = float(math.ceil(len(stack.runs) / devices) * n_train * per_image)
  return work


def stack_shapes(stacks: Sequence[Stack], make: Callable[[int], Any],
                 halves: Sequence[splits_lib.Split], sizes: dict[tuple[int, str], tuple[int, int]],
                 image_shape: Sequence[int], budget_mb: int):
  """Per stack, what its cost follows from: (stack, layer MACs of its model, a member's train
  and test images, prefix computed once?), for the dry run's estimate and the progress ETA.
  Raises ValueError for a model whose layers cannot be counted (`flops.layer_macs`)."""
  macs = {}
  for stack in stacks:
    run = stack.runs[0]
    classes = len(plan_lib.half_classes(halves, run.split, run.target))
    n_train, n_test = sizes[(run.split, run.target)]
    if classes not in macs:
      macs[classes] = flops.layer_macs(make(classes), image_shape)
    once = features_lib.planned_nbytes(make(classes), stack.structure, len(stack.runs), n_train,
                                       n_test, image_shape, budget_mb) is not None
    yield stack, macs[classes], n_train, n_test, once


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
            mesh=None) -> str:
  """The plan and what it will cost here (`estimate`), as text: nothing is trained or written.

  The data is loaded (class names, halves and sizes come from it) and a small stack is trained
  for a few seconds (`estimate.probe`). A `workdir` is only read: a study with other flags is
  refused as a run would, and its finished stacks are left out of the estimate."""
  config = resolve(config, image_folder=image_folder, model_fn=model_fn)
  member_map = trainer.resolve_member_map(options.member_map)
  if workdir is not None:
    workdir.check(config)
  train_ds, test_ds = _load(config, image_folder, options)
  studies = plan_lib.sweep_studies(config) if config.sweep else [('', config)]
  planned = [(folder, sub, *_plan(sub, train_ds, test_ds, model_fn)) for folder, sub in studies]
  mesh = mesh or jax.make_mesh((jax.device_count(),), (trainer.MODEL_AXIS,))

  sizes = lambda sub, halves: half_sizes(sub, halves, train_ds.labels, test_ds.labels)

  # The probe: the first study's largest stack, in the base structure (every layer trained).
  _, sub, halves, make, _, stacks = planned[0]
  largest = max(stacks, key=lambda s: len(s.runs))
  run = largest.runs[0]
  k = len(plan_lib.half_classes(halves, run.split, run.target))
  model_epoch = sizes(sub, halves)[(run.split, run.target)][0]
  mean, std = data_lib.channel_stats(train_ds.images)
  probe = estimate.probe(make(k), sub.train_config(),
                         trainer.to_device(train_ds, test_ds, mean, std),
                         k=mesh.size if member_map == 'map' else len(largest.runs),
                         n_train=model_epoch, mesh=mesh, member_map=member_map)
  lines = [
      f'dry run of study {config.hash()}: nothing trained, nothing written',
      f'data: {len(train_ds):,} train / {len(test_ds):,} test images, '
      f'{len(train_ds.class_names)} classes; {mesh.size} {jax.default_backend()} device(s), '
      f'members under {member_map}'
  ]
  total, n_models = 0.0, 0
  for folder, sub, halves, make, _, stacks in planned:
    sub_workdir = Workdir(workdir.file(folder)) if workdir is not None and folder else workdir
    costs = []
    for stack, macs, n_train, n_test, once in stack_shapes(stacks, make, halves, sizes(sub, halves),
                                                           train_ds.images.shape[1:],
                                                           options.feature_budget_mb):
      costs.append(
          estimate.stack_cost(
              stack.name, len(stack.runs), len(stack.structure.frozen_layers), macs,
              epochs=sub.epochs, train_images=n_train, test_images=n_test, probe_=probe,
              done=sub_workdir is not None and os.path.exists(sub_workdir.rows_file(stack)),
              prefix_once=once))
    if folder:
      lines.append(f'sweep study {folder}:')
    lines += estimate.render_stacks(costs, sub.epochs)
    total += estimate.total_seconds(costs)
    n_models += sum(c.k for c in costs)
  lines += estimate.render_probe(probe, model_epoch)
  lines.append(f'estimate: {estimate.duration(total)} for {n_models} models on this backend '
               f'({mesh.size} {jax.default_backend()} device(s), members under {member_map})')
  return '\n'.join(lines)


def _row(config: StudyConfig, halves, run: Run, structure: trainer.Structure, test_acc, train_acc,
         loss, seconds, finite: bool) -> dict:
  return {
      **plan_lib.planned_row(config, run, halves),
      'batchnorm': structure.batchnorm,
      'test_accuracy': float(test_acc),
      'train_accuracy': float(train_acc),
      'final_loss': float(loss),
      'wall_seconds': round(float(seconds), 3),
      'config_hash': config.hash(),
      'diverged': rows_lib.is_diverged(float(loss), bool(finite)),
  }


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
