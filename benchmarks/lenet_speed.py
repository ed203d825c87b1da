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
(and, for a PyTorch counterpart, a builder to ``_torch_lenet.STEPS``).

Usage::

  .venv/bin/python -m benchmarks.lenet_speed            # full, ~2-4 min
  .venv/bin/python -m benchmarks.lenet_speed --quick    # seconds

Writes ``benchmarks/results/lenet_speed.json`` (``lenet_speed_quick.json``
with ``--quick``) and a PNG bar chart next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Callable

import jax
import numpy as np
import optax

from benchmarks import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"
BATCH = 256


def make_batch(batch: int = BATCH, seed: int = 0) -> dict:
  """Random images / labels / target images (the work does not depend on them)."""
  rng = np.random.default_rng(seed)
  return {"images": rng.random((batch, 36, 36, 1), dtype=np.float32),
          "targets": (rng.integers(0, 10, batch).astype(np.int32),
                      rng.random((batch, 784), dtype=np.float32))}


def _runner(step_fn, params, opt_state, batch) -> Callable[[], None]:
  """Zero-argument callable: one jitted step, blocking, state carried over."""
  state = [params, opt_state]
  batch = jax.device_put(batch)

  def run():
    state[0], state[1], loss = step_fn(state[0], state[1], batch)
    jax.block_until_ready(loss)
  return run


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

  return _runner(step, params, opt.init(params), make_batch(seed=seed))


def _is_head(path, _) -> bool:
  return getattr(path[0], "key", None) == "heads"


def jacobian_step(method: str, encoder: str = "lenet", seed: int = 0,
                  chunk_size: int | None = None) -> Callable[[], None]:
  """Per-task gradients + an mtl_optax aggregator (heads: own gradient) + Adam.

  ``chunk_size=1`` computes the task gradients one task at a time (``lax.map``),
  which on XLA:CPU avoids the batched (vmapped) convolution backward passes.
  """
  import mtl_optax as mo  # pylint: disable=g-import-not-at-top
  model = models.make_model("CL_RR", encoder=encoder)
  aggregator = getattr(mo, method)(task_specific=_is_head)
  tx = optax.chain(aggregator, optax.adam(1e-3))
  params = model.init(jax.random.key(seed))

  @jax.jit
  def step(params, opt_state, batch):
    losses, grads = mo.task_grads(model.task_losses, params, batch, chunk_size=chunk_size)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses.sum()

  return _runner(step, params, tx.init(params), make_batch(seed=seed))


def flat_step(method: str = "cagrad", rho: float = 0.05, seed: int = 0,
              chunk_size: int | None = 1) -> Callable[[], None]:
  """F-<method>: loss and per-task SAM gradients (one vmapped/chunked pass each),
  ``mo.flat`` (decomposed: A(g) + A(g^SAM − g), heads their SAM gradient), Adam.
  Same perturbation as the PyTorch side: ε_i = ρ g/‖g‖, shared and head parts
  normalised separately, not adaptive."""
  import mtl_optax as mo  # pylint: disable=g-import-not-at-top
  model = models.make_model("CL_RR", encoder="lenet")
  tx = optax.chain(mo.flat(getattr(mo, method)(num_tasks=2), task_specific=_is_head),
                   optax.adam(1e-3))
  perturb = mo.task_perturbation(rho, rho, task_specific=_is_head)
  params = model.init(jax.random.key(seed))

  @jax.jit
  def step(params, opt_state, batch):
    losses, grads, sam = mo.sharpness_aware_task_grads(
        model.task_losses, params, batch, perturbation=perturb, chunk_size=chunk_size)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses, sam_grads=sam)
    return optax.apply_updates(params, updates), opt_state, losses.sum()

  return _runner(step, params, tx.init(params), make_batch(seed=seed))


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


class TorchSide:
  """The PyTorch process of `_torch_lenet.py`, driven over JSON lines."""

  def __init__(self, python: pathlib.Path, steps, seed: int = 0):
    env = dict(os.environ, PYTHONPATH="")
    self.proc = subprocess.Popen(
        [str(python), str(ROOT / "benchmarks" / "_torch_lenet.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._ask({"cmd": "setup", "batch": BATCH, "seed": seed,
                           "threads": 2, "steps": sorted(set(steps))})

  def _ask(self, msg: dict) -> dict:
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the torch process died (see its stderr above)")
    return json.loads(line)

  def run(self, step: str, n: int = 1) -> list[float]:
    return self._ask({"cmd": "run", "step": step, "n": n})["times"]

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()


def _stats(times: list[float]) -> dict:
  ms = np.asarray(times) * 1e3
  return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
          "times_ms": [round(float(t), 3) for t in ms]}


