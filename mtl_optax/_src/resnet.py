# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Multi-task ResNet with BatchNorm (the FS-MTL multi-MNIST network).

Architecture (``width=64``, ``stage_sizes=(2, 2, 2, 2)``: ResNet-18 as in the
FS-MTL multi-MNIST experiments, i.e. torchvision's ``resnet18`` with its first
convolution replaced by a 1-channel one, ``fc`` to a 100-d feature, a ReLU and
one ``Linear(100, classes)`` head per task)::

  conv 7x7/2, pad 3, 1 -> w (no bias) -> BN -> ReLU -> maxpool 3x3/2, pad 1
  stage k = 0..3: stage_sizes[k] basic blocks with w * 2**k channels,
    the first block of stages 1..3 with stride 2:
      conv 3x3/s, pad 1 -> BN -> ReLU -> conv 3x3, pad 1 -> BN
      (+ shortcut: identity, or conv 1x1/s -> BN when the shape changes) -> ReLU
  global average pool -> dense feature_dim (100) -> ReLU   (shared encoder)
  one dense head per task (feature_dim -> head_sizes[i])

On 36x36 multi-MNIST images the spatial sizes are 18 (conv1), 9 (pool,
stage 0), 5, 3 and 2. Convolutions have no bias (BatchNorm follows each);
BatchNorm uses PyTorch's defaults (momentum 0.1, i.e. Flax ``momentum=0.9``,
``epsilon=1e-5``), convolution kernels PyTorch's ResNet initialisation
(He normal, fan-out), dense layers PyTorch's default kernel scale
(U(±1/sqrt(fan_in))) with zero biases.

Two implementations of the convolutions with the same parameter tree
(``conv_impl``):

* ``"patches"`` (default; fast on XLA:CPU): every convolution as one matrix
  product of im2col patches, ``(B·Ho·Wo, kh·kw·C) @ (kh·kw·C, O)``; the first
  convolution's patches are data (no gradient); the 1x1 shortcut as a strided
  slice and a product; the max-pool as element-wise selects. XLA:CPU's own
  convolution is ~100x slower on the small spatial sizes of the late stages
  (2x2, 512 channels: seconds per call) and its weight-gradient convolutions
  are slow throughout (see ``mtl_optax.nn`` for the LeNet case).
* ``"flax"``: ``flax.linen.Conv`` and ``flax.linen.max_pool``, the natural
  choice on GPU/TPU.

Parameters: ``{"encoder": {...}, "heads": {"task0": {...}, ...}}``, the
BatchNorm statistics in the ``batch_stats`` collection (encoder only). Train
with ``train=True`` and ``mutable=["batch_stats"]``; evaluate with
``train=False`` (running averages).

References:
  He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016.
  Phan et al., "Beyond Losses Reweighting: Empowering Multi-Task Learning via
  the Generalization Perspective", ICCV 2025 (FS-MTL; multi-MNIST model:
  ``multi-mnist/model_resnet.py`` of github.com/VietHoang1512/FS-MTL).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("patches", "flax")

# PyTorch's ResNet initialisation (kaiming_normal_, fan_out, ReLU gain) and
# nn.Linear's default kernel scale U(±1/sqrt(fan_in)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - k) // stride + 1


def _strided_windows(x: jax.Array, k: int, stride: int, pad: int,
                     pad_value: float = 0.0) -> list[jax.Array]:
  """The ``k*k`` shifted, strided views of a padded NHWC input, row-major."""
  _, h, w, _ = x.shape
  ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                constant_values=pad_value)
  return [x[:, i:i + stride * (ho - 1) + 1:stride,
            j:j + stride * (wo - 1) + 1:stride] for i in range(k) for j in range(k)]


