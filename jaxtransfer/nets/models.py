"""The seed seminar's two CIFAR networks, as flax.linen modules.

Every weight layer (a conv with its BatchNorm, or the dense head) is one named top-level
submodule, called in order, so "the first n layers" is well defined and can be found by
`jaxtransfer.transfer.layer_order`. Both nets take NHWC float images and are called as
`model.apply(variables, x, train=bool)`; `start`/`stop` run a contiguous slice of the layers,
which lets the trainer compute a frozen prefix once and train only the rest on its features.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# What each layer-defaults name means (`config.LAYER_DEFAULTS` says why they differ).
from jaxtransfer.config import FINAL_WIDTHS, LAYER_DEFAULTS


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2/2 max-pool as reshape + max.

  Same values as `nn.max_pool(x, (2, 2), (2, 2))`; its gradient avoids XLA's select-and-scatter,
  which is slow on CPU (see shared notes: ~1,530 vs ~2,000 img/s).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv_nhwc(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                  dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution padded by `pad` on every side, with a hand-written VJP.

  Same values as `lax.conv_general_dilated`; the gradients are computed by two more convolutions
  in the same NHWC/HWIO ("canonical") form. The automatic transpose rule produces convolutions
  with other dimension labels (e.g. `f01b_i01o->01bf` for the kernel gradient), which XLA:CPU
  (jax 0.10.2) rewrites into fast library calls only outside loops: inside the trainer's
  `lax.scan` they run as a naive loop nest, 10-70x slower (see benchmarks/README.md).
  """
  return _conv_nhwc(x, kernel, pad)


def _conv_same_fwd(x, kernel, pad):
  return _conv_nhwc(x, kernel, pad), (x, kernel)