def run(rows, repeats: int, warmup: int, torch_python, pause: float,
        progress: bool = True) -> dict:
  """Builds, warms up and times every row, interleaving JAX and torch."""
  rows = [r for r in rows if JAX_STEPS[r[0]][1]()]
  jax_names = list(dict.fromkeys(r[0] for r in rows))
  load_before = os.getloadavg()
  t_build = time.perf_counter()
  jax_run = {n: JAX_STEPS[n][0]() for n in jax_names}
  for fn in jax_run.values():       # compile + warm up
    for _ in range(warmup):
      fn()
  torch = None
  if torch_python is not None and pathlib.Path(torch_python).exists():
    torch = TorchSide(torch_python, [r[1] for r in rows])
    for name in torch.info["steps"]:
      torch.run(name, warmup)
  build_s = time.perf_counter() - t_build
  jax_times = {n: [] for n in jax_names}
  torch_times = {r[1]: [] for r in rows}
  bar = range(repeats)
  if progress:
    try:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(bar, desc="lenet_speed", unit="repeat")
    except ImportError:
      pass
  for _ in bar:
    for name in jax_names:
      t0 = time.perf_counter()
      jax_run[name]()
      jax_times[name].append(time.perf_counter() - t0)
      time.sleep(pause)   # let spinning worker threads of either side settle
    if torch is not None:
      for name in torch_times:
        if name in torch.info["steps"]:
          torch_times[name] += torch.run(name)
          time.sleep(pause)
  if torch is not None:
    torch.close()
  results = []
  for jax_name, torch_name in rows:
    row = {"jax_step": jax_name, "torch_step": torch_name,
           "jax": _stats(jax_times[jax_name])}
    if torch_times.get(torch_name):
      row["torch"] = _stats(torch_times[torch_name])
      row["ratio_median"] = (row["jax"]["median_ms"]
                             / row["torch"]["median_ms"])
    results.append(row)
  return {
      "rows": results, "repeats": repeats, "warmup": warmup, "batch": BATCH,
      "load_before": load_before, "load_after": os.getloadavg(),
      "build_and_warmup_s": build_s,
      "versions": {"python": platform.python_version(),
                   "jax": jax.__version__, "optax": optax.__version__,
                   "torch": None if torch is None else torch.info["torch"]},
      "cpu_count": os.cpu_count(), "platform": platform.platform(),
      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
  }


def print_table(report: dict) -> None:
  print(f"\nLeNet step, batch {report['batch']}, median of {report['repeats']}"
        f" interleaved repeats (load {report['load_before'][0]:.2f} -> "
        f"{report['load_after'][0]:.2f})")
  print(f"{'JAX step':14s} {'JAX ms (min)':>16s} {'torch step':>12s} "
        f"{'torch ms (min)':>16s} {'JAX/torch':>10s}")
  for r in report["rows"]:
    j = r["jax"]
    t = r.get("torch")
    tcol = f"{t['median_ms']:8.1f} ({t['min_ms']:5.1f})" if t else "-"
    ratio = f"{r['ratio_median']:9.2f}x" if t else "-"
    print(f"{r['jax_step']:14s} {j['median_ms']:8.1f} ({j['min_ms']:5.1f}) "
          f"{r['torch_step']:>12s} {tcol:>16s} {ratio:>10s}")


def plot(report: dict, path: pathlib.Path) -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  rows = report["rows"]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.bar(x - 0.2, [r["jax"]["median_ms"] for r in rows], 0.4, label="JAX")
  ax.bar(x + 0.2, [r.get("torch", {}).get("median_ms", 0) for r in rows], 0.4,
         label="PyTorch")
  ax.set_xticks(x, [r["jax_step"] for r in rows], rotation=15)
  ax.set_ylabel("ms / step (median)")
  ax.set_title(f"LeNet step, batch {report['batch']}, 2-core CPU")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fast LeNet plain step only, 3 repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", nargs="*", default=None,
                      help="JAX step names (default: all rows)")
  parser.add_argument("--torch-python", default=os.environ.get(
      "MTL_OPTAX_TORCH_PYTHON", str(TORCH_PYTHON)))
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--pause", type=float, default=0.05)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = QUICK_ROWS if args.quick else ROWS
  if args.steps:
    rows = tuple(r for r in ROWS if r[0] in args.steps)
  repeats = args.repeats or (3 if args.quick else 11)
  report = run(rows, repeats, 1 if args.quick else args.warmup,
               None if args.no_torch else args.torch_python, args.pause)
  print_table(report)
  out = pathlib.Path(args.out) if args.out else RESULTS / (
      "lenet_speed_quick.json" if args.quick else "lenet_speed.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  plot(report, out.with_suffix(".png"))
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
