"""What a new user meets first: devices, the dry run and the Python API for a model of their own,
refusals of studies that mean nothing, warnings about surprising layers, progress and Ctrl-C."""

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, make_image_folder

OWN_MODEL = '--model=examples/small_vgg.py:SmallVGG'


def cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
  """`python -m experiments.main ARGV` in a fresh process (JAX not started yet), from the repo."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'experiments.main', *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, **kwargs)


def tiny_own(folder, workdir, *extra: str) -> tuple[str, ...]:
  """The study of the docs' Python API example (below) as flags: the two runs compile the same
  programs, so the second finds them in the tests' compilation cache."""
  return (OWN_MODEL, f'--image_folder={folder}', f'--workdir={workdir}', '--num_splits=1',
          '--depths=1', '--conditions=BnB', '--epochs=1', '--eval_every_epoch',
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
          'import experiments.main; assert "jax" not in sys.modules, "jax from the CLI"; '
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


def test_ctrl_c_says_what_is_kept_and_how_to_resume(tmp_path):
  from tests.conftest import tiny_args
  make_image_folder(tmp_path / 'images')
  args = [a for a in tiny_args(tmp_path / 'images', tmp_path / 'wd') if a != '--quiet']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.main', *args, '--epochs=150'],
                          cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  lines = []
  for line in proc.stderr:  # until the first stack is finished and the second one is training
    lines.append(line)
    if line.startswith('[2/') and 'epoch 1/' in line:
      break
  proc.send_signal(signal.SIGINT)  # in its epochs (a second or two of them), not its compile
  rest = proc.stderr.read()
  assert proc.wait(timeout=120) == 130, ''.join(lines) + rest
  assert 'Traceback' not in rest, rest
  last = rest.strip().splitlines()[-1]
  assert last == (f'interrupted: 1 finished stack(s) are kept in {tmp_path / "wd"} (a stack in '
                  'training is lost); rerun the same command to resume')


def test_a_long_decode_says_how_far_it_is(tmp_path, monkeypatch):
  import io
  import numpy as np
  from PIL import Image
  from jaxtransfer.data import imagefolder
  from jaxtransfer.study import driver
  from jaxtransfer.study.progress import Progress
  paths = []
  for i in range(600):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(np.full((2, 2, 3), i % 256, np.uint8)).save(paths[-1])
  monkeypatch.setattr(imagefolder, 'PROGRESS_SECONDS', 0.0)
  stream = io.StringIO()
  with driver._data_progress(Progress(stream)):
    images = imagefolder._decode_images(paths, 1, 'the train split')
  assert images[:, 0, 0, 0].tolist() == [i % 256 for i in range(600)]
  lines = [line.split(', ')[0] for line in stream.getvalue().splitlines()]
  assert lines == [
      'decoding the train split: 256 of 600 images (42%)',
      'decoding the train split: 512 of 600 images (85%)'
  ]
  imagefolder._decode_images(paths, 1)  # no driver listening: nothing shown, nothing kept
  assert stream.getvalue().count('\n') == 2
  # in worker processes, which count what they decoded for the parent to say
  monkeypatch.setattr(imagefolder, '_MIN_IMAGES_PER_WORKER', 100)
  stream = io.StringIO()
  with driver._data_progress(Progress(stream)):
    parallel = imagefolder._decode_images(paths, 2, 'the train split')
  assert (parallel == images).all()
  for line in stream.getvalue().splitlines():
    done = int(line.split(': ')[1].split(' of ')[0].replace(',', ''))
    assert done in (0, 256, 512) and line.startswith('decoding the train split: ')


def test_curves_after_one_epoch_show_a_point_per_depth(tmp_path, monkeypatch):
  from jaxtransfer.analysis import plots
  records = [{
      'stack': 's', 'run': f'{c}{d}{k}', 'condition': c, 'depth': d, 'epoch': 1, 'loss': 1.0,
      'train_accuracy': 0.5 + 0.1 * d + 0.01 * k, 'test_accuracy': 0.4
  } for c, ds in (('base', (0,)), ('BnB', (1, 2)), ('AnB', (1, 2))) for d in ds for k in range(2)]
  figures = []
  monkeypatch.setattr(plots, 'save_figure', lambda fig, stem: figures.append(fig) or [stem])
  assert plots.curves_figure(records, str(tmp_path / 'curves')) == [str(tmp_path / 'curves')]
  axes = [ax for ax in figures[0].axes if ax.axison]
  assert len(axes) == 3
  for ax in axes:
    points = [line for line in ax.get_lines() if line.get_marker() not in (None, 'None', '')]
    assert points and all(len(line.get_xdata()) == 1 for line in points)
    assert ax.get_xlim() == (0.5, 1.5)
    assert [t for t in ax.get_xticks() if 0.5 <= t <= 1.5] == [1.0]
  assert 'one epoch' in figures[0]._suptitle.get_text()


def test_help_lists_the_flags_by_group():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  for arg in ('--help', '--helpfull'):
    proc = subprocess.run([sys.executable, '-m', 'experiments.main', arg], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sections, group = {}, None
    for line in proc.stdout.splitlines():
      if line and not line.startswith(' ') and line.endswith(':'):
        group = line.split(' ')[0].rstrip(':')
      elif line.startswith('  -') and group:
        name = line.strip().split(':')[0].split('--')[-1]
        sections.setdefault(group, []).append(name.replace('[no]', ''))
    assert list(sections)[:4] == ['study', 'data', 'run', 'cluster'], list(sections)
    assert {'epochs', 'model', 'conditions'} <= set(sections['study'])
    assert {'image_folder', 'dataset', 'train_per_class'} <= set(sections['data'])
    assert {'workdir', 'cpu_devices', 'member_map', 'dry_run'} <= set(sections['run'])
    assert {'distributed', 'process_id'} <= set(sections['cluster'])
    ours = [name for group in ('study', 'data', 'run', 'cluster') for name in sections[group]]
    assert len(ours) == len(set(ours))  # each flag once
    assert ('absl.logging' in sections) == (arg == '--helpfull')
