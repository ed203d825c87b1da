# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Step time of the flat (sharpness-aware) step vs the plain step (benchmarks.md §4).

Every step is one jitted training step (per-task gradients, aggregation, Adam)
on the multi-MNIST models of `benchmarks.models` (fast LeNet by default; batch
256 of random 36x36 images -- the work does not depend on the pixels):

* ``plain_sum`` -- gradient of the summed loss (one backward), Adam: the
  yardstick of a single-task step;
* ``mean`` -- ``mo.task_grads`` (jacrev: 1 forward + m backward, vmapped over
  tasks) + ``mo.mean`` + Adam: the plain MTL step of this library;
* ``flat_mean`` -- ``mo.sharpness_aware_task_grads`` + ``mo.flat(mo.mean())``
  (loss gradients + m perturbed forward/backward passes in one vmap);
* ``*_c1`` -- the same with ``chunk_size=1``: tasks in sequence
  (``lax.map``) in both the loss-gradient and the perturbed passes. On
  XLA:CPU this is much faster for the LeNet (vmapped, batched weights make
  slow batched matmuls), so the CPU target "flat / plain <= 3.5x" is read on
  the pair ``flat_mean_c1`` / ``mean_c1`` (same chunking on both sides);
* ``flat_mean_tl_c1`` -- with ``task_loss_fn`` (task i evaluates only head i
  via ``lax.switch``, which really branches when tasks run in sequence);
* ``cagrad_c1`` / ``flat_cagrad_c1`` -- CAGrad (c = 0.4) and F-CAGrad.

Perturbation as in the FS-MTL multi-MNIST run script: adaptive, rho = 2, one
norm per task over the trunk and its head (``norm="joint"``). Repeats are
interleaved over the steps (same machine load for all); medians and minima are
reported with the machine's load average (the machine is shared).

Usage::

  .venv/bin/python -m benchmarks.flat_speed             # LeNet CL_CR + CL_RR, MLP
  .venv/bin/python -m benchmarks.flat_speed --quick     # MLP encoder, few repeats

