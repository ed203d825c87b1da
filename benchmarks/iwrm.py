# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Instance-wise risk minimisation (IWRM): one training step with m = batch tasks.

Every example's loss is a task (TorchJD's IWRM example), so the per-task
Jacobian has m = batch rows and the engine that forms it matters. One full
step (per-task gradients, MGDA or UPGrad, Adam) of an MLP 32 → 128 → 128 → 1
(tanh, one squared error per example), at m = 64 and 128, for

* ``plain``: ``jax.grad`` of the mean loss (the ERM step, for scale);
* ``jacrev_<agg>``: ``mo.task_grads(mode="jacrev", chunk_size=None)``: one
  forward pass, m VJPs vmapped: each over the whole batch, so O(m²) work;
* ``vmap_<agg>``: ``mo.task_grads(mode="vmap", chunk_size=None)``;
* ``factored_<agg>``: ``mo.factored_task_grads``: the dense layers' blocks kept
  as (activations, per-example output cotangents), Gram from the factors, where
  that costs fewer flops (``factorize="auto"``: at m = 128 = the layer width
  nothing qualifies and it equals jacrev); ``factored-always_<agg>``: every
  dense layer factored (``factorize="always"``: least memory);

and, when the torch venv has torch + torchjd (``MTL_OPTAX_TORCH_PYTHON``,
default ``.venv-torch/bin/python``), TorchJD's ``autogram`` engine
(``Engine(model, batch_dim=0)``, Gramian → weighting → one weighted backward)
and ``autojac`` (stacked Jacobian + ``jac_to_grad``) at the same m
(`benchmarks/_torch_iwrm.py`). JAX and torch repeats are interleaved so both
see the same machine load; medians and minima are reported.

Memory: XLA's compiled ``memory_analysis()`` of each JAX step (temporary
buffers, and arguments + outputs + temporaries) — the peak the compiled
program needs, not a measured RSS.

Run: ``python benchmarks/iwrm.py`` (writes ``benchmarks/results/iwrm.json``);
``--quick`` for 3 repeats at m = 64 only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

import mtl_optax as mo

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _speed_harness as harness  # noqa: E402  pylint: disable=g-import-not-at-top

D_IN, HIDDEN = 32, 128
AGGREGATORS = {"mgda": mo.mgda, "upgrad": mo.upgrad}
ENGINES = ("jacrev", "vmap", "factored", "factored-always")


def init_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  dense = lambda k, a, b: jax.random.uniform(k, (a, b), minval=-1, maxval=1) / jnp.sqrt(a)
  return {"l1": {"w": dense(k1, D_IN, HIDDEN), "b": jnp.zeros(HIDDEN)},
          "l2": {"w": dense(k2, HIDDEN, HIDDEN), "b": jnp.zeros(HIDDEN)},
          "l3": {"w": dense(k3, HIDDEN, 1), "b": jnp.zeros(1)}}


def per_example_losses(p, x, y):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
  return ((h @ p["l3"]["w"] + p["l3"]["b"])[:, 0] - y) ** 2


def make_batch(m, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (m, D_IN))
  return x, jnp.sin(x[:, 0]) + 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 2), (m,))


def build_step(name: str, m: int):
  """``(jitted step(params, opt_state, batch) -> (params, opt_state, loss), initial state)``."""
  params = init_params()
  if name == "plain":
    tx = optax.adam(1e-3)

    def step(params, opt_state, batch):
      loss, g = jax.value_and_grad(lambda p: jnp.mean(per_example_losses(p, *batch)))(params)
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
  else:
    engine, agg = name.split("_")
    tx = optax.chain(AGGREGATORS[agg](num_tasks=m), optax.adam(1e-3))

    def step(params, opt_state, batch):
      if engine.startswith("factored"):
        losses, g = mo.factored_task_grads(
            per_example_losses, params, *batch, chunk_size=None,
            factorize="always" if engine == "factored-always" else "auto")
      else:
        losses, g = mo.task_grads(per_example_losses, params, *batch, mode=engine,
                                  chunk_size=None)
      updates, opt_state = tx.update(g, opt_state, params, losses=losses)
      return optax.apply_updates(params, updates), opt_state, jnp.mean(losses)
  return jax.jit(step), (params, tx.init(params))


