# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""PyTorch side of `benchmarks/lenet_speed.py` (run with the torch venv).

The same multi-MNIST models as `benchmarks/models.py` (NCHW, CPU build of
torch) and the same training steps, driven over stdin/stdout so that the JAX
driver can interleave repeats of both sides in one run: one JSON object per
line (``setup``, ``run``, ``quit``), served by `_torch_harness.serve` (the
protocol is documented in `benchmarks/_torch_harness.py`).

Steps (the extension point is `STEPS`: name -> builder(batch, seed) ->
zero-argument callable doing one full training step):

* ``plain`` / ``plain_mlp``: summed loss of the two tasks, backward, Adam
  (`_torch_harness.plain_step`).
* ``jac_mgda`` / ``jac_cagrad``: LibMTL-style: one ``torch.autograd.grad``
  per task on the shared (encoder) parameters, the aggregation (MGDA closed
  form for two tasks; CAGrad with scipy SLSQP on the host, as LibMTL and the
  CAGrad reference do), heads from their own loss, Adam
  (`_torch_harness.jacobian_step`).
* ``flat_cagrad``: F-CAGrad as the paper's code does it (`flat_cagrad_step`).

Needs only torch, numpy (and scipy for CAGrad); never imports JAX.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

# Run by path: this directory is on sys.path.
import _torch_harness  # pylint: disable=import-error


class LeNetEncoder(nn.Module):
  """conv 1->10 (9x9) -> ReLU -> pool -> conv 10->20 (5x5) -> ReLU -> pool
  -> flatten 500 -> dense 50 -> ReLU."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 10, 9)
    self.conv2 = nn.Conv2d(10, 20, 5)
    self.dense = nn.Linear(500, 50)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return F.relu(self.dense(x.flatten(1)))


class MLPEncoder(nn.Module):
  """flatten 1296 -> dense 256 -> ReLU -> dense 50 -> ReLU."""

  def __init__(self):
    super().__init__()
    self.dense0 = nn.Linear(36 * 36, 256)
    self.dense1 = nn.Linear(256, 50)

  def forward(self, x):
    return F.relu(self.dense1(F.relu(self.dense0(x.flatten(1)))))


class ReconstructionHead(nn.Module):

  def __init__(self):
    super().__init__()
    self.hidden = nn.Linear(50, 256)
    self.out = nn.Linear(256, 784)

  def forward(self, z):
    return torch.sigmoid(self.out(F.relu(self.hidden(z))))


class MultiTask(nn.Module):
  """Shared encoder, classification head (task 0), reconstruction head (task 1)."""

  def __init__(self, encoder: str = "lenet"):
    super().__init__()
    self.encoder = LeNetEncoder() if encoder == "lenet" else MLPEncoder()
    self.heads = nn.ModuleList([nn.Linear(50, 10), ReconstructionHead()])

  def losses(self, batch):
    x, label, image = batch
    z = self.encoder(x)
    return [F.cross_entropy(self.heads[0](z), label),
            F.mse_loss(self.heads[1](z), image)]


def make_batch(batch: int, seed: int):
  g = torch.Generator().manual_seed(seed)
  return (torch.rand(batch, 1, 36, 36, generator=g),
          torch.randint(0, 10, (batch,), generator=g),
          torch.rand(batch, 784, generator=g))


def flat_cagrad_step(model, opt, batch, rho: float = 0.05):
  """F-CAGrad as the paper's code does it: a Python loop over tasks.

  For each task i: ∇L_i at θ (shared + its head), perturb the parameters in place
  by ε_i = ρ g/‖g‖ (shared and head parts normalised separately), ∇L_i at θ + ε_i,
  restore. Shared update = CAGrad(g_1..g_m) + CAGrad(h_1..h_m), h_i = g_i^SAM − g_i;
  each head gets its own SAM gradient; Adam.
  """
  shared = list(model.encoder.parameters())
  heads = [list(h.parameters()) for h in model.heads]

  def flat(grads):
    return torch.cat([t.reshape(-1) for t in grads])

  def step():
    opt.zero_grad(set_to_none=True)
    loss_rows, flat_rows, head_sam = [], [], []
    for i in range(len(heads)):
      params = shared + heads[i]
      g = torch.autograd.grad(model.losses(batch)[i], params)
      g_sh, g_hd = g[:len(shared)], g[len(shared):]
      eps = []
      for part in (g_sh, g_hd):
        norm = torch.sqrt(sum((t * t).sum() for t in part)) + 1e-12
        eps.extend(rho * t / norm for t in part)
      with torch.no_grad():
        for p, e in zip(params, eps):
          p.add_(e)
      g_sam = torch.autograd.grad(model.losses(batch)[i], params)
      with torch.no_grad():
        for p, e in zip(params, eps):
          p.sub_(e)
      loss_rows.append(flat(g_sh))
      flat_rows.append(flat(g_sam[:len(shared)]) - loss_rows[-1])
      head_sam.append(g_sam[len(shared):])
    direction = (_torch_harness.cagrad_direction(torch.stack(loss_rows))
                 + _torch_harness.cagrad_direction(torch.stack(flat_rows)))
    _torch_harness.set_flat_grad(shared, direction)
    for params, grads in zip(heads, head_sam):
      for p, g in zip(params, grads):
        p.grad = g
    opt.step()
  return step


def _builder(encoder: str, kind: str):
  def build(batch, seed):
    torch.manual_seed(seed)
    model = MultiTask(encoder)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if kind == "plain":
      return _torch_harness.plain_step(model, opt, batch)
    if kind == "flat_cagrad":
      return flat_cagrad_step(model, opt, batch)
    return _torch_harness.jacobian_step(model, opt, batch, kind)
  return build


# Extension point: add a step here (and the same name on the JAX side).
STEPS = {
    "flat_cagrad": _builder("lenet", "flat_cagrad"),
    "plain": _builder("lenet", "plain"),
    "plain_mlp": _builder("mlp", "plain"),
    "jac_mgda": _builder("lenet", "mgda"),
    "jac_cagrad": _builder("lenet", "cagrad"),
}


if __name__ == "__main__":
  _torch_harness.serve(STEPS, make_batch)