Writes ``benchmarks/results/flat_speed.json`` (``flat_speed_quick.json`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mo
from benchmarks import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BATCH = 256
RHO = 2.0


def make_batch(task: str, batch: int = BATCH, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  targets = []
  for kind in models.TASK_KINDS[task]:
    if kind == "CL":
      targets.append(rng.integers(0, 10, batch).astype(np.int32))
    else:
      targets.append(rng.random((batch, 784), dtype=np.float32))
  return {"images": rng.random((batch, 36, 36, 1), dtype=np.float32), "targets": tuple(targets)}


def _is_head(path, _) -> bool:
  return getattr(path[0], "key", None) == "heads"


def _head_loss(kind, pred, target):
  if kind == "CL":
    return optax.softmax_cross_entropy_with_integer_labels(pred, target).mean()
  return jnp.mean((pred - target) ** 2)


def build(step: str, task: str, encoder: str, seed: int = 0) -> Callable[[], None]:
  """Zero-argument callable running one jitted step of ``step`` (state carried)."""
  model = models.make_model(task, encoder=encoder)
  params = model.init(jax.random.key(seed))
  batch = jax.device_put(make_batch(task, seed=seed))

  def with_inputs(b):  # conv1 patches once per step (data side), shared by all passes
    return dict(b, inputs=model.inputs(b["images"]))

  def task_loss_fn(p, i, b):
    z = model.encode(p["encoder"], b["inputs"])
    branches = [
        (lambda z, k=k, kind=kind: _head_loss(kind, model.head(k, p["heads"][f"task{k}"], z),
                                              b["targets"][k]))
        for k, kind in enumerate(model.tasks)]
    return jax.lax.switch(i, branches, z)

  perturb = mo.task_perturbation(RHO, RHO, adaptive=True, task_specific=_is_head, norm="joint")
  if step == "plain_sum":
    tx = optax.adam(1e-3)

    @jax.jit
    def fn(p, s, b):
      b = with_inputs(b)
      loss, g = jax.value_and_grad(lambda q: model.task_losses(q, b).sum())(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss
  else:
    method, flat, chunk, use_tl = SPECS[step]
    agg = (mo.flat(getattr(mo, method)(num_tasks=model.num_tasks), task_specific=_is_head)
           if flat else getattr(mo, method)(task_specific=_is_head, num_tasks=model.num_tasks))
    tx = optax.chain(agg, optax.adam(1e-3))
    kw = dict(chunk_size=chunk)
    if use_tl:
      kw["task_loss_fn"] = task_loss_fn

    @jax.jit
    def fn(p, s, b):
      b = with_inputs(b)
      if flat:
        losses, g, sam = mo.sharpness_aware_task_grads(model.task_losses, p, b,
                                                       perturbation=perturb, **kw)
        u, s = tx.update(g, s, p, losses=losses, sam_grads=sam)
      else:
        losses, g = mo.task_grads(model.task_losses, p, b, **kw)
        u, s = tx.update(g, s, p, losses=losses)
      return optax.apply_updates(p, u), s, losses.sum()

  state = [params, tx.init(params)]

  def run():
    state[0], state[1], loss = fn(state[0], state[1], batch)
    jax.block_until_ready(loss)
  return run


# name -> (aggregator, flat?, chunk_size, task_loss_fn?); "_c1" = chunk_size=1 (tasks
# in sequence with lax.map instead of one vmap over tasks).
SPECS = {
    "mean": ("mean", False, None, False),
    "mean_c1": ("mean", False, 1, False),
    "flat_mean": ("mean", True, None, False),
    "flat_mean_c1": ("mean", True, 1, False),
    "flat_mean_tl_c1": ("mean", True, 1, True),
    "cagrad_c1": ("cagrad", False, 1, False),
    "flat_cagrad_c1": ("cagrad", True, 1, False),
}
STEPS = ("plain_sum",) + tuple(SPECS)
# flat step -> its plain counterpart (same chunking)
PAIRS = {"flat_mean": "mean", "flat_mean_c1": "mean_c1", "flat_mean_tl_c1": "mean_c1",
         "flat_cagrad_c1": "cagrad_c1"}


def _stats(times):
  ms = np.asarray(times) * 1e3
  return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
          "times_ms": [round(float(t), 2) for t in ms]}


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
  except OSError:
    return ""


def run_config(task, encoder, repeats, warmup, pause, progress=True) -> dict:
  load_before, uptime_before = os.getloadavg(), _uptime()
  t0 = time.perf_counter()
  runners = {s: build(s, task, encoder) for s in STEPS}
  for fn in runners.values():
    for _ in range(warmup):
      fn()
  build_s = time.perf_counter() - t0
  times = {s: [] for s in STEPS}
  bar = range(repeats)
  if progress:
    try:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(bar, desc=f"flat_speed {encoder} {task}", unit="repeat")
    except ImportError:
      pass
  for _ in bar:
    for s in STEPS:
      t = time.perf_counter()
      runners[s]()
      times[s].append(time.perf_counter() - t)
      time.sleep(pause)
  stats = {s: _stats(v) for s, v in times.items()}
  med = lambda s: stats[s]["median_ms"]
  ratios = {s: {"vs_mean": med(s) / med("mean"), "vs_plain_sum": med(s) / med("plain_sum"),
                "vs_plain_counterpart": med(s) / med(PAIRS.get(s, s)),
                "min_vs_plain_counterpart": stats[s]["min_ms"] / stats[PAIRS.get(s, s)]["min_ms"]}
            for s in STEPS}
  return {"task": task, "encoder": encoder, "batch": BATCH, "num_tasks": 2,
          "repeats": repeats, "warmup": warmup, "steps": stats, "ratios": ratios,
          "build_and_warmup_s": build_s, "load_before": load_before,
          "load_after": os.getloadavg(), "uptime_before": uptime_before,
          "uptime_after": _uptime()}


def print_table(cfg: dict) -> None:
  print(f"\n{cfg['encoder']} {cfg['task']}, batch {cfg['batch']}, m = {cfg['num_tasks']}: "
        f"median (min) of {cfg['repeats']} interleaved repeats; load "
        f"{cfg['load_before'][0]:.2f} -> {cfg['load_after'][0]:.2f}")
  print(f"{'step':16s} {'ms median':>10s} {'ms min':>9s} {'/ mean':>8s} {'/ plain_sum':>12s} "
        f"{'flat / plain (same chunking): median, min':>44s}")
  for s in STEPS:
    st, r = cfg["steps"][s], cfg["ratios"][s]
    pair = (f"{r['vs_plain_counterpart']:6.2f} {r['min_vs_plain_counterpart']:6.2f}  vs {PAIRS[s]}"
            if s in PAIRS else "")
    print(f"{s:16s} {st['median_ms']:10.1f} {st['min_ms']:9.1f} {r['vs_mean']:8.2f} "
          f"{r['vs_plain_sum']:12.2f}   {pair}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="MLP encoder, 3 repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--pause", type=float, default=0.05)
  parser.add_argument("--configs", default=None,
                      help="comma-separated encoder:task pairs, e.g. lenet:CL_CR,mlp:CL_RR")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.configs:
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
  elif args.quick:
    configs = [("mlp", "CL_CR")]
  else:
    configs = [("lenet", "CL_CR"), ("lenet", "CL_RR"), ("mlp", "CL_CR")]
  repeats = args.repeats or (3 if args.quick else 15)
  out = pathlib.Path(args.out) if args.out else RESULTS / (
      "flat_speed_quick.json" if args.quick else "flat_speed.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  report = {"configs": [], "rho": RHO,
            "perturbation": "adaptive, norm='joint' (FS-MTL multi-MNIST)",
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "optax": optax.__version__},
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
  for e, t in configs:
    cfg = run_config(t, e, repeats, 1 if args.quick else args.warmup, args.pause)
    report["configs"].append(cfg)
    print_table(cfg)
    out.write_text(json.dumps(report, indent=1))  # after every configuration
  print(f"\nwrote {out}")
  return report


if __name__ == "__main__":
  main()
