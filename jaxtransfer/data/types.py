"""What every data source shares: the in-memory dataset, the one-line data error, and the
fingerprint that keys the decoded-array cache.

Both sources, image folders (`imagefolder`) and the TFDS builder (`cifar_builder`), return
`ArrayDataset`s, raise `DataError`s and key their caches by `fingerprint`, so these live apart
from either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# Bump when decoding or the array cache layout changes, so old caches are not reused.
CACHE_FORMAT = 2


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """One split held in memory: what every training/eval loop consumes."""

  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  class_names: tuple[str, ...]

  def __post_init__(self):
    # Catch a malformed dataset here rather than deep inside a jitted step.
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise DataError(f'images must be uint8 [N, H, W, C], got {self.images.dtype} '
                      f'{self.images.shape}')
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise DataError(f'labels must be int32 [{len(self.images)}], got {self.labels.dtype} '
                      f'{self.labels.shape}')

  def __len__(self) -> int:
    return len(self.labels)


class DataError(ValueError):
  """Bad input data: a one-line message naming the offending file or folder."""
  def __init__(self, message: str):
    # One line, so the cause shows up intact in logs and test assertions.
    super().__init__(' '.join(str(message).split()))


def fingerprint(obj: Any, files: Sequence[str] = (), root: str = '') -> str:
  """sha256 over a JSON description plus (name, size, mtime) of `files` under `root`."""
  h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
  prefix = len(os.path.join(root, ''))
  for path in files:
    st = os.stat(path)
    h.update(f'\0{path[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}'.encode())
  return h.hexdigest()
