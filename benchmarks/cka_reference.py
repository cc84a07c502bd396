r"""Host seconds of the layer-similarity analysis per model, with and without `cka.Reference`.

  python -m benchmarks.cka_reference [--models=4] [--images=500]

Random features of the seed net's layer shapes (widths 8, 16, 32 at 32x32: 8192, 8192, 4096,
4096, 2048, 2048 and 5 logits) on `--images` test images (the default --cka_images), each model
compared with one base net: the plain features recompute the base net's Gram matrices for every
model, a Reference computes them once. Prints both timings, their ratio, and whether the values
agree bit for bit.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from jaxtransfer.analysis import cka

MODELS = flags.DEFINE_integer('models', 4, 'Models compared with the one base net.')
IMAGES = flags.DEFINE_integer('images', 500, 'Test images the features are computed on.')
DIMS = (8192, 8192, 4096, 4096, 2048, 2048, 5)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  features = lambda: [rng.normal(size=(IMAGES.value, d)).astype(np.float32) for d in DIMS]
  models, base = [features() for _ in range(MODELS.value)], features()
  start = time.perf_counter()
  plain = [cka.per_layer_cka(m, base) for m in models]
  plain_s = time.perf_counter() - start
  start = time.perf_counter()
  references = [cka.Reference(f) for f in base]
  kept = [cka.per_layer_cka(m, references) for m in models]
  kept_s = time.perf_counter() - start
  same = all(np.array_equal(a, b) for a, b in zip(plain, kept))
  print(f'{MODELS.value} models x {len(DIMS)} layers on {IMAGES.value} images: plain '
        f'{plain_s / MODELS.value:.3f} s a model, with a Reference {kept_s / MODELS.value:.3f} s '
        f'a model (its Gram matrices included): {plain_s / kept_s:.2f}x; bit for bit equal: {same}')


if __name__ == '__main__':
  app.run(main)
