# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Multi-MNIST ResNet training step (BatchNorm): JAX vs PyTorch, one run.

The FS-MTL multi-MNIST setting: two classification tasks (CL_CR), 36x36
images, batch 256 (``--batch``), Adam. Models (`benchmarks.models`, built on
`mtl_optax.models`): ``resnet_small`` (width 16, one basic block per stage)
and ``resnet18`` (width 64, two blocks per stage: the paper's network), both
with BatchNorm in training mode; the PyTorch side
(`benchmarks/_torch_resnet.py`, ``torch.set_num_threads(2)``) builds the same
networks. Repeats are interleaved (JAX, torch, JAX, ...) after a warm-up, as
in `benchmarks/lenet_speed.py` (the shared driver is
`benchmarks/_speed_harness.py`); medians, minima, the ratio of medians
JAX / torch and each JAX step's compile + first step time.

Rows (JAX step vs torch step):
* ``plain_small`` / ``plain_small_flax`` vs ``plain_small``: summed loss, one
  backward, Adam, BatchNorm statistics carried; the fast (im2col) model and
  the ``flax.linen.Conv`` one (same maths).
* ``jac_mgda_small`` vs ``jac_mgda_small``: ``mo.task_grads(...,
  has_state=True)`` (default ``chunk_size="auto"``: tasks in sequence on
  CPU) + ``mo.mgda`` (heads: their own gradient) + Adam, against LibMTL-style
  per-task ``autograd.grad`` + closed-form two-task MGDA.
* ``plain_resnet18`` / ``jac_mgda_resnet18``: the same for ResNet-18.

Usage::

  .venv/bin/python -m benchmarks.resnet_speed                 # all rows
  .venv/bin/python -m benchmarks.resnet_speed --quick         # small plain, 3 repeats
  .venv/bin/python -m benchmarks.resnet_speed --steps plain_small jac_mgda_small

Writes ``benchmarks/results/resnet_speed.json`` (``resnet_speed_quick.json``
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


def make_batch(batch: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"images": rng.random((batch, 36, 36, 1), dtype=np.float32),
          "targets": tuple(rng.integers(0, 10, batch).astype(np.int32) for _ in range(2))}


def plain_step(encoder: str, batch: int, seed: int = 0) -> Callable[[], None]:
  """Summed loss of the two tasks, one backward pass, Adam(1e-3), BN state."""
  model = models.make_model("CL_CR", encoder=encoder)
  opt = optax.adam(1e-3)
  params, model_state = model.init_state(jax.random.key(seed))

  @jax.jit
  def step(params, opt_state, model_state, batch):
    def loss(p):
      losses, new_state = model.stateful_task_losses(p, model_state, batch)
      return losses.sum(), new_state
    (value, model_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, model_state, value

  return harness.runner(step, (params, opt.init(params), model_state), make_batch(batch, seed))


def mgda_step(encoder: str, batch: int, seed: int = 0) -> Callable[[], None]:
  """``mo.task_grads(has_state=True)`` + MGDA (heads: own gradient) + Adam."""
  import mtl_optax as mo  # pylint: disable=g-import-not-at-top
  model = models.make_model("CL_CR", encoder=encoder)
  tx = optax.chain(mo.mgda(task_specific=harness.is_head), optax.adam(1e-3))
  params, model_state = model.init_state(jax.random.key(seed))

  @jax.jit
  def step(params, opt_state, model_state, batch):
    (losses, model_state), grads = mo.task_grads(
        model.stateful_task_losses, params, model_state, batch, has_state=True)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state, model_state, losses.sum()

  return harness.runner(step, (params, tx.init(params), model_state), make_batch(batch, seed))


JAX_STEPS: dict[str, Callable[[int], Callable[[], None]]] = {
    "plain_small": lambda b: plain_step("resnet_small", b),
    "plain_small_flax": lambda b: plain_step("resnet_small_reference", b),
    "jac_mgda_small": lambda b: mgda_step("resnet_small", b),
    "plain_resnet18": lambda b: plain_step("resnet18", b),
    "plain_resnet18_flax": lambda b: plain_step("resnet18_reference", b),
    "jac_mgda_resnet18": lambda b: mgda_step("resnet18", b),
}
# (JAX step, PyTorch step doing the same work)
ROWS = (("plain_small", "plain_small"), ("plain_small_flax", "plain_small"),
        ("jac_mgda_small", "jac_mgda_small"), ("plain_resnet18", "plain_resnet18"),
        ("jac_mgda_resnet18", "jac_mgda_resnet18"))
EXTRA_ROWS = (("plain_resnet18_flax", "plain_resnet18"),)
QUICK_ROWS = (("plain_small", "plain_small"),)


BENCHMARK = harness.Benchmark(
    name="resnet_speed", torch_script="_torch_resnet.py",
    build=lambda name, batch: JAX_STEPS[name](batch),
    rows=ROWS, quick_rows=QUICK_ROWS, extra_rows=EXTRA_ROWS, repeats=7,
    warmup=2, quick_help="resnet_small plain step only, 3 repeats",
    batch_flag=True, progress="log", compile_times=True,
    report_extra={"tasks": "CL_CR"}, title="ResNet step (CL_CR)",
    table_widths=(20, 18, 18), number_widths=(9, 7),
    plot_title="ResNet step (BatchNorm)", figsize=(8, 3.8), log_scale=True)


def main(argv=None) -> dict:
  return harness.main(BENCHMARK, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
