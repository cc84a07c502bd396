r"""Seconds of a finished study's layer-similarity analysis, and its values against float64.

  python -m benchmarks.cka_study --workdir=DIR [--image_folder=PATH] [--member_map=auto]

Runs `similarity.measure` on the study in DIR (its checkpoints, its data) twice, the first time
compiling, and then recomputes every record pair by pair in float64 with the public
`cka.layer_features` and `cka.per_layer_cka` (each pair's base net recomputed: the plain way).
Prints the models, each path's seconds and the largest difference of a CKA value. Writes nothing.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from jaxtransfer.analysis import cka
from jaxtransfer.data import datasets
from jaxtransfer.study import context, similarity
from jaxtransfer.study.plan import Run
from jaxtransfer.study.workdir import Workdir
from jaxtransfer.train import trainer

FLAGS = flags.FLAGS


def float64_cka(study: context.Study, nets: dict, images: dict, record: dict) -> np.ndarray:
  """[L] CKA of a cka.json `record`'s two nets, the plain way: both nets' layer features on the
  record's test images, compared in float64 (`cka.per_layer_cka`); the oracle of the device's path.
  `nets`: `Workdir.members`; `images`: `similarity.test_images`."""
  run = Run(*(record[k] for k in ('split', 'target', 'condition', 'depth', 'seed')))
  base = lambda half: Run(run.split, half, 'base', 0, run.seed)
  net = base('A' if run.target == 'B' else 'B') if record['row'] == similarity.OTHER_BASE else run
  feats = lambda x: cka.layer_features(study.make(len(study.classes(x))), nets[x], images[
      (run.split, run.target)], study.layer_names)
  return cka.per_layer_cka(feats(net), feats(base(run.target)))


def main(argv):
  del argv
  recorded = json.load(open(os.path.join(FLAGS.workdir, 'study.json')))['config']
  config = context.from_json(recorded, 'study.json')
  load = lambda split: datasets.load(split, dataset=config.dataset, image_folder=FLAGS.image_folder)
  train, test = load('train'), load('test')
  study = context.build(config, train, test)
  mean, std = datasets.channel_stats(train.images)
  workdir, member_map = Workdir(FLAGS.workdir), trainer.resolve_member_map(FLAGS.member_map)
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    records = similarity.measure(study, workdir, test, mean, std, member_map=member_map)
    seconds.append(time.perf_counter() - start)
  nets, images = workdir.members(study.stacks), similarity.test_images(study, test, mean, std)
  start = time.perf_counter()
  worst = 0.0
  for r in records:
    want = float64_cka(study, nets, images, r)
    got = np.array(r['cka'])
    assert np.array_equal(np.isnan(got), np.isnan(want)), r
    worst = max(worst, float(np.nanmax(np.abs(got - want), initial=0.0)))
  plain = time.perf_counter() - start
  print(
      f'{len(records)} CKA records ({len(study.layer_names)} layers, members under {member_map}): '
      f'one program per shape {seconds[0]:.1f} s cold, {seconds[1]:.1f} s warm (loading the '
      f'checkpoints included); float64 pair by pair {plain:.1f} s; largest difference {worst:.1e}')


if __name__ == '__main__':
  # Defined here, not on import: the tests import `float64_cka` beside experiments.main's flags.
  flags.DEFINE_string('workdir', None, 'A finished study.', required=True)
  flags.DEFINE_string('image_folder', None, 'Its --image_folder.')
  flags.DEFINE_string('member_map', 'auto', "map, vmap or auto (the platform's).")
  app.run(main)
