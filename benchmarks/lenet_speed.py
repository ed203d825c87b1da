# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Multi-MNIST LeNet training step: JAX (naive, fast) vs PyTorch, one run.

Each row pairs a JAX step with the PyTorch step doing the same work (same
architecture, batch 256 of 36x36 images, two tasks CL + RR, Adam), run in a
subprocess with the torch venv's python (`benchmarks/_torch_lenet.py`,
``torch.set_num_threads(2)``). Repeats are interleaved (JAX, torch, JAX, ...)
after a warm-up, so both sides see the same machine load; we report medians,
minima and the ratio of medians JAX / torch.

Rows:
* ``plain_naive`` / ``plain_fast`` vs torch ``plain``: summed loss, one
  backward, Adam; naive = `flax.linen.Conv` + `nn.max_pool` LeNet, fast = the
  banded-patches LeNet of `benchmarks.models` (identical maths).
* ``plain_mlp`` vs torch ``plain_mlp``: the MLP-encoder variant.
* ``jac_mgda`` / ``jac_cagrad`` vs torch ``jac_*`` (when `mtl_optax` provides
  ``task_grads``/``mgda``/``cagrad``): per-task gradients (``task_grads``,
  jacrev mode, fast LeNet) + aggregation + Adam, against LibMTL-style
  per-task ``autograd.grad`` loops (CAGrad's dual via scipy on the host).
  ``jac_*_seq``: the same with ``task_grads(..., chunk_size=1)`` (one task at
  a time), the faster choice on XLA:CPU.
* ``flat_cagrad`` vs torch ``flat_cagrad``: F-CAGrad (decomposed, ρ = 0.05, not
  adaptive, separate shared/head norms) against the paper's per-task Python loop
  (perturb in place, second backward, restore), CAGrad's dual via scipy.

Extension point: add a JAX step builder to `JAX_STEPS` and a row to `ROWS`
(and, for a PyTorch counterpart, a builder to ``_torch_lenet.STEPS``). The
driver (subprocess, interleaved timing, table, JSON, plot, command line) is
shared with `benchmarks/resnet_speed.py`: `benchmarks/_speed_harness.py`.

Usage::

  .venv/bin/python -m benchmarks.lenet_speed            # full, ~2-4 min
  .venv/bin/python -m benchmarks.lenet_speed --quick    # seconds

Writes ``benchmarks/results/lenet_speed.json`` (``lenet_speed_quick.json``
with ``--quick``) and a PNG bar chart next to it.
"""

from __future__ import annotations

import sys
from typing import Callable

import jax
import numpy as np
import optax

from benchmarks import _speed_harness as harness
from benchmarks import models

BATCH = harness.BATCH


def make_batch(batch: int = BATCH, seed: int = 0) -> dict:
  """Random images / labels / target images (the work does not depend on them)."""
  rng = np.random.default_rng(seed)
  return {"images": rng.random((batch, 36, 36, 1), dtype=np.float32),
          "targets": (rng.integers(0, 10, batch).astype(np.int32),
                      rng.random((batch, 784), dtype=np.float32))}


def plain_step(encoder: str, seed: int = 0) -> Callable[[], None]:
  """Summed loss of the two tasks, one backward pass, Adam(1e-3)."""
  model = models.make_model("CL_RR", encoder=encoder)
  opt = optax.adam(1e-3)
  params = model.init(jax.random.key(seed))

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: model.task_losses(p, batch).sum())(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return harness.runner(step, (params, opt.init(params)), make_batch(seed=seed))


def jacobian_step(method: str, encoder: str = "lenet", seed: int = 0,
                  chunk_size: int | None = None) -> Callable[[], None]:
  """Per-task gradients + an mtl_optax aggregator (heads: own gradient) + Adam.

  ``chunk_size=1`` computes the task gradients one task at a time (``lax.map``),
  which on XLA:CPU avoids the batched (vmapped) convolution backward passes.
  """
  import mtl_optax as mo  # pylint: disable=g-import-not-at-top
  model = models.make_model("CL_RR", encoder=encoder)
  aggregator = getattr(mo, method)(task_specific=harness.is_head)
  tx = optax.chain(aggregator, optax.adam(1e-3))
  params = model.init(jax.random.key(seed))

  @jax.jit
  def step(params, opt_state, batch):
    losses, grads = mo.task_grads(model.task_losses, params, batch, chunk_size=chunk_size)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses.sum()

  return harness.runner(step, (params, tx.init(params)), make_batch(seed=seed))


def flat_step(method: str = "cagrad", rho: float = 0.05, seed: int = 0,
              chunk_size: int | None = 1) -> Callable[[], None]:
  """F-<method>: loss and per-task SAM gradients (one vmapped/chunked pass each),
  ``mo.flat`` (decomposed: A(g) + A(g^SAM − g), heads their SAM gradient), Adam.
  Same perturbation as the PyTorch side: ε_i = ρ g/‖g‖, shared and head parts
  normalised separately, not adaptive."""
  import mtl_optax as mo  # pylint: disable=g-import-not-at-top
  model = models.make_model("CL_RR", encoder="lenet")
  tx = optax.chain(mo.flat(getattr(mo, method)(num_tasks=2), task_specific=harness.is_head),
                   optax.adam(1e-3))
  perturb = mo.task_perturbation(rho, rho, task_specific=harness.is_head)
  params = model.init(jax.random.key(seed))

  @jax.jit
  def step(params, opt_state, batch):
    losses, grads, sam = mo.sharpness_aware_task_grads(
        model.task_losses, params, batch, perturbation=perturb, chunk_size=chunk_size)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses, sam_grads=sam)
    return optax.apply_updates(params, updates), opt_state, losses.sum()

  return harness.runner(step, (params, tx.init(params)), make_batch(seed=seed))


def _has_aggregators() -> bool:
  import mtl_optax as mo  # pylint: disable=g-import-not-at-top
  return all(hasattr(mo, n) for n in ("task_grads", "mgda", "cagrad"))


# name -> (builder, available?)
JAX_STEPS: dict[str, tuple[Callable[[], Callable[[], None]],
                           Callable[[], bool]]] = {
    "plain_naive": (lambda: plain_step("lenet_reference"), lambda: True),
    "plain_fast": (lambda: plain_step("lenet"), lambda: True),
    "plain_mlp": (lambda: plain_step("mlp"), lambda: True),
    "jac_mgda": (lambda: jacobian_step("mgda"), _has_aggregators),
    "jac_cagrad": (lambda: jacobian_step("cagrad"), _has_aggregators),
    "jac_mgda_seq": (lambda: jacobian_step("mgda", chunk_size=1), _has_aggregators),
    "jac_cagrad_seq": (lambda: jacobian_step("cagrad", chunk_size=1), _has_aggregators),
    "flat_cagrad": (lambda: flat_step("cagrad"), _has_aggregators),
}
# (JAX step, PyTorch step doing the same work)
ROWS = (("plain_naive", "plain"), ("plain_fast", "plain"),
        ("plain_mlp", "plain_mlp"), ("jac_mgda", "jac_mgda"),
        ("jac_cagrad", "jac_cagrad"), ("jac_mgda_seq", "jac_mgda"),
        ("jac_cagrad_seq", "jac_cagrad"), ("flat_cagrad", "flat_cagrad"))
QUICK_ROWS = (("plain_fast", "plain"),)


BENCHMARK = harness.Benchmark(
    name="lenet_speed", torch_script="_torch_lenet.py",
    build=lambda name, batch: JAX_STEPS[name][0](),
    available=lambda name: JAX_STEPS[name][1](),
    rows=ROWS, quick_rows=QUICK_ROWS, repeats=11, warmup=3,
    quick_help="fast LeNet plain step only, 3 repeats",
    title="LeNet step", plot_title="LeNet step")


def main(argv=None) -> dict:
  return harness.main(BENCHMARK, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
