"""The seed's recipe in PyTorch, as the 2022 seminar trained it: a reference for jaxtransfer.

FinalNet (3 blocks of [conv3x3 -> BatchNorm -> ReLU] x 2 + max-pool 2x2, flatten -> Linear) with
PyTorch's default initialisation and BatchNorm2d, Adam(1e-3), batch 64 (last partial batch
kept), cross-entropy, a fresh random order every epoch, test accuracy after the last epoch in
eval mode. Channels-last tensors and as many threads as cores: the fastest plain PyTorch CPU loop.

Needs `pip install torch` (not a jaxtransfer dependency). Used by `recipe_parity.py` (accuracy)
and `throughput.py --torch` (speed).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np


def final_net(num_classes: int, widths: Sequence[int] = (8, 16, 32)):
  import torch.nn as tnn
  layers, cin = [], 3
  for w in widths:
    for pool in (False, True):
      layers += [tnn.Conv2d(cin, w, 3, padding=1), tnn.BatchNorm2d(w), tnn.ReLU()]
      layers += [tnn.MaxPool2d(2)] if pool else []
      cin = w
  return tnn.Sequential(*layers, tnn.Flatten(), tnn.LazyLinear(num_classes))


def to_tensor(images_u8: np.ndarray, mean: np.ndarray, std: np.ndarray):
  """uint8 NHWC -> normalised float32 NCHW in channels-last memory (as jaxtransfer normalises)."""
  import torch
  x = (images_u8.astype(np.float32) / 255.0 - mean) / std
  return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def train(seed: int, train_x, train_y, test_x, test_y, num_classes: int, epochs: int = 10,
          batch_size: int = 64, learning_rate: float = 1e-3, on_epoch=None) -> tuple[float, float]:
  """One model, the seed's loop; returns (test accuracy, seconds per epoch).

  `train_x`/`test_x` from `to_tensor`, labels as int64 tensors 0..num_classes-1."""
  import torch
  torch.manual_seed(seed)
  model = final_net(num_classes)
  model(train_x[:2])  # materialise the lazy head before moving to channels-last
  model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
  loss_fn = torch.nn.CrossEntropyLoss()
  generator = torch.Generator().manual_seed(seed)
  n = len(train_y)
  start = time.perf_counter()
  for epoch in range(epochs):
    model.train()
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
      idx = order[i:i + batch_size]
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(train_x[idx]), train_y[idx])
      loss.backward()
      optimizer.step()
    if on_epoch:
      on_epoch(epoch)
  seconds = (time.perf_counter() - start) / epochs
  model.eval()
  with torch.no_grad():
    hits = sum(
        int((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum())
        for i in range(0, len(test_y), 1000))
  return hits / len(test_y), seconds
