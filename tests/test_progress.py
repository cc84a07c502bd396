"""Progress: the ETA counts work, and the driver weighs a stack's epoch by what it costs."""

import io
import math
import types

import numpy as np
import pytest

from jaxtransfer.config import StudyConfig
from jaxtransfer.nets import flops, models
from jaxtransfer.study import context, plan, progress, driver
from jaxtransfer import transfer


def test_eta_counts_work_not_epochs(monkeypatch):
  clock = iter([0.0, 0.0, 10.0, 30.0])  # made, planned, two epochs
  monkeypatch.setattr(progress, 'time', types.SimpleNamespace(perf_counter=lambda: next(clock)))
  stream = io.StringIO()
  p = progress.Progress(stream)
  p.plan(100.0)
  p.skip(20.0)  # a finished stack
  metrics = np.array([[1.0, 0.5], [3.0, 0.7]])
  p.epoch('[1/2 a K=2]', 0, 10, metrics, work=8.0)  # 10 s for 8 of 80 units: 90 s to go
  p.epoch('[1/2 a K=2]', 1, 10, metrics)  # default: one unit per member, 10 units in 30 s
  lines = stream.getvalue().splitlines()
  assert lines[0] == '[1/2 a K=2] epoch 1/10: loss 2.000 train acc 0.600 | ETA 1.5 min'
  assert lines[1].endswith('| ETA 3.5 min')  # 10 of 80 units in 30 s: 70 to go, 210 s


def study_of(config, make, layer_names, sizes, image_shape) -> context.Study:
  """A study of 10 classes without its data (its labels: the sizes say how many)."""
  halves = tuple(plan.make_halves(config, [str(c) for c in range(10)]))
  stacks = tuple(plan.plan(config, layer_names, halves, sizes))
  return context.Study(config, halves, make, tuple(layer_names), stacks, sizes, image_shape,
                       np.zeros(0, np.int32), np.zeros(0, np.int32))


def stacks_of(batchnorm: str, make, layer_names):
  config = StudyConfig(num_splits=1, depths=(1, 3, 6), conditions=('BnB', 'AnB'),
                       frozen_batchnorm=batchnorm)
  return study_of(config, make, layer_names, {(0, h): (2500, 500) for h in 'AB'}, (32, 32, 3))


def test_a_stack_weighs_its_flops_on_the_busiest_device():
  make = lambda k: models.FinalNet(num_classes=k, widths=(8, 16, 32))
  names = transfer.layer_order(make(5), np.zeros((1, 32, 32, 3), np.float32), train=False)
  study = stacks_of('update', make, names)
  stacks = study.stacks
  work = driver.epoch_work(study, devices=2, budget_mb=0)
  by_name = {s.name: s for s in stacks}
  base = next(s for s in stacks if s.is_base)
  macs = flops.layer_macs(make(5))
  # base: 2 members on 2 devices, every layer trained.
  assert work[base.name] == 2500 * flops.training_flops_per_image(macs)
  frozen = {len(s.structure.frozen_layers): work[s.name] for s in stacks if not s.is_base}
  assert sorted(frozen) == [1, 3, 6] and all(
      len(by_name[n].runs) == 4 for n in work if n != base.name)
  # 4 members on 2 devices take two turns; the deeper the frozen prefix, the cheaper a step.
  assert frozen[1] == 2 * 2500 * flops.training_flops_per_image(macs, 1)
  assert frozen[1] > frozen[3] > frozen[6] and frozen[6] < work[base.name]
  # Under `fixed`, a prefix computed once within the budget drops out of every step.
  fixed = stacks_of('fixed', make, names)
  once = driver.epoch_work(fixed, devices=2, budget_mb=4096)
  plain = driver.epoch_work(fixed, devices=2, budget_mb=0)
  deep = next(s.name for s in fixed.stacks if len(s.structure.frozen_layers) == 6)
  prefix = flops.forward_flops_per_image(macs[:6])
  assert once[deep] == pytest.approx(plain[deep] - 2 * 2500 * prefix)


def test_a_model_without_layer_slices_weighs_its_members():
  import flax.linen as nn

  class Plain(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Dense(4)(x.reshape(x.shape[0], -1)))
      return nn.Dense(self.num_classes)(x)

  names = ('Dense_0', 'Dense_1')
  config = StudyConfig(num_splits=1, depths=(1,), conditions=('BnB',))
  study = study_of(config, lambda k: Plain(k), names, {(0, h): (10, 5) for h in 'AB'}, (4, 4, 3))
  work = driver.epoch_work(study, 2, 0)
  # Its layers cannot be counted one by one: every stack weighs the whole model's training FLOPs
  # (frozen layers not pruned, an upper bound), per member image on the busiest device.
  per_image, _ = flops.whole_model_flops(Plain(5), (4, 4, 3))
  assert work == {s.name: float(math.ceil(len(s.runs) / 2) * 10 * per_image) for s in study.stacks}
