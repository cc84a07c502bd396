"""The researcher's own network: a model file outside the package runs a whole study; a spec that
breaks the contract is refused in one line, by the CLI and the Python API alike."""

import dataclasses
import inspect
import json
import os
import shutil

import flax.linen as nn
import pytest

from jaxtransfer.nets import flops, models, modelspec
from jaxtransfer.train import features, trainer
from jaxtransfer.config import ConfigError, StudyConfig
from jaxtransfer.study import context, driver
from jaxtransfer.analysis import rows as rows_lib
from jaxtransfer.study.workdir import Workdir
from tests.conftest import ROOT, run_cli

EXAMPLE = os.path.join(ROOT, 'examples', 'small_vgg.py')


def own_args(image_folder, workdir, model, *extra):
  """A small study of one split, both directions, depth 1 (the built-ins' --widths left alone)."""
  return (f'--image_folder={image_folder}', f'--workdir={workdir}', f'--model={model}',
          '--num_splits=1', '--depths=1', '--conditions=BnB,AnB+', '--epochs=2', '--batch_size=8',
          f'--cache_dir={workdir}-cache', '--quiet', *extra)


def test_a_model_file_outside_the_package_runs_to_results_figures_and_report(
    image_folder, tmp_path):
  net = tmp_path / 'elsewhere' / 'net.py'
  os.makedirs(net.parent)
  shutil.copy(EXAMPLE, net)  # the README's example, as a file of the researcher's own
  workdir = tmp_path / 'wd'
  assert run_cli(*own_args(image_folder, workdir, f'{net}:SmallVGG', '--eval_every_epoch')) == 0
  rows = rows_lib.read_csv(str(workdir / 'results.csv'))
  assert sorted((r['condition'], r['depth'])
                for r in rows) == [('AnB+', 1)] * 2 + [('BnB', 1)] * 2 + [('base', 0)] * 2
  recorded = json.load(open(workdir / 'study.json'))['config']
  assert recorded['model'] == f'{net}:SmallVGG' and recorded['depths'] == [1]
  # Learning curves: every model's test accuracy after every epoch, the last one its result.
  metrics = Workdir(str(workdir)).read_metrics()
  assert len(metrics) == 6 * 2 and all('test_accuracy' in m for m in metrics)
  last = {m['run']: m['test_accuracy'] for m in metrics if m['epoch'] == 2}
  assert sorted(last.values()) == sorted(r['test_accuracy'] for r in rows)
  cka = json.load(open(workdir / 'figures' / 'cka.json'))
  assert cka['layers'] == ['block1', 'block2', 'block3', 'head']
  for name in ('transfer', 'transfer_relative', 'curves', 'cka'):
    assert os.path.getsize(workdir / 'figures' / f'{name}.png') > 1000
  report = open(workdir / 'report.md').read()
  assert f'model `{net}:SmallVGG`' in report and '![figures/curves.png]' in report
  assert '| condition | mean \\|Δ\\| | max \\|Δ\\| | models |' in report
  assert '| base |' in report.split('## Learning curves')[1].split('## Figures')[0]
  assert 'The seminar (PyTorch' not in report  # no comparison with the seed's net


MODELS_FILE = '''
import flax.linen as nn

NOT_CALLABLE = 3


def returns_a_number(num_classes):
  return 3


class OneLayer(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.num_classes)(x.reshape(len(x), -1))


class NoTrainArgument(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(nn.Dense(4)(x.reshape(len(x), -1)))


class Dropout(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(4, name='a')(x.reshape(len(x), -1)))
    return nn.Dense(self.num_classes, name='b')(x)


class NoLogits(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(7, name='b')(nn.Dense(4, name='a')(x.reshape(len(x), -1)))
'''


@pytest.mark.parametrize('model, extra, message', [
    ('resnet',
     (), "--model 'resnet': expected initial, final, MODULE:ATTR or path/to/file.py:ATTR"),
    ('no_such_module_here:Net', (), 'cannot import no_such_module_here: no module named'),
    ('{dir}/missing.py:Net', (), '{dir}/missing.py:Net: no file {dir}/missing.py'),
    ('{dir}/nets.py:Missing', (), 'has no attribute Missing'),
    ('{dir}/nets.py:NOT_CALLABLE', (), 'NOT_CALLABLE is of type int, not a callable'),
    ('{dir}/nets.py:returns_a_number',
     (), 'returned an object of type int, not a flax.linen Module'),
    ('{dir}/nets.py:OneLayer',
     (), "has 1 top-level layer(s) ['Dense_0']; transfer needs at least 2"),
    ('{dir}/nets.py:NoTrainArgument', (), 'model.init(key, x, train=False) fails'),
    ('{dir}/nets.py:Dropout', (), 'dropout, is not supported'),
    ('{dir}/nets.py:NoLogits', (), 'returns (1, 7) for 1 image and 2 classes'),
    ('{dir}/nets.py:NoLogits', ('--widths=2,2,2',), '--widths applies to the built-in nets only'),
    ('{dir}/nets.py:NoLogits', ('--layer_defaults=flax',), '--layer_defaults applies to the built'),
    (f'{EXAMPLE}:SmallVGG', ('--depths=4',), 'out of range: the'),
])
def test_a_model_off_the_contract_is_one_line_in_cli_and_api(image_folder, tmp_path, capsys, model,
                                                             extra, message):
  (tmp_path / 'nets.py').write_text(MODELS_FILE)
  model, message = model.format(dir=tmp_path), message.format(dir=tmp_path)
  workdir = tmp_path / 'wd'
  assert run_cli(f'--image_folder={image_folder}', f'--workdir={workdir}', f'--model={model}',
                 '--quiet', *extra) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
  assert not os.path.exists(workdir)
  fields = dict(arg[2:].split('=') for arg in extra)
  fields = {k: tuple(v.split(',')) if k in ('widths', 'depths') else v for k, v in fields.items()}
  with pytest.raises(ConfigError) as excinfo:
    driver.run(StudyConfig(model=model, **fields), Workdir(str(tmp_path / 'api')),
               image_folder=image_folder)
  assert f'error: {excinfo.value}\n' == err
  assert not os.path.exists(tmp_path / 'api')


