r"""Runs a transferability study end to end: base nets, transfer grid, results, figures, report.

  python -m experiments.main --flagfile=experiments/configs/seed.flags --workdir=/tmp/seed

Rerunning the same command resumes: finished stacks of models are not retrained. Every study
flag is a field of `jaxtransfer.config.StudyConfig`, every run option one of `config.RunOptions`
(default, help and choices come from there); the flags defined here only say where the data and
the workdir are and how this process uses its devices.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket
import sys
import tempfile
import threading

from absl import app, flags, logging

from jaxtransfer import config as config_lib
from jaxtransfer.study.progress import Progress

# The driver, and JAX with it, is imported by the functions that run a study, not here: `--help`
# and the refusal of a bad flag answer in a second, not after JAX's start-up.

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
flags.DEFINE_integer(
    'coordinator_timeout', 60, 'Seconds (with --distributed) for every process to reach the '
    'coordinator: then each one that has not fails with one line instead of waiting on.')
CLUSTER_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'coordinator_timeout')
# What JAX's errors say when a collective's peer is gone: gloo's connections and the
# coordination service's RPCs.
LOST_PEER_SIGNS = ('Gloo', 'gloo', 'Connection reset', 'Connection closed', 'Broken pipe',
                   'CoordinationService', 'DEADLINE_EXCEEDED', 'UNAVAILABLE')
flags.mark_flag_as_required('workdir')

# --help and --helpfull list the flags by what they are about (absl would list them
# alphabetically, under the module that defines them): the name of each group, in order.
HELP_GROUPS = {
    'study': 'what is trained and compared; a workdir holds one study',
    'data': 'where the data is, and which of it a study uses',
    'run': 'how this run goes; changes no result, so a study may resume under other values',
    'cluster': 'processes across hosts, with --distributed',
}
DATA_FLAGS = ('image_folder', 'dataset', 'data_fingerprint', 'data_dir', 'manual_dir',
              'train_per_class')
CLUSTER_FLAGS = ('distributed', 'coordinator_address', 'num_processes', 'process_id')


def flag_group(name: str) -> str:
  """The help group of one of this tool's flags."""
  if name in DATA_FLAGS:
    return 'data'
  if name in CLUSTER_FLAGS:
    return 'cluster'
  return 'study' if name in {f.name for f in dataclasses.fields(config_lib.StudyConfig)} else 'run'


def grouped_help(full: bool = False) -> str:
  """This tool's flags by group (`HELP_GROUPS`); with `full`, then every other module's."""
  ours = [f.name for f in FLAGS.get_flags_for_module(__name__)]
  for module in ('__main__', sys.argv[0]):
    ours += [f.name for f in FLAGS.get_flags_for_module(module) if f.name not in ours]
  labels = {group: f'{group} flags ({about})' for group, about in HELP_GROUPS.items()}
  for name in ours:
    FLAGS.register_key_flag_for_module(labels[flag_group(name)], FLAGS[name])
  parts = [__doc__.strip()] + [FLAGS.module_help(label) for label in labels.values()]
  if full:
    skip = {__name__, '__main__', sys.argv[0], *labels.values()}
    parts += [FLAGS.module_help(m) for m in sorted(FLAGS.flags_by_module_dict()) if m not in skip]
  else:
    parts.append('\n(--helpfull: also the flags of the libraries, e.g. logging)')
  return '\n'.join(p for p in parts if p)


HELP_ARGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '-helpfull')


def from_flags(cls: type):
  """The config dataclass `cls` with the flags' values (checked as the Python API checks it)."""
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(cls)}
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_from_flags() -> config_lib.StudyConfig:
  """The flags' study, checked and normalised by the same validator as the Python API, and
  identified by its data (the content of --image_folder)."""
  from jaxtransfer.study import driver
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
  # Every program, however small or quick to compile: a rerun or a resume then compiles nothing
  # (within one process `trainer.PROGRAMS` already serves a stack whose programs equal an earlier
  # one's; across processes only this cache does).
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def set_cpu_devices() -> None:
  """--cpu_devices, first thing: loading and checking a model of your own starts JAX, which fixes
  its device count then. In a process where JAX runs already (the CLI called in-process) an
  explicit --cpu_devices it cannot apply is said, not dropped."""
  import jaxtransfer  # pylint: disable=import-outside-toplevel
  try:
    jaxtransfer.use_cpu_devices(FLAGS.cpu_devices)
  except RuntimeError as e:
    if FLAGS['cpu_devices'].present:
      print(f'warning: --cpu_devices ignored: {e}', file=sys.stderr)


def check_cluster_flags() -> None:
  """Cluster flags only mean something with --distributed: refuse them without it."""
  given = [f'--{name}' for name in CLUSTER_FLAGS if FLAGS[name].present]
  if given and not FLAGS.distributed:
    raise ValueError(f'{", ".join(given)} only apply with --distributed: add --distributed to '
                     'run on several processes, or drop them')