def conv_patches(x: jax.Array, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> jax.Array:
  """im2col patches of an NHWC input, feature order ``(i, j, c)``.

  ``patches[b, h, w, (i, j, c)] = xpad[b, stride*h + i, stride*w + j, c]`` with
  ``xpad`` zero-padded by ``padding`` on both sides of both spatial axes.

  Args:
    x: ``(B, H, W, C)``.
    kernel_size: square kernel size ``k``.
    stride: stride of both spatial axes.
    padding: symmetric zero padding of both spatial axes.

  Returns:
    ``(B, Ho, Wo, k * k * C)``, matching ``kernel.reshape(-1, O)`` of an HWIO
    kernel.
  """
  if kernel_size == 1 and not padding:
    return x[:, ::stride, ::stride]
  # One concatenate of k*k slices measured faster than a stack + reshape here.
  return jnp.concatenate(_strided_windows(x, kernel_size, stride, padding), axis=-1)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1,
           padding: int = 0) -> jax.Array:
  """NHWC/HWIO convolution as one matrix product of `conv_patches`.

  Same values as ``lax.conv_general_dilated(x, kernel, (stride, stride),
  [(padding, padding)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` up
  to rounding. Gradients (autodiff): the kernel's is ``patches^T @ dy``, the
  input's a matrix product and slice sums. (A custom VJP computing the input
  gradient as a convolution of ``dy`` with the flipped kernel measured no
  faster on XLA:CPU.)
  """
  kh, kw, _, out = kernel.shape
  if kh != kw:
    raise ValueError(f"square kernels only, got {kernel.shape}")
  p = conv_patches(x, kh, stride, padding)
  b, ho, wo, f = p.shape
  y = p.reshape(b * ho * wo, f) @ kernel.reshape(f, out).astype(p.dtype)
  return y.reshape(b, ho, wo, out)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 max pool, stride 2, padding 1 (``-inf``), as PyTorch's ResNet stem.

  Built from element-wise selects ``where(a >= b, a, b)`` over the nine
  strided views (ties: the first in row-major order gets the gradient), equal
  to ``flax.linen.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`` in value.
  """
  views = _strided_windows(x, 3, 2, 1, pad_value=-jnp.inf)
  out = views[0]
  for v in views[1:]:
    out = jnp.where(out >= v, out, v)
  return out


class Conv(nn.Module):
  """Square, bias-free convolution with ``flax.linen.Conv``'s parameter.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride of both spatial axes.
    padding: symmetric zero padding (PyTorch's ``padding=``).
    impl: ``"patches"`` (`conv2d`) or ``"flax"`` (``flax.linen.Conv``).
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  impl: str = "patches"
  kernel_init: nn.initializers.Initializer = conv_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, p = self.kernel_size, self.padding
    if self.impl == "flax":
      return nn.Conv(self.features, (k, k), strides=(self.strides,) * 2,
                     padding=((p, p), (p, p)), use_bias=False,
                     kernel_init=self.kernel_init, name="conv")(x)
    # Same scope layout as the flax branch: {"conv": {"kernel": ...}}.
    return _PatchConvKernel(self.features, k, x.shape[-1], self.strides, p,
                            self.kernel_init, name="conv")(x)


class _PatchConvKernel(nn.Module):
  features: int
  kernel_size: int
  in_features: int
  strides: int
  padding: int
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, self.in_features, self.features))
    return conv2d(x, kernel, self.strides, self.padding)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      name=name)


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convolutions, BatchNorm, shortcut)."""

  features: int
  strides: int = 1
  conv_impl: str = "patches"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda k, s, p, name: Conv(self.features, k, s, p, impl=self.conv_impl, name=name)
    y = conv(3, self.strides, 1, "conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = conv(3, 1, 1, "conv2")(y)
    y = _batch_norm(train, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(1, self.strides, 0, "down_conv")(x)
      x = _batch_norm(train, "down_bn")(x)
    return nn.relu(y + x)


class ResNetEncoder(nn.Module):
  """The shared ResNet trunk: NHWC images -> ``(B, feature_dim)`` (after ReLU).

  Attributes:
    width: channels of the stem and of stage 0 (64: ResNet-18).
    stage_sizes: basic blocks per stage ((2, 2, 2, 2): ResNet-18).
    feature_dim: size of the shared representation (100 in FS-MTL).
    conv_impl: ``"patches"`` (fast on CPU) or ``"flax"`` (``flax.linen.Conv``).
  """

  width: int = 64
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  feature_dim: int = 100
  conv_impl: str = "patches"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
    x = Conv(self.width, 7, 2, 3, impl=self.conv_impl, name="conv1")(x)
    x = nn.relu(_batch_norm(train, "bn1")(x))
    if self.conv_impl == "patches":
      x = max_pool_3x3_s2(x)
    else:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = BasicBlock(self.width * 2 ** i, 2 if (i > 0 and j == 0) else 1,
                       self.conv_impl, name=f"stage{i}_block{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.relu(nn.Dense(self.feature_dim, kernel_init=dense_kernel_init,
                            name="fc")(x))


class _Heads(nn.Module):
  head_sizes: Sequence[int]

  @nn.compact
  def __call__(self, z):
    return tuple(nn.Dense(n, kernel_init=dense_kernel_init, name=f"task{i}")(z)
                 for i, n in enumerate(self.head_sizes))


class MultiTaskResNet(nn.Module):
  """Shared `ResNetEncoder` + one linear head per task.

  ``apply`` returns a tuple of per-task outputs ``(B, head_sizes[i])``.

  Attributes:
    head_sizes: output size of each task's head (``(10, 10)``: two digits).
    width, stage_sizes, feature_dim, conv_impl: see `ResNetEncoder`.
  """

  head_sizes: Sequence[int] = (10, 10)
  width: int = 64
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  feature_dim: int = 100
  conv_impl: str = "patches"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, ...]:
    z = ResNetEncoder(self.width, tuple(self.stage_sizes), self.feature_dim,
                      self.conv_impl, name="encoder")(x, train)
    return _Heads(tuple(self.head_sizes), name="heads")(z)


def multi_task_resnet18(num_tasks: int = 2, num_classes: int = 10, *,
                        width: int = 64, conv_impl: str = "patches") -> MultiTaskResNet:
  """The FS-MTL multi-MNIST ResNet-18: ``num_tasks`` heads of ``num_classes``.

  ``width`` < 64 gives a narrower network of the same depth.
  """
  return MultiTaskResNet(head_sizes=(num_classes,) * num_tasks, width=width,
                         stage_sizes=(2, 2, 2, 2), conv_impl=conv_impl)


def multi_task_resnet_small(num_tasks: int = 2, num_classes: int = 10, *,
                            width: int = 16, conv_impl: str = "patches") -> MultiTaskResNet:
  """A narrow, shallow variant for CPU: width 16, one basic block per stage."""
  return MultiTaskResNet(head_sizes=(num_classes,) * num_tasks, width=width,
                         stage_sizes=(1, 1, 1, 1), conv_impl=conv_impl)
