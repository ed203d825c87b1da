# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Which per-task gradient engine is fastest? The measurements behind ``mode="auto"``.

For each model / batch size / number of tasks / aggregator, one full training
step (``mo.make_train_step``: per-task gradients, aggregation, Adam) is timed
with every engine:

* ``sequential``: stacked rows, ``mode="jacrev"``, ``chunk_size=1`` (m backward
  passes in sequence);
* ``vmapped``: stacked rows, ``chunk_size=None`` (one task-batched backward);
* ``factored_sequential`` / ``factored_vmapped``: ``mode="factored"`` with
  either chunking (dense-layer blocks of the Jacobian kept as factors);

and the engine that ``mode="auto"`` picks (``mo.resolve_engine``) is recorded
next to them. Aggregators: ``mgda`` (reads only the Gram matrix) and
``config`` (ConFIG: reads the rows). Models: the speed benchmark's MLP (784-w-w-w, one
linear head per task), the multi-MNIST LeNet (CL_RR), a small Linen CNN with
BatchNorm and dropout, and the narrow BatchNorm ResNet (CL_RR).

Timing: every engine of one configuration is built, compiled and warmed up,
then timed round-robin (median of ``--repeats``), so that all see the same
background load; the table reports each engine's time relative to the fastest.

    python -m benchmarks.engine_choice            # full grid (~25 min on 2 cores)
    python -m benchmarks.engine_choice --quick    # 3 small rows (CI smoke test)

