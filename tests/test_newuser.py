"""What a new user meets first: devices, the dry run and the Python API for a model of their own,
refusals of studies that mean nothing, warnings about surprising layers, progress and Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, make_image_folder

OWN_MODEL = '--model=examples/small_vgg.py:SmallVGG'


def cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
  """`python -m experiments.main ARGV` in a fresh process (JAX not started yet), from the repo."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'experiments.main', *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, **kwargs)


def tiny_own(folder, workdir, *extra: str) -> tuple[str, ...]:
  return (OWN_MODEL, f'--image_folder={folder}', f'--workdir={workdir}', '--num_splits=1',
          '--depths=1', '--conditions=BnB', '--epochs=1', '--batch_size=8',
          f'--cache_dir={workdir}-cache', *extra)


def test_an_own_model_trains_on_the_cpu_devices_asked_for(tmp_path):
  make_image_folder(tmp_path / 'images')
  proc = cli(*tiny_own(tmp_path / 'images', tmp_path / 'wd', '--cpu_devices=2'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '2 cpu device(s)' in proc.stderr


def docs_example(name: str = 'api.md') -> str:
  """The first ```python block of docs/`name`."""
  text = open(os.path.join(ROOT, 'docs', name)).read()
  return text.split('```python\n', 1)[1].split('```', 1)[0]


def test_the_python_api_example_in_the_docs_runs_as_written(tmp_path):
  make_image_folder(tmp_path / 'images')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
         'HOME': str(tmp_path)}  # the array cache under ~/.cache
  proc = subprocess.run([sys.executable, '-c', docs_example()], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'dry run of study' in proc.stdout and '# Transferability study report' in proc.stdout
  assert '2 cpu device(s)' in proc.stderr  # progress on stderr by default, on both devices
  assert os.path.exists(tmp_path / 'study-small-vgg' / 'results.csv')


def test_import_jaxtransfer_is_light_and_exports_the_api():
  code = ('import sys, jaxtransfer; assert "jax" not in sys.modules, "jax"; '
          'from jaxtransfer import StudyConfig, RunOptions; assert "jax" not in sys.modules; '
          'from jaxtransfer import run, dry_run, Workdir, Progress, graft, layer_order; '
          'assert "tensorflow" not in sys.modules; print(run.__module__)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == 'jaxtransfer.study.driver'


def test_one_model_has_one_identity_however_it_is_named(image_folder, monkeypatch):
  from examples.small_vgg import SmallVGG
  from jaxtransfer import ConfigError, StudyConfig, resolve
  monkeypatch.chdir(ROOT)
  resolved = [
      resolve(StudyConfig(model='examples/small_vgg.py:SmallVGG'), image_folder=image_folder),
      resolve(StudyConfig(model='./examples/../examples/small_vgg.py:SmallVGG'),
              image_folder=image_folder),
      resolve(StudyConfig(model='examples.small_vgg:SmallVGG'), image_folder=image_folder),
      resolve(StudyConfig(), image_folder=image_folder, model_fn=SmallVGG),
      resolve(StudyConfig(model='examples/small_vgg.py:SmallVGG'), image_folder=image_folder,
              model_fn=SmallVGG),
  ]
  assert {c.model for c in resolved} == {'examples/small_vgg.py:SmallVGG'}
  assert len({c.hash() for c in resolved}) == 1
  for model in ('initial', 'examples/small_vgg.py:without_batchnorm'):
    with pytest.raises(ConfigError, match='name different models'):
      resolve(StudyConfig(model=model), image_folder=image_folder, model_fn=SmallVGG)


def test_dry_run_of_an_own_model_plans_and_estimates(tmp_path):
  make_image_folder(tmp_path / 'images')
  proc = cli(OWN_MODEL, f'--image_folder={tmp_path / "images"}', f'--workdir={tmp_path / "wd"}',
             '--num_splits=1', '--epochs=2', '--batch_size=8', '--cpu_devices=2',
             f'--cache_dir={tmp_path / "cache"}', '--dry_run')
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  # 1 split, depths 1..3: 2 base nets + 4 conditions x 3 depths x 2 targets = 26 models, 2 epochs
  assert '26 models in 7 stacks, 52 model-epochs' in out
  assert 'whole model' in out and 'estimate: ' in out
  assert not os.path.exists(tmp_path / 'wd' / 'study.json')


def test_the_whole_model_flops_are_the_per_layer_count_of_a_layered_model():
  from jaxtransfer.nets import flops, models
  model = models.make_model('final', 3, (4, 8, 16))
  macs = flops.layer_macs(model, (16, 16, 3))
  step, forward = flops.whole_model_flops(model, (16, 16, 3))
  assert forward == flops.forward_flops_per_image(macs)
  # the traced step also holds the first convolution's input gradient, which the per-layer count
  # leaves out (nothing consumes it): 2 x 16 x 16 x 27 x 4 FLOPs
  assert step == flops.training_flops_per_image(macs) + 2 * 16 * 16 * 27 * 4


@pytest.mark.parametrize('classes', [2, 3])
def test_a_study_with_a_half_of_one_class_is_refused(tmp_path, capsys, classes):
  from tests.conftest import run_cli, tiny_args
  make_image_folder(tmp_path / 'images', classes=classes)
  workdir = tmp_path / 'wd'
  assert run_cli(*tiny_args(tmp_path / 'images', workdir, '--num_splits=1')) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'at least 2 classes per half' in err[0], err
  assert f'the data has {classes} classes' in err[0]
  assert not os.path.exists(workdir / 'study.json')


def test_the_report_names_image_folder_data_as_such():
  from jaxtransfer.analysis import report
  from tests.conftest import ROWS
  block = lambda config: report.render(ROWS, config).split('## Configuration', 1)[1]
  shown = block({'dataset': 'cifar10', 'data_fingerprint': 'abc123', 'epochs': 1})
  assert 'dataset = image folder (fingerprint abc123)' in shown and 'cifar10' not in shown
  assert 'dataset = cifar10' in block({'dataset': 'cifar10', 'data_fingerprint': '', 'epochs': 1})


class FlatNet:
  """conv1, bn1, conv2, bn2, head as top-level submodules: its BatchNorms are layers of their own."""
  def __new__(cls, num_classes: int):
    import flax.linen as nn

    class Flat(nn.Module):
      num_classes: int

      @nn.compact
      def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name='conv1')(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn1')(x))
        x = nn.Conv(4, (3, 3), name='conv2')(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn2')(x))
        return nn.Dense(self.num_classes, name='head')(x.mean(axis=(1, 2)))

    return Flat(num_classes)


def test_a_layer_of_normalisation_alone_is_warned_about(caplog):
  from examples.small_vgg import SmallVGG
  from jaxtransfer.nets import modelspec
  with caplog.at_level('WARNING'):
    info = modelspec.inspect(FlatNet, 'tests.test_newuser:FlatNet', (8, 8, 3))
    modelspec.inspect(FlatNet, 'tests.test_newuser:FlatNet', (8, 8, 3))  # said once
    modelspec.inspect(SmallVGG, 'examples/small_vgg.py:SmallVGG', (8, 8, 3))  # blocks: silent
  assert info.layers == ('conv1', 'bn1', 'conv2', 'bn2', 'head')
  lines = [r.getMessage() for r in caplog.records if 'normalisation' in r.getMessage()]
  assert len(lines) == 1, lines
  assert 'layer(s) bn1, bn2 hold only' in lines[0] and 'are conv1 and bn1' in lines[0]