def check_coordinator(address: str) -> None:
  """A malformed or unresolvable --coordinator_address, refused at once rather than waited on."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'--coordinator_address={address} is not host:port with a port in 1-65535')
  try:
    socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ValueError(f'--coordinator_address={address}: host {host!r} cannot be resolved '
                     f'({e.strerror}); name the host of process 0') from None


def initialize_distributed() -> None:
  """jax.distributed.initialize within --coordinator_timeout: a process that has not reached
  the coordinator (and every peer) by then prints one line and exits, instead of JAX's own
  wait and abort. CPU hosts use gloo collectives."""
  import jax
  address, timeout = FLAGS.coordinator_address, FLAGS.coordinator_timeout
  if timeout <= 0:
    raise ValueError(f'--coordinator_timeout must be positive, not {timeout}')
  if address:
    check_coordinator(address)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts; else unused
  done = threading.Event()

  def expire() -> None:
    if not done.wait(timeout):
      where = f'at {address}' if address else 'at the auto-detected coordinator'
      if FLAGS.process_id == 0:
        line = (f'process 0 did not meet the other processes {where} within {timeout} s '
                '(--coordinator_timeout): start the same command on every host, and name this '
                'host in --coordinator_address')
      else:
        line = (f'process {"?" if FLAGS.process_id is None else FLAGS.process_id} did not meet '
                f'process 0 {where} within {timeout} s (--coordinator_timeout): start process 0 '
                'on that host, and the same command on every host')
      print(f'error: {line}', file=sys.stderr, flush=True)
      os._exit(2)  # JAX's connect cannot be interrupted

  threading.Thread(target=expire, daemon=True).start()
  # JAX's own limit is later than ours, so that the line above is what a user sees.
  jax.distributed.initialize(address, FLAGS.num_processes, FLAGS.process_id,
                             initialization_timeout=timeout + 30)
  done.set()


def check_same_study(config: config_lib.StudyConfig) -> None:
  """Every process of a distributed run must run the same study: each compares every process's
  config hash right after initialize, so all refuse a mismatch with the same line."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  mine = np.frombuffer(config.hash().encode(), np.uint8)
  hashes = [bytes(h).decode() for h in multihost_utils.process_allgather(mine)]
  if len(set(hashes)) > 1:
    given = ', '.join(f'process {i}: study {h}' for i, h in enumerate(hashes))
    raise ValueError(f'the {jax.process_count()} processes were given different study flags '
                     f'({given}); run the same command on every host')


def lost_peer(error: BaseException) -> str | None:
  """The error a lost process causes in a collective (training, a barrier, the config check),
  as one line naming it; None for any other error. Asking the coordination service which
  process is gone would take an RPC that a lost coordinator answers by aborting this process,
  so with more than two processes the line names the candidates."""
  import jax
  text = str(error)
  if jax.process_count() < 2 or not any(s in text for s in LOST_PEER_SIGNS):
    return None
  others = [str(i) for i in range(jax.process_count()) if i != jax.process_index()]
  who = f'process {others[0]}' if len(others) == 1 else f'one of processes {", ".join(others)}'
  from jaxtransfer import errors
  return (f'lost contact with {who} ({errors.one_line(error)[:200]}): the run stopped; rerun '
          'the same command on every host to resume')


def run(progress: Progress) -> str:
  """The whole study for the parsed flags; returns the report path."""
  # A bad config is refused here, before JAX starts and before the workdir is made; the study
  # the workdir holds is checked under its lock.
  from jaxtransfer.study import campaigns, driver
  from jaxtransfer.study.workdir import Workdir
  config, options = config_from_flags(), from_flags(config_lib.RunOptions)
  enable_compilation_cache()
  if FLAGS.distributed:
    initialize_distributed()
    check_same_study(config)
  workdir = Workdir(FLAGS.workdir)
  if workdir.writer:  # the other processes of a distributed run write nothing there
    check_writable(FLAGS.workdir)
  run_fn = campaigns.run_sweep if config.sweep else driver.run
  return run_fn(config, workdir, image_folder=FLAGS.image_folder, options=options,
                progress=progress)


def dry_run(progress: Progress | None = None) -> str:
  """The plan and its estimate for the parsed flags. The workdir is only read (a study there
  with other flags is refused, its finished stacks left out); the compilation cache stays off,
  so the probe's compile times are those of a first run."""
  from jaxtransfer.study import driver
  from jaxtransfer.study.workdir import Workdir
  config, options = config_from_flags(), from_flags(config_lib.RunOptions)
  return driver.dry_run(config, Workdir(FLAGS.workdir), image_folder=FLAGS.image_folder,
                        options=options, progress=progress)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  set_cpu_devices()  # before anything can start JAX
  progress = Progress(None if FLAGS.quiet else sys.stderr)
  try:
    check_cluster_flags()
    if FLAGS.dry_run:
      print(dry_run(progress), flush=True)
      return
    report = run(progress)
  except (ValueError, OSError) as e:  # ConfigError, DataError, StateError, RowsError, ...
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(interrupted(FLAGS.workdir, FLAGS.dry_run), file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    lost = FLAGS.distributed and lost_peer(e)
    if not lost:
      raise
    print(f'error: {lost}', file=sys.stderr, flush=True)
    os._exit(3)  # not sys.exit: JAX's shutdown would wait on the lost process, then abort
  progress.log(f'done: {report}')


def interrupted(workdir: str, dry: bool) -> str:
  """The one line said on Ctrl-C: what is kept, and how to go on."""
  if dry:
    return 'interrupted: the dry run wrote nothing'
  done = glob.glob(os.path.join(glob.escape(workdir), '**', 'stacks', '*.json'), recursive=True)
  return (f'interrupted: {len(done)} finished stack(s) are kept in {workdir} (a stack in training '
          'is lost); rerun the same command to resume')


if __name__ == '__main__':
  if set(HELP_ARGS) & set(sys.argv[1:]):
    print(grouped_help(full=bool({'--helpfull', '-helpfull'} & set(sys.argv[1:]))))
    sys.exit(0)
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
