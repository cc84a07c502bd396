r"""Runs a transferability study end to end: base nets, transfer grid, results, figures, report.

  python -m experiments.main --flagfile=experiments/configs/seed.flags --workdir=/tmp/seed

Rerunning the same command resumes: finished stacks of models are not retrained.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags, logging

from jaxtransfer import study

FLAGS = flags.FLAGS
_DEFAULTS = study.StudyConfig()

# Data.
flags.DEFINE_string('dataset', 'cifar10', 'TFDS dataset name (our TF-free builder): cifar10 or '
                    'cifar100. Ignored when --image_folder is given.')
flags.DEFINE_string('data_dir', None, 'Where TFDS datasets are prepared (default: ~/tensorflow_'
                    'datasets).')
flags.DEFINE_string('manual_dir', None, 'Folder holding a local copy of the official archive '
                    '(e.g. cifar-10-python.tar.gz); used instead of downloading.')
flags.DEFINE_string('image_folder', None, 'A {train,test}/<class>/*.png|jpg tree to use instead '
                    'of TFDS (offline copies, your own datasets).')
flags.DEFINE_string('cache_dir', None, 'Where decoded arrays are cached (default: ~/.cache/'
                    'jaxtransfer).')
flags.DEFINE_integer('train_per_class', 0, 'Use only the first N training images of each class '
                     '(0 = all). For quick runs and data-size sweeps.')
# Model.
flags.DEFINE_enum('model', 'final', ['initial', 'final'], "The seed's network: 'initial' "
                  '(8 convs of 3 filters, no pooling) or \'final\' (3 conv-BN blocks + pools).')
flags.DEFINE_list('widths', list(map(str, _DEFAULTS.widths)), "Filters of the final net's three "
                  'blocks; the default 8,16,32 gives the seed\'s 512 features into the head.')
# Protocol.
flags.DEFINE_enum('halves', 'random', ['random', 'dissimilar'], "How classes split into A and "
                  "B: 'random' halves, or 'dissimilar': man-made (A) against natural (B) "
                  'classes of CIFAR-10 (4 vs 6) or CIFAR-100 (by superclass, 30 vs 70).')
flags.DEFINE_integer('num_splits', 5, 'Random class splits into halves A and B.')
flags.DEFINE_integer('split_seed', 0, 'Seed of the random class splits.')
flags.DEFINE_list('splits', [], 'Train only these splits (0-based indices into the '
                  '--num_splits splits; default all): one shard of a study, e.g. per machine or '
                  'session. experiments/pool.py pools shards into the whole study.')
flags.DEFINE_list('depths', [], 'Transferred depths n (layers copied from a base net); default '
                  '1..L-1 for a net of L layers.')
flags.DEFINE_list('conditions', list(_DEFAULTS.conditions), 'Any of BnB (selffer, frozen), BnB+ '
                  '(selffer, fine-tuned), AnB (transfer, frozen), AnB+ (transfer, fine-tuned), '
                  'random (first n layers random and frozen).')
flags.DEFINE_enum('directions', 'both', ['AtoB', 'both'], "AtoB: only B is the target half; "
                  'both: each half is the target in turn (the paper pooled AnB and BnA).')
flags.DEFINE_integer('seeds', 1, 'Independent runs (init and data order) per condition.')
flags.DEFINE_enum('frozen_batchnorm', 'update', ['update', 'fixed'], 'BatchNorm in frozen '
                  "layers: 'update' keeps tracking batch statistics (the seed's PyTorch "
                  "behaviour); 'fixed' uses the transferred running statistics.")
# Training.
flags.DEFINE_integer('epochs', 10, 'Training epochs for every model.')
flags.DEFINE_integer('batch_size', 64, 'Minibatch size.')
flags.DEFINE_enum('optimizer', 'adam', ['adam', 'sgd'], 'adam (AdamW) or sgd with momentum 0.9.')
flags.DEFINE_float('learning_rate', 1e-3, 'Learning rate.')
flags.DEFINE_float('weight_decay', 0.0, 'Decoupled weight decay.')
flags.DEFINE_string('sweep', '', 'Repeat the study for several values of one flag, e.g. '
                    'epochs=10,30,100 or train_per_class=500,1000,2500,5000: one sub-study per '
                    'value in WORKDIR/<flag>-<value>/, plus sweep.md and a sweep figure.')
flags.DEFINE_integer('cka_images', 500, 'Target test images for the layer-similarity (linear '
                     'CKA) heat-map; 0 skips it.')
# Run.
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, results, figures and report. '
                    'Rerunning with the same flags resumes there.')
flags.DEFINE_bool('quiet', False, 'No progress output.')
flags.DEFINE_integer('cpu_devices', min(os.cpu_count() or 1, 8), 'On the CPU backend, split '
                     'the cores into this many JAX devices: a stack\'s members then train in '
                     'parallel, one per device (faster than one model using all cores).')
flags.DEFINE_bool('distributed', False, 'Span the model axis over several processes/hosts with '
                  'jax.distributed.initialize(): run the same command on every host. Without '
                  'the three flags below, the cluster is auto-detected (SLURM, Open MPI, TPU '
                  'pod slices, ...).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (with --distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --distributed).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --distributed).')
flags.mark_flag_as_required('workdir')


class UsageError(ValueError):
  """Bad flags or environment; reported as one line."""


def _ints(name: str, values) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise UsageError(f'--{name} must be a list of integers, got {",".join(values)}') from None


def config_from_flags(num_layers_of) -> study.StudyConfig:
  widths = _ints('widths', FLAGS.widths)
  if FLAGS.model == 'final' and (len(widths) != 3 or min(widths) < 1):
    raise UsageError(f'--widths needs three positive integers, got {",".join(FLAGS.widths)}')
  num_layers = num_layers_of(FLAGS.model, widths)
  depths = _ints('depths', FLAGS.depths) or tuple(range(1, num_layers))
  bad = [d for d in depths if not 1 <= d < num_layers]
  if bad:
    raise UsageError(f'--depths {bad} out of range: the {FLAGS.model} net has {num_layers} '
                     f'layers, so n must be in 1..{num_layers - 1}')
  conditions = tuple(FLAGS.conditions)
  if not conditions:
    raise UsageError('--conditions is empty: give at least one of ' + ','.join(study.CONDITIONS))
  unknown = [c for c in conditions if c not in study.CONDITIONS]
  if unknown:
    raise UsageError(f'--conditions: unknown {unknown}; expected any of {list(study.CONDITIONS)}')
  for name in ('num_splits', 'seeds', 'epochs', 'batch_size'):
    if getattr(FLAGS, name) < 1:
      raise UsageError(f'--{name} must be at least 1, got {getattr(FLAGS, name)}')
  if (FLAGS.cka_images < 0 or FLAGS.train_per_class < 0 or FLAGS.learning_rate <= 0
      or FLAGS.weight_decay < 0):
    raise UsageError('--cka_images, --train_per_class and --weight_decay must be >= 0, '
                     '--learning_rate > 0')
  chosen = tuple(sorted(set(_ints('splits', FLAGS.splits))))
  if any(not 0 <= s < FLAGS.num_splits for s in chosen):
    raise UsageError(f'--splits {",".join(FLAGS.splits)}: indices must be in 0..'
                     f'{FLAGS.num_splits - 1} (--num_splits={FLAGS.num_splits})')
  if chosen == tuple(range(FLAGS.num_splits)):
    chosen = ()  # all of them: the same study as no --splits
  return study.StudyConfig(
      dataset=FLAGS.dataset,
      image_folder=os.path.abspath(FLAGS.image_folder) if FLAGS.image_folder else '',
      model=FLAGS.model, widths=widths, halves=FLAGS.halves, num_splits=FLAGS.num_splits,
      split_seed=FLAGS.split_seed, splits=chosen,
      depths=tuple(sorted(set(depths))), conditions=conditions, directions=FLAGS.directions,
      seeds=FLAGS.seeds, frozen_batchnorm=FLAGS.frozen_batchnorm, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
      weight_decay=FLAGS.weight_decay, train_per_class=FLAGS.train_per_class,
      sweep=FLAGS.sweep, cka_images=FLAGS.cka_images)


def check_writable(path: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise UsageError(f'--workdir {path} is not writable: {e.strerror}') from None


def enable_compilation_cache() -> None:
  """Reuse compiled steps across stacks with the same structure and across reruns/resumes."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    cache = FLAGS.cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'jaxtransfer')
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache, 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def run(log) -> str:
  """The whole study for the parsed flags; returns the report path."""
  config = config_from_flags(study.num_layers)
  check_writable(FLAGS.workdir)
  workdir = study.Workdir(FLAGS.workdir)
  workdir.check(config)
  enable_compilation_cache()
  import jax
  try:
    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)  # before any device is touched
  except RuntimeError:  # JAX already running in this process (e.g. called from a test)
    pass
  if FLAGS.distributed:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts; else unused
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if config.sweep:
    study.parse_sweep(config.sweep)  # fail before any work
  run_fn = study.run_sweep if config.sweep else study.run
  return run_fn(config, workdir, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                cache_dir=FLAGS.cache_dir, log=log)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  log = None if FLAGS.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
  try:
    report = run(log)
  except (ValueError, OSError) as e:  # UsageError, DataError, workdir mismatch, ...
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if log:
    log(f'done: {report}')


if __name__ == '__main__':
  app.run(main)
