# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""PyTorch side of `benchmarks/lenet_speed.py` (run with the torch venv).

The same multi-MNIST models as `benchmarks/models.py` (NCHW, CPU build of
torch) and the same training steps, driven over stdin/stdout so that the JAX
driver can interleave repeats of both sides in one run. One JSON object per
line::

  -> {"cmd": "setup", "batch": 256, "seed": 0, "threads": 2,
      "steps": ["plain", ...]}
  <- {"ok": true, "torch": "2.x", "threads": 2, "steps": [...]}
  -> {"cmd": "run", "step": "plain", "n": 1}
  <- {"step": "plain", "times": [seconds, ...]}
  -> {"cmd": "quit"}

Steps (the extension point is `STEPS`: name -> builder(model_kwargs) ->
zero-argument callable doing one full training step):

* ``plain`` / ``plain_mlp``: summed loss of the two tasks, backward, Adam.
* ``jac_mgda`` / ``jac_cagrad``: LibMTL-style: one ``torch.autograd.grad``
  per task on the shared (encoder) parameters, the aggregation (MGDA closed
  form for two tasks; CAGrad with scipy SLSQP on the host, as LibMTL and the
  CAGrad reference do), heads from their own loss, Adam.

Needs only torch, numpy (and scipy for CAGrad); never imports JAX.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


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


def plain_step(model, opt, batch):
  def step():
    opt.zero_grad(set_to_none=True)
    sum(model.losses(batch)).backward()
    opt.step()
  return step


def mgda_weights(gram: np.ndarray) -> np.ndarray:
  """Min-norm point of two gradients (closed form; m = 2 only)."""
  if gram.shape != (2, 2):
    raise NotImplementedError("torch MGDA baseline: two tasks only")
  g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
  denom = g11 + g22 - 2 * g12
  a = 0.5 if denom <= 0 else float(np.clip((g22 - g12) / denom, 0.0, 1.0))
  return np.array([a, 1.0 - a])


def cagrad_direction(grads: torch.Tensor, c: float = 0.4) -> torch.Tensor:
  """CAGrad (rescale=1) with the dual solved by scipy SLSQP, as in LibMTL."""
  from scipy.optimize import minimize  # pylint: disable=g-import-not-at-top
  m = grads.shape[0]
  gram = (grads @ grads.T).double().numpy()
  g0_norm = np.sqrt(gram.mean() + 1e-8)
  b = np.ones(m) / m
  coef = c * g0_norm

  def objective(w):
    return w @ gram @ b + coef * np.sqrt(w @ gram @ w + 1e-8)

  res = minimize(objective, b, bounds=[(0, 1)] * m,
                 constraints={"type": "eq", "fun": lambda w: 1 - w.sum()})
  w = torch.as_tensor(res.x, dtype=grads.dtype)
  gw = w @ grads
  g0 = grads.mean(0)
  return (g0 + coef / (gw.norm() + 1e-8) * gw) / (1 + c * c)


def jacobian_step(model, opt, batch, method: str):
  shared = list(model.encoder.parameters())
  heads = list(model.heads.parameters())

  def step():
    opt.zero_grad(set_to_none=True)
    losses = model.losses(batch)
    rows = []
    for loss in losses:  # one backward per task (LibMTL's loop)
      g = torch.autograd.grad(loss, shared, retain_graph=True)
      rows.append(torch.cat([t.reshape(-1) for t in g]))
    grads = torch.stack(rows)
    if method == "mgda":
      w = torch.as_tensor(mgda_weights((grads @ grads.T).double().numpy()),
                          dtype=grads.dtype)
      direction = w @ grads
    else:
      direction = cagrad_direction(grads)
    head_grads = torch.autograd.grad(sum(losses), heads)
    offset = 0
    for p in shared:
      p.grad = direction[offset:offset + p.numel()].view_as(p).clone()
      offset += p.numel()
    for p, g in zip(heads, head_grads):
      p.grad = g
    opt.step()
  return step


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
    direction = cagrad_direction(torch.stack(loss_rows)) + cagrad_direction(torch.stack(flat_rows))
    offset = 0
    for p in shared:
      p.grad = direction[offset:offset + p.numel()].view_as(p).clone()
      offset += p.numel()
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
      return plain_step(model, opt, batch)
    if kind == "flat_cagrad":
      return flat_cagrad_step(model, opt, batch)
    return jacobian_step(model, opt, batch, kind)
  return build


# Extension point: add a step here (and the same name on the JAX side).
STEPS = {
    "flat_cagrad": _builder("lenet", "flat_cagrad"),
    "plain": _builder("lenet", "plain"),
    "plain_mlp": _builder("mlp", "plain"),
    "jac_mgda": _builder("lenet", "mgda"),
    "jac_cagrad": _builder("lenet", "cagrad"),
}


def main():
  steps = {}
  for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "setup":
      torch.set_num_threads(msg.get("threads", 2))
      batch = make_batch(msg.get("batch", 256), msg.get("seed", 0))
      names = [s for s in msg["steps"] if s in STEPS]
      steps = {s: STEPS[s](batch, msg.get("seed", 0)) for s in names}
      reply = {"ok": True, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "steps": names}
    elif msg["cmd"] == "run":
      step, times = steps[msg["step"]], []
      for _ in range(msg.get("n", 1)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
      reply = {"step": msg["step"], "times": times}
    else:
      break
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  main()
