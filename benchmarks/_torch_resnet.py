# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""PyTorch side of `benchmarks/resnet_speed.py` (run with the torch venv).

The multi-task ResNet of `mtl_optax.models` in PyTorch (NCHW, CPU build of
torch, no torchvision needed): torchvision's ResNet-18 layout with a 1-channel
7x7/2 first convolution, 3x3/2 max-pool, four stages of basic blocks, global
average pool, ``fc`` to a 100-d feature, ReLU, one linear head per task (the
FS-MTL multi-MNIST network at ``width=64``, ``stage_sizes=(2, 2, 2, 2)``).
BatchNorm in training mode (momentum 0.1, eps 1e-5).

Driven over stdin/stdout exactly like `_torch_lenet.py`: one JSON object per
line (``setup``, ``run``, ``quit``), served by `_torch_harness.serve` (the
protocol is documented in `benchmarks/_torch_harness.py`).

Steps (`STEPS`: name -> builder(batch, seed) -> zero-argument callable doing
one full training step, two classification tasks):

* ``plain_<variant>``: summed loss, one backward, Adam
  (`_torch_harness.plain_step`).
* ``jac_mgda_<variant>``: LibMTL-style: one ``torch.autograd.grad`` per task
  on the shared (encoder) parameters, MGDA (closed form, m = 2), heads from
  their own loss, Adam (`_torch_harness.jacobian_step`).

Needs only torch and numpy; never imports JAX.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

# Run by path: this directory is on sys.path.
import _torch_harness  # pylint: disable=import-error

VARIANTS = {"small": dict(width=16, stage_sizes=(1, 1, 1, 1)),
            "resnet18": dict(width=64, stage_sizes=(2, 2, 2, 2))}


class BasicBlock(nn.Module):
  """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetEncoder(nn.Module):
  """1-channel ResNet trunk -> ``feature_dim`` features, ReLU."""

  def __init__(self, width=64, stage_sizes=(2, 2, 2, 2), feature_dim=100):
    super().__init__()
    self.conv1 = nn.Conv2d(1, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    blocks, cin = [], width
    for i, n in enumerate(stage_sizes):
      cout = width * 2 ** i
      for j in range(n):
        blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(cin, feature_dim)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    x = self.blocks(x)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return F.relu(self.fc(x))


class MultiTask(nn.Module):
  """Shared ResNet encoder, two linear classification heads."""

  def __init__(self, variant: str, num_tasks: int = 2):
    super().__init__()
    self.encoder = ResNetEncoder(**VARIANTS[variant])
    self.heads = nn.ModuleList([nn.Linear(100, 10) for _ in range(num_tasks)])

  def losses(self, batch):
    x, labels = batch
    z = self.encoder(x)
    return [F.cross_entropy(h(z), y) for h, y in zip(self.heads, labels)]


def make_batch(batch: int, seed: int):
  g = torch.Generator().manual_seed(seed)
  return (torch.rand(batch, 1, 36, 36, generator=g),
          [torch.randint(0, 10, (batch,), generator=g) for _ in range(2)])


def _builder(variant: str, kind: str):
  def build(batch, seed):
    torch.manual_seed(seed)
    model = MultiTask(variant).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if kind == "plain":
      return _torch_harness.plain_step(model, opt, batch)
    return _torch_harness.jacobian_step(model, opt, batch, "mgda")
  return build


# Extension point: add a step here (and the same name on the JAX side).
STEPS = {f"{kind}_{v}": _builder(v, kind) for v in VARIANTS
         for kind in ("plain", "jac_mgda")}


if __name__ == "__main__":
  _torch_harness.serve(STEPS, make_batch)
