# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Shared PyTorch side of the speed benchmarks (run with the torch venv).

`benchmarks/_torch_lenet.py` and `benchmarks/_torch_resnet.py` define their
models and a ``STEPS`` table (name -> builder(batch, seed) -> zero-argument
callable doing one full training step) and call `serve`, which answers the
JAX driver (`benchmarks/_speed_harness.py`) over stdin/stdout, one JSON object
per line::

  -> {"cmd": "setup", "batch": 256, "seed": 0, "threads": 2,
      "steps": ["plain", ...]}
  <- {"ok": true, "torch": "2.x", "threads": 2, "steps": [...]}
  -> {"cmd": "run", "step": "plain", "n": 1}
  <- {"step": "plain", "times": [seconds, ...]}
  -> {"cmd": "quit"}

``setup`` keeps the requested steps that ``STEPS`` knows (and says which);
``run`` times ``n`` calls of one step.

Also the training steps both scripts use, for a model with ``encoder``
(shared) and ``heads`` (one per task) submodules and a ``losses(batch)``
method returning one loss per task:

* `plain_step`: summed loss, one backward, optimizer step.
* `jacobian_step`: LibMTL-style: one ``torch.autograd.grad`` per task on the
  shared parameters, an aggregation (MGDA closed form for two tasks, or
  CAGrad with scipy SLSQP on the host, as LibMTL and the CAGrad reference do),
  heads from their own loss, optimizer step.

The scripts are run by path, so this directory is on ``sys.path`` and they
import this module as ``_torch_harness``. Needs only torch and numpy (and
scipy for CAGrad); never imports JAX.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

import numpy as np
import torch

Step = Callable[[], None]


def serve(steps: dict[str, Callable[..., Step]],
          make_batch: Callable[[int, int], object]) -> None:
  """Answers the JSON-lines protocol on stdin/stdout until ``quit`` or EOF.

  Args:
    steps: step name -> ``builder(batch, seed)`` -> one-training-step callable.
    make_batch: ``make_batch(batch_size, seed)`` -> the batch the builders take.
  """
  built = {}
  for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "setup":
      torch.set_num_threads(msg.get("threads", 2))
      batch = make_batch(msg.get("batch", 256), msg.get("seed", 0))
      names = [s for s in msg["steps"] if s in steps]
      built = {s: steps[s](batch, msg.get("seed", 0)) for s in names}
      reply = {"ok": True, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "steps": names}
    elif msg["cmd"] == "run":
      step, times = built[msg["step"]], []
      for _ in range(msg.get("n", 1)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
      reply = {"step": msg["step"], "times": times}
    else:
      break
    print(json.dumps(reply), flush=True)


def plain_step(model, opt, batch) -> Step:
  """Summed loss of the tasks, one backward pass, ``opt.step()``."""
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


def set_flat_grad(params, direction: torch.Tensor) -> None:
  """Sets ``p.grad`` of each parameter from its slice of a flat vector."""
  offset = 0
  for p in params:
    p.grad = direction[offset:offset + p.numel()].view_as(p).clone()
    offset += p.numel()


def jacobian_step(model, opt, batch, method: str) -> Step:
  """Per-task ``autograd.grad`` on the encoder, ``method`` ("mgda" or
  "cagrad") aggregation, heads from their own loss, ``opt.step()``."""
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
    set_flat_grad(shared, direction)
    for p, g in zip(heads, head_grads):
      p.grad = g
    opt.step()
  return step
