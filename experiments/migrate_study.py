r"""Migrates study workdirs (or published result folders) that name their image folder by path, or
by names and sizes only.

  python -m experiments.migrate_study W/split0 W/split1 --image_folder=PATH/cifar10-jpeg

Studies used to record `--image_folder` as an absolute path, so the same data elsewhere was
another study; later ones the fingerprint of its names and sizes, blind to an image replaced by
another of the same size. Each study.json given is rewritten to record the content fingerprint of
PATH (every image's bytes), the data wherever it lies now (its class names, or its names and
sizes, must be the recorded ones): the study then resumes from PATH, and pools with shards run on
other machines. A study resumed with --image_folder at the very path it recorded, or on data of
its recorded names and sizes, is migrated without this command.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jaxtransfer.study import migrate

flags.DEFINE_string('image_folder', None, 'Where the studies\' data is now.')
flags.mark_flag_as_required('image_folder')
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('give the study workdirs to migrate')
  try:
    for workdir in argv[1:]:
      print(f'{workdir}: data_fingerprint {migrate.migrate(workdir, FLAGS.image_folder)}')
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
