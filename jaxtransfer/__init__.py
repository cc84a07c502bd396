"""jaxtransfer: how transferable are features in deep neural networks, in JAX (docs/api.md).

  import jaxtransfer
  jaxtransfer.use_cpu_devices(2)            # first, before anything runs JAX (CPU only)
  study = jaxtransfer.StudyConfig(num_splits=1, epochs=1)
  print(jaxtransfer.dry_run(study, jaxtransfer.Workdir(DIR), image_folder=PATH))
  jaxtransfer.run(study, jaxtransfer.Workdir(DIR), image_folder=PATH)

The names below are imported on first use (a module `__getattr__`), so `import jaxtransfer` and
`import jaxtransfer.config` load neither JAX nor TensorFlow.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    'StudyConfig': 'jaxtransfer.config',
    'RunOptions': 'jaxtransfer.config',
    'ConfigError': 'jaxtransfer.config',
    'run': 'jaxtransfer.study.driver',
    'dry_run': 'jaxtransfer.study.driver',
    'resolve': 'jaxtransfer.study.driver',
    'run_sweep': 'jaxtransfer.study.campaigns',
    'Workdir': 'jaxtransfer.study.workdir',
    'Progress': 'jaxtransfer.study.progress',
    'layer_order': 'jaxtransfer.transfer',
    'graft': 'jaxtransfer.transfer',
    'freeze_labels': 'jaxtransfer.transfer',
    'masked_optimizer': 'jaxtransfer.transfer',
    'partition': 'jaxtransfer.transfer',
    'combine': 'jaxtransfer.transfer',
    'batchnorm_policy': 'jaxtransfer.transfer',
    'batchnorm_statistics': 'jaxtransfer.transfer',
}

__all__ = sorted([*_EXPORTS, 'use_cpu_devices'])


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})


def use_cpu_devices(n: int) -> None:
  """Split the CPU into `n` JAX devices, so that a stack's members train in parallel (one per
  device). JAX fixes its device count when it starts, so this must come before anything runs JAX
  (a model's check, an array, `run`): afterwards it raises RuntimeError saying so."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update('jax_num_cpu_devices', int(n))
  except RuntimeError:
    if jax.default_backend() == 'cpu' and jax.device_count() == n:
      return  # already so
    raise RuntimeError(f'cannot use {n} CPU devices: JAX already started in this process with '
                       f'{jax.device_count()} {jax.default_backend()} device(s); call '
                       f'jaxtransfer.use_cpu_devices({n}) first, before anything runs JAX (or set '
                       f'JAX_NUM_CPU_DEVICES={n} in the environment)') from None
