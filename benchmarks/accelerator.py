# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""One command for an accelerator: tests, step times and memory on whatever device JAX has.

    python -m benchmarks.accelerator            # GPU/TPU: full sizes (<= ~8 min on one GPU)
    python -m benchmarks.accelerator --quick    # CPU size (CI keeps it alive, ~1-2 min)

What it runs (no network; writes ``benchmarks/results/accelerator_<backend>.json``
and a markdown table ``accelerator_<backend>.md``):

1. **The accelerator-relevant tests** (``pytest -m accelerator``: the engines,
   the training steps, models with state, the flat step), unless ``--skip-tests``.
2. **Full MTL step vs the plain summed-loss step** (``jax.grad`` of Σ_i L_i +
   Adam: what a user pays without any MTL method) at m = 2, 8, 40 tasks for
   mean / MGDA / CAGrad / UPGrad / Nash-MTL with ``mode="auto"``, and for MGDA
   with every engine (stacked sequential, stacked vmapped, factored), on the
   benchmark MLP (784-1024-1024-1024, one linear head per task) and on the
   BatchNorm ResNet (ResNet-18 on accelerators, the narrow variant on CPU; the
   ``"flax"`` convolutions on accelerators, the CPU-friendly ``"patches"`` ones
   on CPU), batch 256 (CPU: 32).
3. **The flat step** (F-CAGrad, ``task_perturbation(0.05)``) on both models.
4. **Memory**: the device's peak (``jax.devices()[0].memory_stats()``, where the
   backend reports it; None on CPU).
5. **PyTorch / TorchJD rows** for the MLP (summed loss, TorchJD's ``mtl_backward``
   with UPGrad) when ``torch`` with CUDA is importable in this interpreter.

Times are medians of ``--repeats`` after warm-up, every step of one
configuration timed round-robin.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mo
from mtl_optax import models as mo_models
from benchmarks import speed as speed_bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("mean", "mgda", "cagrad", "upgrad", "nash_mtl")
ENGINES = {"sequential": dict(mode="jacrev", chunk_size=1),
           "vmapped": dict(mode="jacrev", chunk_size=None),
           "factored": dict(mode="factored", chunk_size=None)}


def _heads(path, _):
  return "heads" in jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------
# Problems: loss function, parameters, model state (or None), batch.
# ---------------------------------------------------------------------------

def mlp_problem(m: int, batch: int, width: int):
  params = speed_bench.init_mlp(jax.random.key(0), m, widths=(784, width, width, width))
  x, y = speed_bench.batch(m, batch)
  return dict(loss_fn=speed_bench.loss_fn, params=params, state=None, batch=(x, y), m=m)


def resnet_problem(m: int, batch: int, full: bool):
  model = (mo_models.multi_task_resnet18(m, conv_impl="flax") if full
           else mo_models.multi_task_resnet_small(m))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((batch, 36, 36, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, (batch, m)), jnp.int32)
  variables = model.init(jax.random.key(0), x[:2], train=False)

  def loss_fn(params, state, x, y):
    logits, updates = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"])
    losses = jnp.stack([optax.softmax_cross_entropy_with_integer_labels(l, y[:, i]).mean()
                        for i, l in enumerate(logits)])
    return losses, {"batch_stats": updates["batch_stats"]}

  return dict(loss_fn=loss_fn, params=variables["params"],
              state={"batch_stats": variables["batch_stats"]}, batch=(x, y), m=m)


def _carry(problem, step, opt_state):
  """Zero-argument runner of ``step`` with the carried (params, opt_state[, state])."""
  stateful = problem["state"] is not None
  carry = [problem["params"], opt_state] + ([problem["state"]] if stateful else [])
  batch = jax.device_put(problem["batch"])

  def run():
    out = step(*carry, *batch)
    carry[:] = out[:len(carry)]
    return out[len(carry)]
  return run


def plain_step(problem):
  """The summed-loss step: one backward pass, Adam."""
  tx = optax.adam(1e-3)
  stateful = problem["state"] is not None

  def total(p, *args):
    out = problem["loss_fn"](p, *args)
    return (jnp.sum(out[0]), out[1]) if stateful else (jnp.sum(out), None)

  @jax.jit
  def step(params, opt_state, *args):
    (loss, new_state), g = jax.value_and_grad(total, has_aux=True)(params, *args)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, new_state, loss) if stateful else (params, opt_state, loss)
  return _carry(problem, step, tx.init(problem["params"])), step


def mtl_step(problem, method: str, engine=None, flat: bool = False):
  m = problem["m"]
  aggregator = getattr(mo, method)(num_tasks=m)
  if flat:
    tx = optax.chain(mo.flat(aggregator, task_specific=_heads), optax.adam(1e-3))
  else:
    tx = optax.chain(getattr(mo, method)(num_tasks=m, task_specific=_heads), optax.adam(1e-3))
  kwargs = dict(engine or {})
  if flat:
    kwargs["perturbation"] = mo.task_perturbation(0.05, task_specific=_heads)
  step = mo.make_train_step(problem["loss_fn"], tx, has_state=problem["state"] is not None,
                            **kwargs)
  return _carry(problem, step, tx.init(problem["params"])), step


def time_round_robin(runs: dict, repeats: int, warmup: int = 2) -> dict:
  compile_s = {}
  for name, fn in runs.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s[name] = time.perf_counter() - t0
    for _ in range(warmup - 1):
      jax.block_until_ready(fn())
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                 "compile_and_first_step_s": compile_s[name]} for name, ts in times.items()}


