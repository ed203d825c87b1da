# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""CPU-friendly building blocks for small convolutional networks.

XLA:CPU runs the *backward* pass of small convolutions and of
`lax.reduce_window` max-pooling far slower than their forward pass (for the
multi-MNIST LeNet, batch 256: conv1's filter gradient ~60 ms against ~20 ms
forward, the 2x2 max-pool gradient ~35 ms against ~1 ms forward). The pieces
here express the same maths through matrix multiplications, slices and
element-wise selects, whose gradients XLA:CPU compiles well:

* `max_pool_2x2`: 2x2/stride-2 max pool as a reshape and three selects.
* `image_patches` + `conv_from_patches`: a VALID, stride-1 convolution as one
  matrix multiplication with a *banded* kernel matrix. Each patch row holds
  ``kh x (block_width + kw - 1) x C`` input values and produces
  ``block_width`` neighbouring output pixels at once (``block_width=1`` is the
  classic im2col). Wider blocks cut the patch memory (~``kw`` times smaller
  than im2col for ``block_width ~ kw``) at the price of multiplying by zeros
  inside the band; on 2-core CPUs memory traffic dominates, so
  ``block_width ~ kw - 1`` is the sweet spot.
* `PatchConv` / `BandedConv`: Flax Linen layers with the same parameters
  (``kernel`` HWIO, ``bias``) as `flax.linen.Conv`, so parameters move freely
  between the fast and the reference model.

