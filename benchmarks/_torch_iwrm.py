# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""PyTorch side of `benchmarks/iwrm.py` (instance-wise risk minimisation).

The same MLP as the JAX side (32 → 128 → 128 → 1, tanh, one squared error per
example, Adam); the batch size m is the number of tasks. Steps, served over
the JSON-lines protocol of `_torch_harness.py`:

* ``plain``: the mean of the per-example losses, one backward pass.
* ``autogram_<w>``: TorchJD's Gramian engine on the whole model with
  ``batch_dim=0`` (its documented IWRM usage): the m × m Gramian from module
  hooks, weights from ``<W>Weighting``, one backward pass of the weighted losses.
* ``autojac_<w>``: TorchJD's ``autojac.backward`` (the stacked m × n Jacobian)
  and ``jac_to_grad`` with the ``<W>`` aggregator.

Needs torch, torchjd and numpy; never imports JAX.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import _torch_harness  # pylint: disable=g-bad-import-order

warnings.filterwarnings("ignore")

D_IN, HIDDEN = 32, 128


def make_model(seed):
  torch.manual_seed(seed)
  return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                       nn.Linear(HIDDEN, 1))


def make_batch(batch, seed):
  g = torch.Generator().manual_seed(seed + 1)
  x = torch.randn(batch, D_IN, generator=g)
  return x, torch.sin(x[:, 0]) + 0.1 * torch.randn(batch, generator=g)


def per_example_losses(model, batch):
  x, y = batch
  return (model(x).squeeze(1) - y) ** 2


def plain(batch, seed):
  model = make_model(seed)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)

  def step():
    opt.zero_grad(set_to_none=True)
    per_example_losses(model, batch).mean().backward()
    opt.step()
  return step


def autogram(weighting_name):
  def build(batch, seed):
    from torchjd import aggregation  # pylint: disable=g-import-not-at-top
    from torchjd.autogram import Engine  # pylint: disable=g-import-not-at-top
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine = Engine(model, batch_dim=0)
    weighting = getattr(aggregation, f"{weighting_name}Weighting")()

    def step():
      opt.zero_grad(set_to_none=True)
      losses = per_example_losses(model, batch)
      losses.backward(weighting(engine.compute_gramian(losses)))
      opt.step()
    return step
  return build


def autojac(aggregator_name):
  def build(batch, seed):
    from torchjd import aggregation  # pylint: disable=g-import-not-at-top
    from torchjd.autojac import backward, jac_to_grad  # pylint: disable=g-import-not-at-top
    model = make_model(seed)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    aggregator = getattr(aggregation, aggregator_name)()

    def step():
      opt.zero_grad(set_to_none=True)
      backward(per_example_losses(model, batch))
      jac_to_grad(params, aggregator)
      opt.step()
    return step
  return build


STEPS = {"plain": plain,
         "autogram_mgda": autogram("MGDA"), "autogram_upgrad": autogram("UPGrad"),
         "autojac_mgda": autojac("MGDA"), "autojac_upgrad": autojac("UPGrad")}

if __name__ == "__main__":
  _torch_harness.serve(STEPS, make_batch)
