# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Multi-MNIST benchmark models (benchmarks.md §1) with a functional interface.

Architecture (after the FS-MTL LeNet):

* encoder ``lenet``: conv 1->10 (9x9) -> ReLU -> maxpool 2 -> conv 10->20 (5x5)
  -> ReLU -> maxpool 2 -> flatten 500 -> dense 50 -> ReLU;
* encoder ``mlp``: flatten 1296 -> dense 256 -> ReLU -> dense 50 -> ReLU;
* encoders ``resnet18`` / ``resnet_small`` (with BatchNorm): the FS-MTL
  multi-MNIST ResNet-18 of `mtl_optax.models` (width 64, 2 blocks per stage)
  and a narrow variant for CPU (width 16, 1 block per stage), both ending in a
  100-d feature; ``*_reference`` use ``flax.linen.Conv`` (same parameters);
* head ``CL`` (classification): dense d->10 logits, cross-entropy, accuracy;
* head ``RR`` (reconstruction): dense d->256 -> ReLU -> dense 256->784 ->
  sigmoid, mean squared error against the 28x28 right (or left) digit
  (d = 50, or 100 for the ResNets);
* heads ``BC`` (binary attribute: dense d->2, cross-entropy, accuracy) and
  ``SR`` (scalar regression: dense d->1, squared error, MSE), used by the
  many-task sets of ``benchmarks.interference``; ``loss_scales`` multiplies the
  training losses per task (the metrics are unchanged).

Model state: the ResNet encoders carry BatchNorm statistics
(``has_state``). `MultiTaskModel.init_state` returns them as
``{"batch_stats": ...}`` (``{}`` for the other encoders),
`MultiTaskModel.stateful_task_losses` ``(params, model_state, batch) ->
(losses, new_model_state)`` trains with batch statistics (the
``has_state=True`` contract of `mtl_optax.task_grads`) and
`MultiTaskModel.task_metrics` / `task_losses` with a ``model_state`` evaluate
with the running averages.

Two implementations of the same LeNet with identical parameter trees:
``lenet`` (fast on XLA:CPU: conv1 from banded patches computed once per batch,
conv2 as a banded matrix product, reshape/select max-pool applied before the
bias and ReLU) and ``lenet_reference`` (``flax.linen.Conv`` +
``flax.linen.max_pool``, the straightforward version). Use ``lenet`` on CPU;
on GPU/TPU ``lenet_reference`` is the natural choice.

Parameters: ``{"encoder": <flax params>, "heads": {"task0": ..., "task1": ...}}``
-- the encoder is shared, ``heads/task{i}`` belongs to task ``i``.

Batches: ``{"images": (B, 36, 36, 1) float32, "targets": (t0, t1, ...)}`` with
``int`` labels ``(B,)`` for ``CL`` and ``(B, 784)`` float32 in [0, 1] for
``RR``; an optional ``"inputs"`` entry (from `MultiTaskModel.inputs`) skips the
patch computation, e.g. to hoist it out of a ``vmap`` over tasks.

Example::

  model = make_model("CL_RR")              # fast LeNet
  params = model.init(jax.random.key(0))
  losses = model.task_losses(params, batch)   # shape (2,)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtl_optax import models as mmodels
from mtl_optax import nn as mnn

TASK_KINDS = {"CL_CR": ("CL", "CL"), "CL_RR": ("CL", "RR"),
              "RL_RR": ("RR", "RR")}
RESNETS = {  # encoder -> (width, stage_sizes, conv_impl)
    "resnet18": (64, (2, 2, 2, 2), "patches"),
    "resnet18_reference": (64, (2, 2, 2, 2), "flax"),
    "resnet_small": (16, (1, 1, 1, 1), "patches"),
    "resnet_small_reference": (16, (1, 1, 1, 1), "flax"),
}
ENCODERS = ("lenet", "lenet_reference", "mlp", *RESNETS)
# Metric per head kind: (name, lower_is_better), for Δm%.
METRICS = {"CL": ("accuracy", False), "BC": ("accuracy", False), "RR": ("mse", True),
           "SR": ("mse", True)}

_CONV1 = dict(features=10, kernel_size=(9, 9))
_CONV2 = dict(features=20, kernel_size=(5, 5))


