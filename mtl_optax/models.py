# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Multi-task models (requires flax).

Import explicitly: ``from mtl_optax import models``. See `mtl_optax._src.resnet`.
"""

from mtl_optax._src.resnet import BasicBlock
from mtl_optax._src.resnet import Conv
from mtl_optax._src.resnet import CONV_IMPLS
from mtl_optax._src.resnet import conv2d
from mtl_optax._src.resnet import conv_patches
from mtl_optax._src.resnet import max_pool_3x3_s2
from mtl_optax._src.resnet import multi_task_resnet18
from mtl_optax._src.resnet import multi_task_resnet_small
from mtl_optax._src.resnet import MultiTaskResNet
from mtl_optax._src.resnet import ResNetEncoder

__all__ = (
    "BasicBlock",
    "Conv",
    "CONV_IMPLS",
    "conv2d",
    "conv_patches",
    "max_pool_3x3_s2",
    "multi_task_resnet18",
    "multi_task_resnet_small",
    "MultiTaskResNet",
    "ResNetEncoder",
)
