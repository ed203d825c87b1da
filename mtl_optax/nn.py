# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""CPU-friendly neural-network pieces (requires flax).

Import explicitly: ``from mtl_optax import nn``. See `mtl_optax._src.nn`.
"""

from mtl_optax._src.nn import banded_conv
from mtl_optax._src.nn import banded_kernel_matrix
from mtl_optax._src.nn import BandedConv
from mtl_optax._src.nn import conv_from_patches
from mtl_optax._src.nn import default_block_width
from mtl_optax._src.nn import image_patches
from mtl_optax._src.nn import max_pool_2x2
from mtl_optax._src.nn import PatchConv

__all__ = (
    "banded_conv",
    "banded_kernel_matrix",
    "BandedConv",
    "conv_from_patches",
    "default_block_width",
    "image_patches",
    "max_pool_2x2",
    "PatchConv",
)