class _FastConvBlock(nn.Module):
  """conv -> maxpool 2 -> + bias -> ReLU, with `flax.linen.Conv` parameters.

  Pooling before the bias and ReLU gives identical values *and* gradients
  (max commutes with a per-channel shift and with the monotone ReLU, and the
  first-max routing picks the same element whenever the ReLU passes any
  gradient) with 4x less element-wise work.
  """

  features: int
  kernel_size: tuple[int, int]
  in_features: int
  block_width: int
  from_patches: bool

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.linear.default_kernel_init,
                        (*self.kernel_size, self.in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if self.from_patches:
      y = mnn.conv_from_patches(x, kernel, block_width=self.block_width)
    else:
      y = mnn.banded_conv(x, kernel, block_width=self.block_width)
    return nn.relu(mnn.max_pool_2x2(y) + bias)


class LeNetEncoder(nn.Module):
  """Fast LeNet encoder; input: conv1 patches from `lenet_patches`."""

  conv1_block_width: int = 7
  conv2_block_width: int = 10

  @nn.compact
  def __call__(self, patches):
    x = _FastConvBlock(**_CONV1, in_features=1, from_patches=True,
                       block_width=self.conv1_block_width, name="conv1")(patches)
    x = _FastConvBlock(**_CONV2, in_features=10, from_patches=False,
                       block_width=self.conv2_block_width, name="conv2")(x)
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(50, name="dense")(x))


