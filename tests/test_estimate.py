"""The dry run: the plan and its cost estimate, with nothing trained and nothing written; and the
member map as a run option that is no part of the study."""

import io
import json
import os

import jax
import pytest

from jaxtransfer.study import estimate, plan, driver
from jaxtransfer.nets import flops, models
from jaxtransfer.train import trainer
from jaxtransfer.study.progress import Progress
from jaxtransfer.study.workdir import Workdir
from tests.conftest import run_cli, tiny_args

PROBE = estimate.Probe(member_map='map', devices=2, members=2, images=100, flops_per_image=1000,
                       epoch_seconds=1.0, overhead=6.5)


def test_format_flops():
  assert estimate.format_flops(2.954e15) == '2.95 PFLOP'
  assert estimate.format_flops(40.12e6) == '40.1 MFLOP'
  assert estimate.format_flops(5) == '5 FLOP'


def test_time_model():
  assert PROBE.seconds_per_flop == pytest.approx(1 / (1 * 100 * 1000))  # one member per device
  cost = estimate.stack_cost('s', 3, 1, [10, 20, 30], epochs=2, train_images=50, test_images=7,
                             probe_=PROBE, done=False)
  # Frozen first layer: forward 2*60, weight grads 2*(20+30), input grads 2*30 -> 280 per image;
  # K=3 on 2 devices: 2 members in turn on one of them.
  assert cost.train_flops_per_image == 280
  assert cost.train_flops == 3 * 2 * 50 * 280 and cost.eval_flops == 3 * 7 * 120
  assert cost.seconds == pytest.approx(6.5 + 1e-5 * 2 * (2 * 50 * 280 + 7 * 120))
  assert (cost.trained_layers, cost.layers) == (2, 3)
  done = cost._replace(done=True)
  assert estimate.total_seconds([cost, done]) == cost.seconds


def test_a_probe_on_a_busy_host_says_so():
  cores = os.cpu_count()
  quiet = estimate.render_probe(PROBE._replace(load=0.4 * cores), 1000)
  shared = estimate.render_probe(PROBE._replace(load=0.5 * cores), 1000)
  assert shared[1:] == quiet
  assert shared[0].startswith(f'note: the host was busy when the probe ran (load average '
                              f'{0.5 * cores:.1f} on {cores} cores)')


def test_dry_run_prints_the_plan_and_writes_nothing(image_folder, tmp_path, capsys):
  workdir = tmp_path / 'wd'
  assert run_cli(*tiny_args(image_folder, workdir, '--dry_run')) == 0
  out = capsys.readouterr().out
  assert not os.path.exists(workdir)
  # 2 splits x 2 halves base nets + 2 depths x 4 conditions x 2 splits x 2 targets, one epoch.
  assert '36 models in 5 stacks, 36 model-epochs' in out
  per_image = [
      flops.training_flops_per_image(flops.layer_macs(models.FinalNet(2, (2, 2, 2)), (8, 8, 3)), n)
      for n in (0, 1, 2)
  ]
  # 16 images per member (2 classes x 8): base K=4; at n = 1, 2 a fine-tuned stack (all
  # layers, K=8) and a frozen one (n layers pruned, K=8).
  train_flops = 16 * (4 * per_image[0] + 2 * 8 * per_image[0] + 8 * per_image[1] + 8 * per_image[2])
  assert f'{estimate.format_flops(train_flops)} training (frozen layers pruned)' in out
  for line in ('base-k2', 'frozen-graft-n1-k2', 'finetune-graft-n2-k2', 'probe (measured now',
               'overhead per stack', 'time model:'):
    assert line in out, line
  assert out.strip().splitlines()[-1].startswith('estimate: ')
  assert (f'for 36 models on this backend ({jax.device_count()} cpu device(s), members under '
          'map)') in out


def test_dry_run_reads_a_workdir(finished, image_folder, capsys, monkeypatch):
  monkeypatch.setattr(estimate, 'probe', lambda *args, **kwargs: PROBE)  # measured above
  before = sorted(os.listdir(finished))
  assert run_cli(*tiny_args(image_folder, finished, '--dry_run')) == 0
  out = capsys.readouterr().out
  assert '5 stacks done already' in out and 'estimate: 0 s for 36 models' in out
  assert sorted(os.listdir(finished)) == before
  assert run_cli(*tiny_args(image_folder, finished, '--dry_run', '--epochs=3')) == 2
  assert 'holds a study with other flags (epochs: 1 -> 3)' in capsys.readouterr().err


class Stop(Exception):
  pass


def test_member_map_reaches_the_trainer_and_not_the_study(finished, image_folder, tmp_path,
                                                          monkeypatch):
  seen = []

  def first_stack(*args, member_map=None, **kwargs):
    seen.append(member_map)
    raise Stop

  monkeypatch.setattr(trainer, 'train_stack', first_stack)
  workdir = tmp_path / 'wd'
  with pytest.raises(Stop):
    run_cli(*tiny_args(image_folder, workdir, '--member_map=vmap'))
  assert seen == ['vmap']
  record = lambda path: json.load(open(os.path.join(path, 'study.json')))['config_hash']
  assert record(workdir) == record(finished)  # the same study as without the flag
  stream = io.StringIO()
  config = plan.StudyConfig(widths=(2, 2, 2), num_splits=2, depths=(1, 2), epochs=1, batch_size=8)
  with pytest.raises(Stop):
    driver.run(config, Workdir(str(tmp_path / 'api')), image_folder=image_folder,
               progress=Progress(stream),
               options=plan.RunOptions(member_map='auto', cache_dir=str(tmp_path / 'cache')))
  assert seen == ['vmap', 'map']  # auto on CPU
  lines = stream.getvalue().splitlines()
  first, stack = lines[0], next(line for line in lines if line.startswith('['))
  assert first.endswith(f'{jax.device_count()} cpu device(s), members under map')
  assert stack == '[1/5 base-k2 K=4 map] training'
