"""Shared fixtures: a persistent XLA compilation cache (tests compile the same small steps
many times) and a tiny generated image-folder dataset."""

import os

import jax
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('xla-cache'))
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path  # for subprocesses
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return path


def make_image_folder(root, num_classes=4, train_per_class=8, test_per_class=4, size=8, seed=0):
  """{train,test}/class<k>/*.png with class-dependent brightness, so classes are learnable."""
  rng = np.random.default_rng(seed)
  for split, n in (('train', train_per_class), ('test', test_per_class)):
    for c in range(num_classes):
      folder = os.path.join(root, split, f'class{c}')
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        pixels = rng.integers(0, 80, (size, size, 3)) + 40 * c
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f'{i:04d}.png'))
  return str(root)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
  return make_image_folder(tmp_path_factory.mktemp('folder'))