Writes ``benchmarks/results/engine_choice.json`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import mtl_optax as mo
from benchmarks import models as bench_models
from benchmarks import speed as speed_bench

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ENGINES = {
    "sequential": dict(mode="jacrev", chunk_size=1),
    "vmapped": dict(mode="jacrev", chunk_size=None),
    "factored_sequential": dict(mode="factored", chunk_size=1),
    "factored_vmapped": dict(mode="factored", chunk_size=None),
}
AGGREGATORS = ("mgda", "config")
ENGINE_NAMES = {("jacrev", 1): "sequential", ("jacrev", None): "vmapped",
                ("factored", 1): "factored_sequential", ("factored", None): "factored_vmapped"}


class SmallCNN(nn.Module):
  """Two conv + BatchNorm + ReLU + max-pool blocks, a dense layer, dropout, m heads."""
  num_tasks: int = 2

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(100, name="dense")(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return [nn.Dense(10, name=f"head{i}")(x) for i in range(self.num_tasks)]


def _is_head(path, _):
  return "heads" in jax.tree_util.keystr(path)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_problem(width: int, m: int, batch: int):
  params = speed_bench.init_mlp(jax.random.key(0), m, widths=(784, width, width, width))
  x, y = speed_bench.batch(m, batch)
  return dict(loss_fn=speed_bench.loss_fn, params=params, args=(x, y), has_state=False,
              heads=speed_bench.HEADS)


def cnn_problem(batch: int, m: int = 2):
  model = SmallCNN(m)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, (batch, m)), jnp.int32)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                         train=True)
  state = {"batch_stats": variables["batch_stats"], "key": jax.random.key(2)}

  def loss_fn(params, state, x, y):
    key, dropout_key = jax.random.split(state["key"])
    logits, updates = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                                  train=True, mutable=["batch_stats"],
                                  rngs={"dropout": dropout_key})
    losses = jnp.stack([_cross_entropy(l, y[:, i]) for i, l in enumerate(logits)])
    return losses, {"batch_stats": updates["batch_stats"], "key": key}

  return dict(loss_fn=loss_fn, params=variables["params"], args=(state, x, y), has_state=True,
              heads=lambda path, leaf: "head" in jax.tree_util.keystr(path))


def multimnist_problem(encoder: str, batch: int):
  model = bench_models.make_model("CL_RR", encoder)
  params, state = model.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((batch, 36, 36, 1)), jnp.float32)
  data = {"images": images,
          "targets": (jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
                      jnp.asarray(rng.random((batch, 784)), jnp.float32))}
  if model.has_state:
    return dict(loss_fn=lambda p, s, b: model.stateful_task_losses(p, s, b), params=params,
                args=(state, data), has_state=True, heads=_is_head)
  return dict(loss_fn=lambda p, b: model.task_losses(p, b), params=params, args=(data,),
              has_state=False, heads=_is_head)


def configurations(quick: bool):
  """(label, facts, problem builder) for every row."""
  rows = []
  if quick:
    rows.append(("mlp w=256 m=2 b=32", dict(model="mlp", width=256, m=2, batch=32),
                 lambda: mlp_problem(256, 2, 32)))
    rows.append(("cnn b=32", dict(model="bn_cnn", m=2, batch=32), lambda: cnn_problem(32)))
    return rows
  for width in (256, 1024):
    for m in (2, 8):
      for batch in (32, 256):
        rows.append((f"mlp w={width} m={m} b={batch}",
                     dict(model="mlp", width=width, m=m, batch=batch),
                     lambda w=width, m=m, b=batch: mlp_problem(w, m, b)))
  for batch in (64, 256):
    rows.append((f"lenet b={batch}", dict(model="lenet", m=2, batch=batch),
                 lambda b=batch: multimnist_problem("lenet", b)))
  for batch in (64, 256):
    rows.append((f"bn_cnn b={batch}", dict(model="bn_cnn", m=2, batch=batch),
                 lambda b=batch: cnn_problem(b)))
  for batch in (32, 128):
    rows.append((f"resnet_small b={batch}", dict(model="resnet_small", m=2, batch=batch),
                 lambda b=batch: multimnist_problem("resnet_small", b)))
  return rows


def build_step(problem, aggregator: str, engine: dict):
  tx = optax.chain(getattr(mo, aggregator)(task_specific=problem["heads"]), optax.adam(1e-3))
  params = problem["params"]
  opt_state = tx.init(params)
  step = mo.make_train_step(problem["loss_fn"], tx, has_state=problem["has_state"], **engine)
  carry = [params, opt_state]
  if problem["has_state"]:
    carry.append(problem["args"][0])
    batch = problem["args"][1:]
  else:
    batch = problem["args"]

  def run():
    out = step(*carry, *batch)
    carry[:] = out[:len(carry)]
    return out[len(carry)]   # losses
  return run


def auto_engine(problem, aggregator: str) -> str:
  """The engine ``mode="auto"`` picks for this row (``mo.resolve_engine``)."""
  tx = optax.chain(getattr(mo, aggregator)(task_specific=problem["heads"]), optax.adam(1e-3))
  choice = mo.resolve_engine(problem["loss_fn"], problem["params"], *problem["args"],
                             has_state=problem["has_state"], tx=tx,
                             opt_state=tx.init(problem["params"]))
  return ENGINE_NAMES[(choice.mode, choice.chunk_size)]


def summary(report) -> str:
  """The markdown table of benchmarks/README.md and the rule's score."""
  lines = ["| row | aggregator | " + " | ".join(ENGINES) + " | auto picks | auto / fastest |",
           "|---|---|" + "---|" * len(ENGINES) + "---|---|"]
  for r in report["rows"]:
    best = r["times_ms"][r["fastest"]]
    cells = " | ".join(("**%.2f**" if n == r["fastest"] else "%.2f") % (r["times_ms"][n] / best)
                       for n in ENGINES)
    lines.append(f"| {r['label']} ({best:.1f} ms) | {r['aggregator']} | {cells} | {r['auto']} | "
                 f"{r['auto_over_fastest']:.2f} |")
  ratios = [r["auto_over_fastest"] for r in report["rows"]]
  hits = sum(x <= 1.0 + 1e-9 for x in ratios)
  within = sum(x <= 1.10 for x in ratios)
  lines.append("")
  lines.append(f"auto picks the fastest engine on {hits}/{len(ratios)} rows, is within 10 % of it "
               f"on {within}/{len(ratios)}; worst {max(ratios):.2f}x.")
  return "\n".join(lines)


def time_round_robin(runs: dict, repeats: int, warmup: int = 2) -> dict:
  for fn in runs.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--only", default=None, help="substring of the row labels to run")
  parser.add_argument("--out", default=None)
  parser.add_argument("--resume", action="store_true",
                      help="keep the rows already in the output file, time the others")
  parser.add_argument("--rescore", action="store_true",
                      help="recompute the 'auto' column of the output file (no timing)")
  args = parser.parse_args(argv)
  repeats = 3 if args.quick else args.repeats
  out = pathlib.Path(args.out) if args.out else RESULTS / (
      "engine_choice_quick.json" if args.quick else "engine_choice.json")
  report = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "jax": jax.__version__, "repeats": repeats, "rows": []}
  done = set()
  if (args.resume or args.rescore) and out.exists():
    report["rows"] = json.loads(out.read_text())["rows"]
    done = {(r["label"], r["aggregator"]) for r in report["rows"]}
  if args.rescore:
    builds = {label: build for label, _, build in configurations(args.quick)}
    for row in report["rows"]:
      problem = builds[row["label"]]()
      row["auto"] = auto_engine(problem, row["aggregator"])
      row["auto_over_fastest"] = row["times_ms"][row["auto"]] / row["times_ms"][row["fastest"]]
    out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    return report
  t_start = time.perf_counter()
  for label, facts, build in configurations(args.quick):
    if args.only and args.only not in label:
      continue
    problem = build()
    for aggregator in AGGREGATORS:
      if (label, aggregator) in done:
        continue
      t0 = time.perf_counter()
      runs = {name: build_step(problem, aggregator, engine) for name, engine in ENGINES.items()}
      times = time_round_robin(runs, repeats)
      choice = auto_engine(problem, aggregator)
      best = min(times, key=times.get)
      row = dict(facts, aggregator=aggregator, label=label, times_ms=times, fastest=best,
                 auto=choice, seconds=time.perf_counter() - t0)
      if choice is not None:
        row["auto_over_fastest"] = times[choice] / times[best]
      report["rows"].append(row)
      rel = "  ".join(f"{n}={t / times[best]:.2f}" for n, t in times.items())
      print(f"{label:22s} {aggregator:7s} fastest {best:20s} {times[best]:8.1f} ms  {rel}"
            f"  auto={choice}", flush=True)
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(report, indent=1))
  report["wall_s"] = time.perf_counter() - t_start
  out.write_text(json.dumps(report, indent=1))
  print(summary(report))
  print(f"wrote {out} ({report['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
  main()