class LeNetReferenceEncoder(nn.Module):
  """Straightforward LeNet encoder (``nn.Conv`` + ``nn.max_pool``); NHWC images."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(**_CONV1, padding="VALID", name="conv1")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(**_CONV2, padding="VALID", name="conv2")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(50, name="dense")(x))


class MLPEncoder(nn.Module):
  """MLP encoder: flatten -> dense ``hidden`` -> ReLU -> dense 50 -> ReLU."""

  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="dense0")(x))
    return nn.relu(nn.Dense(50, name="dense1")(x))


class ClassificationHead(nn.Module):
  """Dense 50 -> ``classes`` logits (10: a digit class; 2: a binary attribute)."""

  classes: int = 10

  @nn.compact
  def __call__(self, z):
    return nn.Dense(self.classes, name="out")(z)


class ScalarHead(nn.Module):
  """Dense 50 -> 1: a scalar regression (e.g. the sum of the two digits)."""

  @nn.compact
  def __call__(self, z):
    return nn.Dense(1, name="out")(z)[:, 0]


class ReconstructionHead(nn.Module):
  """Dense 50 -> 256 -> ReLU -> 784 -> sigmoid (a flattened 28x28 image)."""

  @nn.compact
  def __call__(self, z):
    z = nn.relu(nn.Dense(256, name="hidden")(z))
    return nn.sigmoid(nn.Dense(784, name="out")(z))


# Head kinds: CL (10 classes), BC (binary), RR (a 28x28 image), SR (a scalar).
_HEADS = {"CL": ClassificationHead, "BC": functools.partial(ClassificationHead, classes=2),
          "RR": ReconstructionHead, "SR": ScalarHead}


def lenet_patches(images: jax.Array, block_width: int = 7) -> jax.Array:
  """conv1 input of the fast LeNet: banded patches of the images (data side).

  Args:
    images: ``(B, 36, 36, 1)``.
    block_width: conv1 block width (must match the encoder's).

  Returns:
    ``(B, 28, 28 // block_width, 9 * (block_width + 8))`` patches.
  """
  return mnn.image_patches(images, (9, 9), block_width=block_width)


@dataclasses.dataclass(frozen=True)
class MultiTaskModel:
  """Shared encoder + one head per task, as pure functions of a params dict.

  Hashable, so it can be a static argument / closed over in ``jax.jit``.

  Attributes:
    tasks: head kind per task: ``"CL"`` (10 classes), ``"BC"`` (binary),
      ``"RR"`` (reconstruction) or ``"SR"`` (scalar regression).
    encoder: ``"lenet"`` (fast), ``"lenet_reference"``, ``"mlp"``,
      ``"resnet18"``, ``"resnet_small"`` (BatchNorm: see `has_state`) or
      their ``*_reference`` versions.
    conv1_block_width: fast LeNet conv1 block width (divides 28).
    conv2_block_width: fast LeNet conv2 block width (divides 10).
  """

  tasks: tuple[str, ...] = ("CL", "RR")
  encoder: str = "lenet"
  conv1_block_width: int = 7
  conv2_block_width: int = 10
  # Per-task factors of the training losses (None: all 1). The metrics are unchanged:
  # a factor only changes what the methods see (a loss-scale disparity).
  loss_scales: Optional[tuple[float, ...]] = None

  def __post_init__(self):
    if self.encoder not in ENCODERS:
      raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder}")
    if any(t not in _HEADS for t in self.tasks):
      raise ValueError(f"tasks must be among {tuple(_HEADS)}, got {self.tasks}")
    if self.loss_scales is not None and len(self.loss_scales) != len(self.tasks):
      raise ValueError(f"loss_scales has {len(self.loss_scales)} entries for "
                       f"{len(self.tasks)} tasks")

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def has_state(self) -> bool:
    """Whether the encoder has BatchNorm statistics (a model state)."""
    return self.encoder in RESNETS

  @property
  def feature_dim(self) -> int:
    return 100 if self.has_state else 50

  def _encoder_module(self) -> nn.Module:
    if self.has_state:
      width, stages, impl = RESNETS[self.encoder]
      return mmodels.ResNetEncoder(width=width, stage_sizes=stages, feature_dim=100,
                                   conv_impl=impl)
    if self.encoder == "lenet":
      return LeNetEncoder(self.conv1_block_width, self.conv2_block_width)
    if self.encoder == "lenet_reference":
      return LeNetReferenceEncoder()
    return MLPEncoder()

  def inputs(self, images: jax.Array) -> jax.Array:
    """What `encode` consumes: conv1 patches (``lenet``) or the images."""
    if self.encoder == "lenet":
      return jax.lax.stop_gradient(
          lenet_patches(images, self.conv1_block_width))
    return images

  def init(self, key: jax.Array) -> dict[str, Any]:
    """Initial parameters ``{"encoder": ..., "heads": {"task{i}": ...}}``.

    The same key gives the same values for ``lenet`` and ``lenet_reference``.
    """
    return _jit_init(self, key)[0]

  def init_state(self, key: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, model_state)``: `init`'s parameters and the initial state.

    ``model_state`` is ``{"batch_stats": ...}`` (the encoder's BatchNorm
    statistics) for the ResNet encoders and ``{}`` otherwise.
    """
    return _jit_init(self, key)

  def _init(self, key: jax.Array):
    k_enc, *k_heads = jax.random.split(key, 1 + self.num_tasks)
    x = jnp.zeros((1, 36, 36, 1), jnp.float32)
    if self.has_state:
      variables = self._encoder_module().init(k_enc, x, train=False)
      enc, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    else:
      enc, state = self._encoder_module().init(k_enc, self.inputs(x))["params"], {}
    z = jnp.zeros((1, self.feature_dim), jnp.float32)
    heads = {f"task{i}": _HEADS[t]().init(k, z)["params"]
             for i, (t, k) in enumerate(zip(self.tasks, k_heads))}
    return {"encoder": enc, "heads": heads}, state

  def encode(self, encoder_params, inputs: jax.Array, model_state=None) -> jax.Array:
    """Shared representation ``(B, feature_dim)`` from `inputs` (see `inputs`).

    With a model state (ResNet encoders): BatchNorm with running averages.
    """
    if self.has_state:
      if not model_state:
        raise ValueError(f"encoder {self.encoder!r} needs its model_state (init_state)")
      return self._encoder_module().apply(
          {"params": encoder_params, "batch_stats": model_state["batch_stats"]}, inputs,
          train=False)
    return self._encoder_module().apply({"params": encoder_params}, inputs)

  def encode_train(self, encoder_params, model_state, inputs: jax.Array):
    """``(z, new_model_state)``: training mode (BatchNorm batch statistics)."""
    if not self.has_state:
      return self.encode(encoder_params, inputs), model_state
    z, updates = self._encoder_module().apply(
        {"params": encoder_params, "batch_stats": model_state["batch_stats"]}, inputs,
        train=True, mutable=["batch_stats"])
    return z, {"batch_stats": updates["batch_stats"]}

  def head(self, i: int, head_params, z: jax.Array) -> jax.Array:
    """Task ``i``'s head: logits ``(B, 10)`` / ``(B, 2)``, image ``(B, 784)`` or ``(B,)``."""
    return _HEADS[self.tasks[i]]().apply({"params": head_params}, z)

  def _batch_inputs(self, batch):
    return batch["inputs"] if "inputs" in batch else self.inputs(batch["images"])

  def head_losses(self, heads_params, z: jax.Array, targets) -> jax.Array:
    """Per-task losses ``(m,)`` from a shared representation ``z``."""
    return self._scaled(jnp.stack([
        _loss(kind, self.head(i, heads_params[f"task{i}"], z), targets[i])
        for i, kind in enumerate(self.tasks)]))

  def _scaled(self, losses: jax.Array) -> jax.Array:
    if self.loss_scales is None:
      return losses
    return losses * jnp.asarray(self.loss_scales, losses.dtype)

  def per_task_head_losses(self, heads_params, zs: jax.Array, targets) -> jax.Array:
    """Per-task losses ``(m,)`` where head ``i`` reads its own representation ``zs[i]``.

    The ``heads_loss_fn`` of `mtl_optax.rotograd_update`: ``zs`` (m, B, d) are
    the per-task rotated copies of the shared representation.
    """
    return self._scaled(jnp.stack([
        _loss(kind, self.head(i, heads_params[f"task{i}"], zs[i]), targets[i])
        for i, kind in enumerate(self.tasks)]))

  def per_task_head_metrics(self, heads_params, zs: jax.Array, targets) -> jax.Array:
    """Per-task metrics ``(m,)`` (as `task_metrics`) with head ``i`` reading ``zs[i]``."""
    return jnp.stack([_metric(kind, self.head(i, heads_params[f"task{i}"], zs[i]), targets[i])
                      for i, kind in enumerate(self.tasks)])

  def task_losses(self, params, batch, model_state=None) -> jax.Array:
    """Per-task mean losses ``(m,)``: cross-entropy (CL) or MSE (RR).

    ResNet encoders: evaluation mode (pass ``model_state``); train with
    `stateful_task_losses`.
    """
    z = self.encode(params["encoder"], self._batch_inputs(batch), model_state)
    return self.head_losses(params["heads"], z, batch["targets"])

  def stateful_task_losses(self, params, model_state, batch):
    """``(losses, new_model_state)`` in training mode (``has_state=True`` form)."""
    z, new_state = self.encode_train(params["encoder"], model_state,
                                     self._batch_inputs(batch))
    return self.head_losses(params["heads"], z, batch["targets"]), new_state

  def task_metrics(self, params, batch, model_state=None) -> jax.Array:
    """Per-task metrics ``(m,)``: accuracy (CL, BC; higher is better) or MSE (RR, SR).

    ResNet encoders: BatchNorm with the running averages of ``model_state``.
    """
    z = self.encode(params["encoder"], self._batch_inputs(batch), model_state)
    out = []
    for i, kind in enumerate(self.tasks):
      pred = self.head(i, params["heads"][f"task{i}"], z)
      out.append(_metric(kind, pred, batch["targets"][i]))
    return jnp.stack(out)


# Jitted: initialising eagerly dispatches (and compiles) every slice of the
# patch construction one by one, ~8 s of CPU instead of ~0.5 s.
_jit_init = jax.jit(MultiTaskModel._init, static_argnums=0)  # pylint: disable=protected-access


def _loss(kind: str, pred: jax.Array, target: jax.Array) -> jax.Array:
  if kind in ("CL", "BC"):
    return optax.softmax_cross_entropy_with_integer_labels(pred, target).mean()
  return jnp.mean((pred - target) ** 2)


def _metric(kind: str, pred: jax.Array, target: jax.Array) -> jax.Array:
  if kind in ("CL", "BC"):
    return jnp.mean(jnp.argmax(pred, -1) == target)
  return jnp.mean((pred - target) ** 2)


def make_model(task: str = "CL_RR", encoder: str = "lenet",
               **kwargs) -> MultiTaskModel:
  """`MultiTaskModel` for a multi-MNIST task name (``CL_CR``/``CL_RR``/``RL_RR``)."""
  return MultiTaskModel(tasks=TASK_KINDS[task], encoder=encoder, **kwargs)