def _conv_same_bwd(pad, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  # Input gradient: correlate dy with the spatially flipped kernel, in/out channels swapped.
  dx = _conv_nhwc(dy, jnp.swapaxes(kernel[::-1, ::-1], 2, 3), kh - 1 - pad)
  # Kernel gradient dk[h, w, i, o] = sum_{b, y, x} x_pad[b, y + h, x + w, i] * dy[b, y, x, o]: a
  # convolution with the input channels as batch, the batch as features and dy as the kernel.
  dk = _conv_nhwc(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), pad)
  return dx, jnp.transpose(dk, (1, 2, 0, 3))


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def kernel_grad_gemm(x: jax.Array, dy: jax.Array, kh: int, kw: int, pad: int) -> jax.Array:
  """dk[h, w, i, o] = sum_{b, y, x} x_pad[b, y + h, x + w, i] * dy[b, y, x, o] as one GEMM.

  The kh*kw shifted windows of the padded input, stacked, are contracted with dy over batch and
  space: a [kh*kw*Cin, B*H*W] x [B*H*W, Cout] matrix product, batched over members under vmap.
  XLA:GPU rewrites a grouped backward-filter convolution (the vmapped autodiff kernel gradient)
  as a forward convolution with the whole image as its window, the worst shape a direct
  convolution can get; a GEMM has no such case."""
  b, h, w, _ = dy.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  windows = jnp.stack([x[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=3)
  dk = lax.dot_general(windows, dy, (((0, 1, 2), (0, 1, 2)), ((), ())))  # [kh*kw, Cin, Cout]
  return dk.reshape(kh, kw, *dk.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same_gemm(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """`conv_same` for accelerators: forward and input gradient as 3x3 convolutions (cuDNN's
  forward call), the kernel gradient as a GEMM (`kernel_grad_gemm`)."""
  return _conv_nhwc(x, kernel, pad)


def _conv_same_gemm_bwd(pad, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  dx = _conv_nhwc(dy, jnp.swapaxes(kernel[::-1, ::-1], 2, 3), kh - 1 - pad)
  return dx, kernel_grad_gemm(x, dy, kh, kw, pad).astype(kernel.dtype)


conv_same_gemm.defvjp(_conv_same_fwd, _conv_same_gemm_bwd)

# Platforms whose lowering takes `conv_same_gemm`; any other keeps lax's own gradients.
GEMM_KERNEL_GRAD_PLATFORMS = ('cuda', 'rocm', 'tpu')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """Drop-in for `lax.conv_general_dilated` (flax `nn.Conv(conv_general_dilated=...)`).

  The stride-1, undilated, ungrouped, symmetric 'SAME' NHWC case with odd square kernels goes
  through `conv_same` on CPU and `conv_same_gemm` on GPU/TPU (the same values); anything else,
  and any other platform, to lax unchanged.
  """
  args = (lhs, rhs, window_strides, padding)
  kwargs.update(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                precision=precision)
  kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
  pad = kh // 2
  fast = (lhs.ndim == 4 and kh == kw and kh % 2 == 1 and tuple(window_strides) == (1, 1) and
          not isinstance(padding, str) and [tuple(p) for p in padding] == [(pad, pad)] * 2 and
          all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation)) and
          feature_group_count == 1 and precision is None and
          kwargs.get('batch_group_count', 1) == 1 and
          kwargs.get('preferred_element_type') is None and
          dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not fast:
    return lax.conv_general_dilated(*args, **kwargs)
  # CPU: canonical backward convolutions; GPU/TPU: the kernel gradient as a GEMM.
  accelerators = {p: lambda x, k: conv_same_gemm(x, k, pad) for p in GEMM_KERNEL_GRAD_PLATFORMS}
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, k: conv_same(x, k, pad), **accelerators,
      default=lambda x, k: lax.conv_general_dilated(x, k, *args[2:], **kwargs))


def initializers(param_init: str, fan_in: int) -> dict:
  """kernel_init and bias_init for a Conv or Dense layer of `fan_in` inputs per output.

  'pytorch': U(+-1/sqrt(fan_in)) for both, as torch's reset_parameters; 'flax': flax's own."""
  if param_init == 'flax':
    return {}
  if param_init != 'pytorch':
    raise ValueError(f"unknown param_init {param_init!r}: expected 'pytorch' or 'flax'")
  bound = 1.0 / float(np.sqrt(fan_in))
  uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                     bound)
  # variance_scaling(1/3, fan_in, uniform) is U(+-sqrt(3 * (1/3) / fan_in)): the same bound, with
  # flax's own fan-in rule for conv kernels (receptive field x input channels).
  return {
      'kernel_init': nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
      'bias_init': uniform
  }


class BatchNorm(nn.BatchNorm):
  """flax's BatchNorm (same variables, same normalisation) whose running variance can track the
  unbiased batch variance, as PyTorch's BatchNorm2d does (`running_var='unbiased'`).

  A subclass, so that everything that treats `nn.BatchNorm` specially (e.g.
  `transfer.batchnorm_policy`) treats it the same way."""

  running_var: str = 'unbiased'  # 'unbiased' (PyTorch) | 'biased' (flax)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if self.running_var == 'biased':
      return super().__call__(x, use_running_average, mask=mask)
    if self.running_var != 'unbiased':
      raise ValueError(f"unknown running_var {self.running_var!r}: expected 'unbiased' or 'biased'")
    running = nn.merge_param('use_running_average', self.use_running_average, use_running_average)
    updating = not running and not self.is_initializing()
    old_var = self.get_variable('batch_stats', 'var') if updating else None
    y = super().__call__(x, use_running_average, mask=mask)
    if updating:
      # flax tracked var = m old + (1 - m) biased; PyTorch tracks m old + (1 - m) biased n/(n-1),
      # which is var + (var - m old) / (n - 1).
      n = x.size // x.shape[-1] if mask is None else _counted(mask, x.shape)
      var = self.get_variable('batch_stats', 'var')
      self.put_variable('batch_stats', 'var',
                        var + (var - self.momentum * old_var) / jnp.maximum(n - 1, 1))
    return y


def _counted(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """How many of an input's positions per feature a BatchNorm `mask` counts; a mask that is 1
  along the feature axis (the trainer's: [batch, 1, ..., 1]) is counted without broadcasting."""
  if mask.ndim == len(shape) and mask.shape[-1] == 1:
    per_element = (math.prod(shape) // shape[-1]) // mask.size
    return mask.sum(dtype=jnp.float32) * per_element
  return jnp.broadcast_to(mask, shape).sum(dtype=jnp.float32) / shape[-1]


class ConvBlock(nn.Module):
  """conv3x3 (pad 1, stride 1) [-> BatchNorm] -> ReLU [-> 2x2 max-pool]: one transferable layer."""

  features: int
  batch_norm: bool = True
  pool: bool = False
  param_init: str = 'pytorch'
  running_var: str = 'unbiased'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # flax's Conv (same parameters and forward values) with a CPU-friendly VJP.
    x = nn.Conv(self.features, (3, 3), padding=1, conv_general_dilated=conv_general_dilated,
                name='conv', **initializers(self.param_init, 9 * x.shape[-1]))(x)
    if self.batch_norm:
      # PyTorch's BatchNorm2d defaults (momentum 0.1 -> flax 0.9, eps 1e-5), as in the seed.
      x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                    running_var=self.running_var, name='bn')(x)
    x = nn.relu(x)
    return max_pool_2x2(x) if self.pool else x


class Head(nn.Module):
  """Flatten -> Dense(num_classes)."""

  num_classes: int
  param_init: str = 'pytorch'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, name='dense', **initializers(self.param_init, x.shape[-1]))(x)


class _LayerStack(nn.Module):
  """Runs `self.layer_specs()` in order: (name, module factory) pairs that subclasses define."""
  def layer_specs(self) -> list[tuple[str, Callable[..., nn.Module]]]:
    raise NotImplementedError

  @property
  def num_layers(self) -> int:
    return len(self.layer_specs())

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, start: int = 0,
               stop: int | None = None) -> jax.Array:
    for name, make_layer in self.layer_specs()[start:stop]:
      x = make_layer(name=name)(x, train)
    return x


class InitialNet(_LayerStack):
  """The seed's first net: 8 x [conv3x3 (3 filters) -> ReLU], flatten 32*32*3 -> Dense (9 layers)."""

  num_classes: int
  depth: int = 8
  width: int = 3
  param_init: str = 'pytorch'

  def layer_specs(self) -> list[tuple[str, Callable[..., nn.Module]]]:
    convs = [(f'conv{i + 1}',
              functools.partial(ConvBlock, self.width, batch_norm=False,
                                param_init=self.param_init)) for i in range(self.depth)]
    return convs + [('head', functools.partial(Head, self.num_classes, param_init=self.param_init))]


class FinalNet(_LayerStack):
  """The seed's final net: 3 blocks of [conv3x3 -> BN -> ReLU] x 2 + max-pool 2x2, then a Dense head.

  7 layers: conv1..conv6 and head. `widths` are the three blocks' filter counts; the default
  (8, 16, 32) gives the seed's 4*4*32 = 512 features into the head (see README on the ambiguity).
  """

  num_classes: int
  widths: Sequence[int] = FINAL_WIDTHS
  param_init: str = 'pytorch'
  running_var: str = 'unbiased'

  def layer_specs(self) -> list[tuple[str, Callable[..., nn.Module]]]:
    specs = []
    block = functools.partial(ConvBlock, param_init=self.param_init, running_var=self.running_var)
    for b, w in enumerate(self.widths):
      specs.append((f'conv{2 * b + 1}', functools.partial(block, w)))
      specs.append((f'conv{2 * b + 2}', functools.partial(block, w, pool=True)))
    return specs + [('head', functools.partial(Head, self.num_classes, param_init=self.param_init))]


# Model by flag value: (num_classes, widths, layer defaults) -> module. Only the final net has
# widths and BatchNorm.
MODELS: dict[str, Callable[[int, Sequence[int], dict], _LayerStack]] = {
    'initial': lambda num_classes, widths, defaults: InitialNet(num_classes, param_init=defaults[
        'param_init']),
    'final': lambda num_classes, widths, defaults: FinalNet(num_classes, tuple(widths), **defaults),
}


def make_model(name: str, num_classes: int, widths: Sequence[int] = FinalNet.widths,
               layer_defaults: str = 'pytorch') -> _LayerStack:
  """Model by flag value, one of MODELS, with one of LAYER_DEFAULTS."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}: expected one of {", ".join(MODELS)}')
  return MODELS[name](num_classes, widths, LAYER_DEFAULTS[layer_defaults])