class TwoDense(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(self.num_classes, name='out')(nn.Dense(4, name='hidden')(x.reshape(len(x), -1)))


def test_model_fn_is_named_in_the_study_and_its_missing_batchnorm_said():
  config = driver.resolve(StudyConfig(conditions=('BnB',)), model_fn=TwoDense)
  assert config.model == 'tests.test_modelspec:TwoDense' and config.depths == (1,)
  named = driver.resolve(StudyConfig(model='mine'), model_fn=TwoDense)
  assert named.model == 'mine'
  with pytest.raises(ConfigError, match='has no importable name: give the config a model'):
    driver.resolve(StudyConfig(), model_fn=lambda k: TwoDense(k))
  info = context.model_info(config, TwoDense)
  assert info == modelspec.ModelInfo(('hidden', 'out'), batchnorm=False)
  assert 'no BatchNorm layer, so --frozen_batchnorm (`update`) changes nothing' in ' '.join(
      driver.moot_flags(config, info))
  assert driver.moot_flags(dataclasses.replace(config, conditions=('BnB+',)), info) == []
  example = driver.resolve(StudyConfig(model=f'{EXAMPLE}:SmallVGG'))
  assert example.depths == (1, 2, 3)  # 1..L-1 from the model's own 4 layers
  assert context.model_info(example).batchnorm
  assert not context.model_info(StudyConfig(model=f'{EXAMPLE}:without_batchnorm')).batchnorm
  assert not context.model_info(StudyConfig(model='initial')).batchnorm


class SlicedWithoutCount(TwoDense):
  """Takes start/stop but has no `num_layers`: how many layers to slice is unknown."""
  def __call__(self, x, train=False, start=0, stop=None):
    return super().__call__(x, train)


def test_one_check_says_whether_a_model_runs_a_slice_of_its_layers():
  """The prefix computed once (`features`) and the per-layer FLOPs (`flops`) ask it alike."""
  fixed = lambda n: trainer.Structure(n, n, 'fixed')
  assert modelspec.runs_slices(models.FinalNet(2)) and modelspec.runs_slices(models.InitialNet(2))
  assert features.applicable(models.FinalNet(2), fixed(('conv1',)))
  for model in (TwoDense(2), SlicedWithoutCount(2)):
    assert not modelspec.runs_slices(model)
    assert not features.applicable(model, fixed(('hidden',)))
    with pytest.raises(ValueError, match='needs a model that runs a slice of its layers'):
      flops.layer_macs(model, (2, 2, 3))


# `TwoDense` above, as a model file of its own.
TWO_DENSE_FILE = 'import flax.linen as nn\n\n\n' + inspect.getsource(TwoDense)


def test_an_edited_model_file_is_refused_on_resume(image_folder, tmp_path, capsys):
  """The source's sha256 is part of a study of a model of your own: a resume after the file was
  edited is refused in one line naming it (restored, it resumes); a record of before digests
  adopts the file's; the built-in nets record none (their hashes unchanged)."""
  import hashlib
  from jaxtransfer import config as config_lib
  from jaxtransfer import files
  from tests.conftest import snapshot
  net = tmp_path / 'net.py'
  net.write_text(TWO_DENSE_FILE)
  sha = lambda path: hashlib.sha256(open(path, 'rb').read()).hexdigest()
  workdir = tmp_path / 'wd'
  args = own_args(image_folder, workdir, f'{net}:TwoDense', '--epochs=1', '--cka_images=0')
  assert run_cli(*args) == 0
  record = json.load(open(workdir / 'study.json'))
  assert record['config']['model_sha256'] == sha(net)
  before = snapshot(str(workdir))
  net.write_text(TWO_DENSE_FILE.replace('Dense(4', 'Dense(5'))
  capsys.readouterr()
  assert run_cli(*args) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'{net} changed since {workdir} was started' in err, err
  assert sha(net) in err and snapshot(str(workdir)) == before
  net.write_text(TWO_DENSE_FILE)
  assert run_cli(*args) == 0 and snapshot(str(workdir)) == before  # restored: resumes, all done
  # Recorded before model digests: adopts the file's, and is then the study a new run names.
  config = {k: v for k, v in record['config'].items() if k != 'model_sha256'}
  old_hash = config_lib.config_hash(config_lib.with_defaults(config))
  assert old_hash != record['config_hash']
  files.write_json(str(workdir / 'study.json'),
                   {**record, 'config': config, 'config_hash': old_hash})
  assert run_cli(*args) == 0
  assert json.load(open(workdir /
                        'study.json')) == {**record, 'config_hash_before_migration': old_hash}
  # A module's source file, and a model_fn's module's; none for the built-in nets.
  here = os.path.join(ROOT, 'tests', 'test_modelspec.py')
  assert modelspec.source_digest('tests.test_modelspec:TwoDense') == sha(here)
  assert driver.resolve(StudyConfig(), model_fn=TwoDense).model_sha256 == sha(here)
  builtin = driver.resolve(StudyConfig(model='initial'))
  assert builtin.model_sha256 == '' and 'model_sha256' not in builtin.to_json()
  with pytest.raises(ConfigError, match='its source has sha256 .*, not --model_sha256 abc'):
    driver.resolve(StudyConfig(model=f'{net}:TwoDense', model_sha256='abc'),
                   image_folder=image_folder)