def peak_memory():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else {k: int(v) for k, v in stats.items()
                                 if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


# ---------------------------------------------------------------------------
# PyTorch / TorchJD (MLP only, CUDA only).
# ---------------------------------------------------------------------------

def torch_rows(m: int, batch: int, width: int, repeats: int):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"skipped": "torch is not importable"}
  if not torch.cuda.is_available():
    return {"skipped": "torch has no CUDA device"}
  dev = torch.device("cuda")
  trunk = torch.nn.Sequential(torch.nn.Linear(784, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, width), torch.nn.ReLU()).to(dev)
  heads = torch.nn.ModuleList([torch.nn.Linear(width, 10) for _ in range(m)]).to(dev)
  params = list(trunk.parameters()) + list(heads.parameters())
  opt = torch.optim.Adam(params, 1e-3)
  x = torch.randn(batch, 784, device=dev)
  y = torch.randint(0, 10, (m, batch), device=dev)

  def losses():
    z = trunk(x)
    return [torch.nn.functional.cross_entropy(h(z), y[i]) for i, h in enumerate(heads)], z

  def summed():
    opt.zero_grad()
    sum(losses()[0]).backward()
    opt.step()

  steps = {"torch summed loss": summed}
  try:
    import torchjd  # pylint: disable=g-import-not-at-top
    from torchjd.aggregation import UPGrad  # pylint: disable=g-import-not-at-top

    def upgrad():
      opt.zero_grad()
      ls, z = losses()
      torchjd.mtl_backward(losses=ls, features=z, aggregator=UPGrad())
      opt.step()
    steps["torchjd upgrad"] = upgrad
  except Exception as e:  # pylint: disable=broad-except
    steps_note = f"torchjd unavailable: {e}"
  else:
    steps_note = None
  out = {}
  for name, fn in steps.items():
    for _ in range(3):
      fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      torch.cuda.synchronize()
      ts.append(time.perf_counter() - t0)
    out[name] = {"median_ms": statistics.median(ts) * 1e3}
  if steps_note:
    out["note"] = steps_note
  return out


# ---------------------------------------------------------------------------

def run_tests(timeout: int) -> dict:
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "pytest", "-q", "-m", "accelerator", "-p", "no:cacheprovider",
         str(ROOT / "tests")]
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)   # let the tests see the accelerator
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(env, MTL_OPTAX_TESTS_ON_DEVICE="1"))
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": proc.returncode, "summary": tail[0],
            "seconds": time.perf_counter() - t0}
  except subprocess.TimeoutExpired:
    return {"returncode": None, "summary": f"timed out after {timeout} s",
            "seconds": time.perf_counter() - t0}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="CPU sizes (default on CPU): small models, m = 2, 2 methods, 1 engine")
  parser.add_argument("--full", action="store_true", help="full sizes even on CPU")
  parser.add_argument("--skip-tests", action="store_true")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  quick = args.quick or (backend == "cpu" and not args.full)
  repeats = args.repeats or (3 if quick else 10)
  task_counts = (2,) if quick else (2, 8, 40)
  methods = ("mean", "mgda") if quick else METHODS
  engines = {"vmapped": ENGINES["vmapped"]} if quick else ENGINES
  batch = 32 if quick else 256
  width = 256 if quick else 1024
  t_start = time.perf_counter()
  report = {"backend": backend, "device": str(jax.devices()[0]),
            "device_kind": getattr(jax.devices()[0], "device_kind", None),
            "jax": jax.__version__, "mtl_optax": mo.__version__,
            "python": platform.python_version(),
            "quick": quick, "batch": batch, "repeats": repeats, "rows": []}
  if not args.skip_tests:
    report["tests"] = run_tests(timeout=240)
    print(f"[accelerator] tests: {report['tests']['summary']}", flush=True)

  models = {"mlp": lambda m: mlp_problem(m, batch, width),
            "resnet": lambda m: resnet_problem(m, batch, full=not quick)}
  for model_name, build in models.items():
    for m in task_counts:
      problem = build(m)
      runs, steps = {}, {}
      runs["plain"], steps["plain"] = plain_step(problem)
      for method in methods:
        runs[f"{method} auto"], steps[f"{method} auto"] = mtl_step(problem, method)
      for engine_name, engine in engines.items():
        runs[f"mgda {engine_name}"], steps[f"mgda {engine_name}"] = mtl_step(
            problem, "mgda", engine)
      runs["f_cagrad"], steps["f_cagrad"] = mtl_step(problem, "cagrad", flat=True)
      times = time_round_robin(runs, repeats)
      plain = times["plain"]["median_ms"]
      for name, t in times.items():
        row = dict(model=model_name, m=m, step=name, over_plain=t["median_ms"] / plain, **t)
        report["rows"].append(row)
        print(f"[accelerator] {model_name:6s} m={m:2d} {name:18s} {t['median_ms']:9.2f} ms "
              f"({row['over_plain']:.2f}x plain)", flush=True)
      report.setdefault("memory", {})[f"{model_name} m={m}"] = peak_memory()
  report["torch"] = torch_rows(8, batch, width, repeats)
  report["wall_s"] = time.perf_counter() - t_start

  stem = RESULTS / f"accelerator_{backend}{'_quick' if quick else ''}"
  if args.out:
    stem = pathlib.Path(args.out).with_suffix("")
  stem.parent.mkdir(parents=True, exist_ok=True)
  stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
  lines = [f"# benchmarks.accelerator on {report['device']} ({backend}, jax {jax.__version__}, "
           f"batch {batch}, median of {repeats})", "",
           "| model | m | step | median ms | × plain step |", "|---|---|---|---|---|"]
  for r in report["rows"]:
    lines.append(f"| {r['model']} | {r['m']} | {r['step']} | {r['median_ms']:.2f} | "
                 f"{r['over_plain']:.2f} |")
  stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print(f"[accelerator] wrote {stem}.json and .md ({report['wall_s']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