def memory(step, state, batch) -> dict:
  """XLA's static memory analysis of the compiled step (bytes)."""
  try:
    ma = step.lower(*state, batch).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": str(e)}
  if ma is None:
    return {"error": "memory_analysis unavailable on this backend"}
  temp = int(ma.temp_size_in_bytes)
  args = int(ma.argument_size_in_bytes)
  out = int(ma.output_size_in_bytes)
  return {"temp_bytes": temp, "peak_bytes": temp + args + out}


def run(ms, aggs, repeats, warmup, torch_python):
  rows = {}
  for m in ms:
    batch = make_batch(m)
    names = ["plain"] + [f"{e}_{a}" for a in aggs for e in ENGINES]
    runners, result = {}, {}
    for name in names:
      step, state = build_step(name, m)
      mem = memory(step, state, batch)
      t0 = time.perf_counter()
      runner = harness.runner(step, state, batch)
      runner()
      result[name] = {"compile_and_first_s": time.perf_counter() - t0, "memory": mem,
                      "times": []}
      for _ in range(warmup):
        runner()
      runners[name] = runner
    torch = None
    torch_steps = ["plain"] + [f"{e}_{a}" for a in aggs for e in ("autogram", "autojac")]
    if torch_python is not None and pathlib.Path(torch_python).exists():
      try:
        torch = harness.TorchSide("_torch_iwrm.py", pathlib.Path(torch_python), torch_steps, m)
        for s in torch.info["steps"]:
          torch.run(s, warmup)
      except Exception as e:  # pylint: disable=broad-except
        print(f"torch side unavailable: {e}", file=sys.stderr)
        torch = None
    torch_times = {s: [] for s in (torch.info["steps"] if torch else [])}
    for r in range(repeats):
      for name, runner in runners.items():
        t0 = time.perf_counter()
        runner()
        result[name]["times"].append(time.perf_counter() - t0)
      for s in torch_times:
        torch_times[s] += torch.run(s, 1)
      print(f"[iwrm] m={m} repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
    if torch is not None:
      torch.close()
    for name in names:
      result[name].update(harness.stats(result[name].pop("times")))
    rows[str(m)] = {"jax": result,
                    "torch": {s: harness.stats(t) for s, t in torch_times.items()},
                    "torch_version": torch.info.get("torch") if torch else None}
  return rows


def table(rows) -> str:
  lines = []
  for m, r in rows.items():
    lines.append(f"m = {m}")
    lines.append(f"  {'step':18s} {'median ms':>10s} {'min ms':>8s} {'temp MiB':>9s} "
                 f"{'peak MiB':>9s}")
    for name, v in r["jax"].items():
      mem = v["memory"]
      mib = lambda k, mem=mem: f"{mem[k] / 2**20:9.2f}" if k in mem else f"{'-':>9s}"
      lines.append(f"  jax {name:14s} {v['median_ms']:10.2f} {v['min_ms']:8.2f} "
                   f"{mib('temp_bytes')} {mib('peak_bytes')}")
    for name, v in r["torch"].items():
      lines.append(f"  torch {name:12s} {v['median_ms']:10.2f} {v['min_ms']:8.2f}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--m", default="64,128", help="comma list of batch sizes (= tasks)")
  parser.add_argument("--aggregators", default="mgda,upgrad")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--quick", action="store_true", help="3 repeats, m = 64, MGDA only")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  ms = [64] if args.quick else [int(v) for v in args.m.split(",")]
  aggs = ["mgda"] if args.quick else args.aggregators.split(",")
  repeats = 3 if args.quick else args.repeats
  torch_python = None if args.no_torch else os.environ.get("MTL_OPTAX_TORCH_PYTHON",
                                                           str(harness.TORCH_PYTHON))
  rows = run(ms, aggs, repeats, args.warmup, torch_python)
  report = {"benchmark": "iwrm", "model": f"MLP {D_IN}-{HIDDEN}-{HIDDEN}-1 tanh, squared error",
            "optimizer": "adam", "repeats": repeats, "jax": jax.__version__,
            "backend": jax.default_backend(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "rows": rows}
  out = pathlib.Path(args.out) if args.out else harness.RESULTS / (
      "iwrm_quick.json" if args.quick else "iwrm.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(table(rows))
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
