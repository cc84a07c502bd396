r"""Runs a transferability study end to end: base nets, transfer grid, results, figures, report.

  python -m experiments.main --flagfile=experiments/configs/seed.flags --workdir=/tmp/seed

Rerunning the same command resumes: finished stacks of models are not retrained. Every study
flag is a field of `jaxtransfer.config.StudyConfig`, every run option one of `config.RunOptions`
(default, help and choices come from there); the flags defined here only say where the data and
the workdir are and how this process uses its devices.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

from absl import app, flags, logging

from jaxtransfer import config as config_lib
from jaxtransfer.study import campaigns, driver
from jaxtransfer.study.progress import Progress
from jaxtransfer.study.workdir import Workdir

FLAGS = flags.FLAGS
INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (128 + SIGINT)


def define_flags(cls: type) -> None:
  """One flag per field of a config dataclass: enums for choices, lists for tuples."""
  for field in dataclasses.fields(cls):
    name, default = field.name, field.default
    help_, choices = field.metadata['help'], field.metadata['choices']
    if isinstance(default, tuple):
      flags.DEFINE_list(name, [str(v) for v in default], help_)
    elif choices:
      flags.DEFINE_enum(name, default, list(choices), help_)
    elif isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, help_)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, help_)
    else:
      flags.DEFINE_string(name, default, help_)


define_flags(config_lib.StudyConfig)
define_flags(config_lib.RunOptions)  # how to run: not part of the study
flags.DEFINE_string(
    'image_folder', None, 'A {train,test}/<class>/*.png|jpg tree to use instead of TFDS '
    '(offline copies, your own datasets; classes may have different numbers of images). The '
    'study records its content (--data_fingerprint), not where it is: moved, it resumes.')
flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, results, figures and report. '
    'Rerunning with the same flags resumes there.')
flags.DEFINE_bool('quiet', False, 'No progress output.')
flags.DEFINE_bool(
    'dry_run', False, 'Print the plan (stacks, models, model-epochs, training FLOPs) and '
    'an estimate of its wall time on this backend from a probe of a few seconds; '
    'trains nothing and writes nothing.')
flags.DEFINE_integer(
    'cpu_devices', min(os.cpu_count() or 1, 8), 'On the CPU backend, split '
    'the cores into this many JAX devices: a stack\'s members then train in '
    'parallel, one per device (faster than one model using all cores).')
flags.DEFINE_bool(
    'distributed', False, 'Span the model axis over several processes/hosts with '
    'jax.distributed.initialize(): run the same command on every host. Without '
    'the three flags below, the cluster is auto-detected (SLURM, Open MPI, TPU '
    'pod slices, ...).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (with --distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --distributed).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --distributed).')
flags.mark_flag_as_required('workdir')


def from_flags(cls: type):
  """The config dataclass `cls` with the flags' values (checked as the Python API checks it)."""
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(cls)}
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_from_flags() -> config_lib.StudyConfig:
  """The flags' study, checked and normalised by the same validator as the Python API, and
  identified by its data (the content of --image_folder)."""
  return driver.resolve(from_flags(config_lib.StudyConfig), image_folder=FLAGS.image_folder)


def check_writable(path: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ValueError(f'--workdir {path} is not writable: {e.strerror}') from None


def enable_compilation_cache() -> None:
  """Reuse compiled steps across stacks with the same structure and across reruns/resumes."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    cache = os.path.expanduser(FLAGS.cache_dir or config_lib.DEFAULT_CACHE_DIR)
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache, 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def set_cpu_devices() -> None:
  import jax
  try:
    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)  # before any device is touched
  except RuntimeError:  # JAX already running in this process (e.g. called from a test)
    pass


def run(progress: Progress) -> str:
  """The whole study for the parsed flags; returns the report path."""
  # A bad config is refused here, before JAX starts and before the workdir is made; the study
  # the workdir holds is checked under its lock.
  config, options = config_from_flags(), from_flags(config_lib.RunOptions)
  check_writable(FLAGS.workdir)
  workdir = Workdir(FLAGS.workdir)
  enable_compilation_cache()
  set_cpu_devices()
  if FLAGS.distributed:
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts; else unused
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  run_fn = campaigns.run_sweep if config.sweep else driver.run
  return run_fn(config, workdir, image_folder=FLAGS.image_folder, options=options,
                progress=progress)


def dry_run() -> str:
  """The plan and its estimate for the parsed flags. The workdir is only read (a study there
  with other flags is refused, its finished stacks left out); the compilation cache stays off,
  so the probe's compile times are those of a first run."""
  config, options = config_from_flags(), from_flags(config_lib.RunOptions)
  set_cpu_devices()
  return driver.dry_run(config, Workdir(FLAGS.workdir), image_folder=FLAGS.image_folder,
                        options=options)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  progress = Progress(None if FLAGS.quiet else sys.stderr)
  try:
    if FLAGS.dry_run:
      print(dry_run(), flush=True)
      return
    report = run(progress)
  except (ValueError, OSError) as e:  # ConfigError, DataError, StateError, RowsError, ...
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    # The rows file is written last, after its checkpoint was read back: a stack cut short is
    # not finished, and everything finished before it is kept.
    print(
        f'interrupted: the stack in progress was not saved, finished stacks are kept in '
        f'{FLAGS.workdir}; rerun the same command to resume', file=sys.stderr)
    sys.exit(INTERRUPTED)
  progress.log(f'done: {report}')


if __name__ == '__main__':
  try:
    app.run(main)
  except SystemExit as e:
    if e.code != INTERRUPTED:
      raise
    # End here: at interpreter shutdown orbax's threads, cut short, would report "cannot schedule
    # new futures after interpreter shutdown", which says nothing the line above does not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)