When to use them: on CPU, for small kernels with few channels (LeNet-sized
models), and for the first layer of a network, whose patches are data (no
gradient) and can be computed once per batch. On GPU/TPU use
`flax.linen.Conv`; cuDNN/TPU convolutions are faster than these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on NHWC inputs (VALID: odd edges dropped).

  Computes ``y[b, h, w, c] = max_{i, j in {0, 1}} x[b, 2h + i, 2w + j, c]``,
  equal to ``lax.reduce_window(x, -inf, max, (1, 2, 2, 1), (1, 2, 2, 1),
  'VALID')`` and to ``flax.linen.max_pool(x, (2, 2), (2, 2))``.

  Ties: the derivative goes entirely to the *first* maximal element of each
  window in row-major order ((0, 0), (0, 1), (1, 0), (1, 1)), exactly like the
  ``select_and_scatter_add`` gradient of ``reduce_window`` (``jnp.max`` would
  instead split it evenly among tied elements). Ties are common in practice:
  blank image regions give equal activations. Built from three
  ``where(a >= b, a, b)`` selects, whose gradient (selects and pads) XLA:CPU
  runs ~5-10x faster than ``select_and_scatter_add``. (A custom VJP with a
  one-hot mask measured slower.)

  Args:
    x: array of shape ``(batch, height, width, channels)``.

  Returns:
    Array of shape ``(batch, height // 2, width // 2, channels)``.
  """
  b, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2]
  r = x.reshape(b, h // 2, 2, w // 2, 2, c)
  # `where(a >= b, a, b)` keeps the earlier element on ties (first-max routing).
  top = jnp.where(r[:, :, 0, :, 0] >= r[:, :, 0, :, 1],
                  r[:, :, 0, :, 0], r[:, :, 0, :, 1])
  bottom = jnp.where(r[:, :, 1, :, 0] >= r[:, :, 1, :, 1],
                     r[:, :, 1, :, 0], r[:, :, 1, :, 1])
  return jnp.where(top >= bottom, top, bottom)


def default_block_width(out_width: int, kernel_width: int) -> int:
  """Divisor of ``out_width`` closest to ``kernel_width - 1`` (ties: smaller).

  At ``block_width = kw - 1`` half of the banded kernel matrix is non-zero,
  while the patches are about ``kw / 2`` times smaller than im2col patches.

  Args:
    out_width: output width of the VALID convolution.
    kernel_width: kernel width ``kw``.

  Returns:
    The block width.
  """
  divisors = [d for d in range(1, out_width + 1) if out_width % d == 0]
  return min(divisors, key=lambda d: (abs(d - (kernel_width - 1)), d))


def image_patches(
    x: jax.Array,
    kernel_size: Sequence[int],
    *,
    block_width: int | None = None,
) -> jax.Array:
  """Banded im2col patches of an NHWC input for a VALID, stride-1 convolution.

  With ``Ho = H - kh + 1``, ``Wo = W - kw + 1``, ``s = block_width``,
  ``nb = Wo / s`` and ``win = s + kw - 1``::

    patches[b, h, k, (i, p, c)] = x[b, h + i, k * s + p, c]
    for i < kh, p < win, c < C,

  i.e. each row holds the input window that produces the ``s`` output pixels
  ``(h, k*s), ..., (h, k*s + s - 1)``. With ``block_width=1`` this is the usual
  im2col with feature order (i, j, c), matching ``kernel.reshape(-1, O)`` of
  an HWIO kernel.

  Differentiable in ``x`` (its gradient is a sum of shifted slices), but the
  intended use for a first layer is to compute the patches once per batch
  from the data and feed them to `conv_from_patches` / `PatchConv`.

  Args:
    x: input of shape ``(B, H, W, C)``.
    kernel_size: ``(kh, kw)``.
    block_width: output pixels per patch row; must divide ``Wo``. Defaults to
      `default_block_width`.

  Returns:
    Patches of shape ``(B, Ho, nb, kh * win * C)``.
  """
  kh, kw = kernel_size
  _, h, w, c = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"kernel {kernel_size} larger than input {(h, w)}")
  s = default_block_width(wo, kw) if block_width is None else block_width
  if wo % s:
    raise ValueError(f"block_width={s} must divide the output width {wo}")
  nb, win = wo // s, s + kw - 1
  # Two small stacks (kh row shifts, then nb column blocks) instead of one
  # concatenate of kh*kw slices: XLA:CPU emits a many-operand concatenate as a
  # select chain per element, which is several times slower.
  rows = jnp.stack([x[:, i:i + ho] for i in range(kh)], axis=2)
  blocks = jnp.stack(
      [rows[:, :, :, k * s:k * s + win] for k in range(nb)], axis=2)
  return blocks.reshape(x.shape[0], ho, nb, kh * win * c)


def banded_kernel_matrix(kernel: jax.Array, block_width: int) -> jax.Array:
  """Banded matrix ``T`` with ``patches @ T`` = the convolution output.

  ``T[(i, p, c), (q, o)] = kernel[i, p - q, c, o]`` if ``0 <= p - q < kw``
  else 0, for ``p < block_width + kw - 1`` and ``q < block_width``.

  Args:
    kernel: HWIO kernel of shape ``(kh, kw, C, O)``.
    block_width: output pixels per patch row (``s``).

  Returns:
    Matrix of shape ``(kh * (s + kw - 1) * C, s * O)``.
  """
  kh, kw, c, o = kernel.shape
  s = block_width
  win = s + kw - 1
  shift = np.zeros((win, s, kw), dtype=kernel.dtype)
  for q in range(s):
    shift[q + np.arange(kw), q, np.arange(kw)] = 1
  band = jnp.einsum("pqj,ijco->ipcqo", shift, kernel)
  return band.reshape(kh * win * c, s * o)


def conv_from_patches(
    patches: jax.Array,
    kernel: jax.Array,
    *,
    block_width: int,
) -> jax.Array:
  """VALID stride-1 convolution (cross-correlation) from `image_patches`.

  ``y[b, h, w, o] = sum_{i, j, c} x[b, h + i, w + j, c] kernel[i, j, c, o]``,
  computed as ``patches @ banded_kernel_matrix(kernel, block_width)``.

  Args:
    patches: ``(B, Ho, nb, kh * win * C)`` from `image_patches` with the same
      ``block_width``.
    kernel: HWIO kernel ``(kh, kw, C, O)``.
    block_width: the ``block_width`` used for the patches.

  Returns:
    Output of shape ``(B, Ho, nb * block_width, O)``.
  """
  b, ho, nb, _ = patches.shape
  t = banded_kernel_matrix(kernel, block_width).astype(patches.dtype)
  y = patches.reshape(b * ho * nb, -1) @ t
  return y.reshape(b, ho, nb * block_width, kernel.shape[-1])


def banded_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    block_width: int | None = None,
) -> jax.Array:
  """VALID stride-1 NHWC convolution via banded patches (see `image_patches`).

  Same values as ``lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` up to float rounding, with
  gradients in ``x`` and ``kernel`` that are matrix products and slice sums.

  Args:
    x: input ``(B, H, W, C)``.
    kernel: HWIO kernel ``(kh, kw, C, O)``.
    block_width: see `image_patches`; defaults to `default_block_width`.

  Returns:
    Output ``(B, H - kh + 1, W - kw + 1, O)``.
  """
  kh, kw = kernel.shape[:2]
  if block_width is None:
    block_width = default_block_width(x.shape[2] - kw + 1, kw)
  p = image_patches(x, (kh, kw), block_width=block_width)
  return conv_from_patches(p, kernel, block_width=block_width)


def _conv_layer(module: nn.Module, in_features: int,
                conv: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Parameters and bias of a conv layer, as ``flax.linen.Conv`` names and shapes them.

  Declares ``kernel`` (HWIO: ``(*kernel_size, in_features, features)``) in
  ``module`` (inside its compact ``__call__``), applies ``conv(kernel)`` and
  adds the per-channel ``bias`` if ``module.use_bias``.
  """
  kernel = module.param(
      "kernel", module.kernel_init,
      (*module.kernel_size, in_features, module.features))
  y = conv(kernel)
  if module.use_bias:
    y = y + module.param("bias", module.bias_init, (module.features,))
  return y


class PatchConv(nn.Module):
  """Convolution layer applied to precomputed `image_patches`.

  Parameters ``kernel`` (HWIO) and ``bias`` have the names, shapes and default
  initialisers of ``flax.linen.Conv(features, kernel_size, padding='VALID')``.

  Attributes:
    features: number of output channels ``O``.
    kernel_size: ``(kh, kw)``.
    in_features: number of input channels ``C`` (patches do not carry it).
    block_width: the ``block_width`` used to build the patches.
    use_bias: add a per-channel bias.
  """

  features: int
  kernel_size: tuple[int, int]
  in_features: int
  block_width: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    return _conv_layer(self, self.in_features,
                       lambda kernel: conv_from_patches(patches, kernel,
                                                        block_width=self.block_width))


class BandedConv(nn.Module):
  """VALID stride-1 convolution layer computed with `banded_conv`.

  Drop-in for ``flax.linen.Conv(features, kernel_size, padding='VALID')`` on
  NHWC inputs (same parameter names, shapes and initialisers).

  Attributes:
    features: number of output channels.
    kernel_size: ``(kh, kw)``.
    block_width: see `image_patches`; ``None`` picks `default_block_width`.
    use_bias: add a per-channel bias.
  """

  features: int
  kernel_size: tuple[int, int]
  block_width: int | None = None
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv_layer(self, x.shape[-1],
                       lambda kernel: banded_conv(x, kernel.astype(x.dtype),
                                                  block_width=self.block_width))
