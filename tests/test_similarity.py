"""A study's layer similarity: every record of cka.json is the float64 linear CKA of its two nets,
recomputed pair by pair from the checkpoints, whichever way the nets were batched."""

import json
import os

import numpy as np

from benchmarks import cka_study
from jaxtransfer.data import datasets
from jaxtransfer.study import context, similarity
from jaxtransfer.study.workdir import Workdir


def test_each_record_is_the_linear_cka_of_its_net_and_its_base_net(finished, image_folder):
  """cka.json as the study wrote it (members under 'map', in turn) and the records of the
  accelerators' path ('vmap', nets batched) against float64, pair by pair."""
  recorded = json.load(open(os.path.join(finished, 'study.json')))['config']
  study_config = context.from_json(recorded, 'study.json')
  load = lambda split: datasets.load(split, image_folder=image_folder, cache_dir=finished + '-cache'
                                    )
  train, test = load('train'), load('test')
  study = context.build(study_config, train, test)
  mean, std = datasets.channel_stats(train.images)
  workdir = Workdir(finished)
  written = json.load(open(os.path.join(finished, 'figures', 'cka.json')))['records']
  batched = similarity.measure(study, workdir, test, mean, std, member_map='vmap')
  key = lambda r: {k: v for k, v in r.items() if k != 'cka'}
  assert [key(r) for r in batched] == [key(r) for r in written]
  nets, images = workdir.members(study.stacks), similarity.test_images(study, test, mean, std)
  for record, other_way in zip(written, batched):
    want = cka_study.float64_cka(study, nets, images, record)
    # 'vmap' runs grouped convolutions, whose rounding differs from one net's (see test_cka).
    for got, atol in ((record['cka'], 1e-5), (other_way['cka'], 1e-4)):
      np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=str(record))
  rows = {r['row'] for r in written}
  assert len(written) == 36 and similarity.OTHER_BASE in rows and 'AnB n=2' in rows
