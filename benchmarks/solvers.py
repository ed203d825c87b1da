# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Solver speed: the JAX solvers inside jit vs the peers' host solvers, one run.

* Nash-MTL weights: ``linalg.nash_system`` (Newton on G w = 1/w, in jit) vs the
  reference procedure with cvxpy + ECOS (`benchmarks/_cvxpy_nash.py`, run with
  the torch venv's python; up to 20 convex-concave rounds, as in the authors'
  code and LibMTL).
* UPGrad weights: ``linalg.dual_cone_weights`` (m box-constrained QPs, active
  set, in jit) vs TorchJD's approach: one ``quadprog`` QP per task on the host.
* CAGrad's dual (c = 0.4): ``cagrad_dual`` (pairwise Frank–Wolfe + exact polish,
  in jit) vs LibMTL's ``scipy.optimize.minimize`` (SLSQP) from the uniform start.
* FairGrad (α = 2): ``linalg.nash_system(G, 2.0)`` vs the authors'
  ``scipy.optimize.least_squares`` on Gw − w^{−1/α} = 0 from w = 1/m.

Gram matrices of m random, partly conflicting task gradients (P = 2000, float64) for
m ∈ {2, 4, 11, 20, 40}. Each side: warm-up, then the median of ``repeats``
timed solves (JAX with ``block_until_ready``). Both sides' weights are
compared (relative max difference) and their residuals reported, so that a
fast-but-wrong solver would show.

Usage::

  .venv/bin/python -m benchmarks.solvers           # ~2 min
  .venv/bin/python -m benchmarks.solvers --quick

Writes ``benchmarks/results/solvers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scipy import optimize  # noqa: E402

from mtl_optax._src import linalg  # noqa: E402
from mtl_optax._src.methods.cagrad import cagrad_dual  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"
SIZES = (2, 4, 11, 20, 40)
P = 2000

_PEER = r"""
import json, sys, time, warnings
import numpy as np
import quadprog
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
import _cvxpy_nash

def upgrad_quadprog(gram, reg_eps=1e-4):
  # TorchJD: G normalised by its trace plus reg_eps·I; for each task i,
  # min ½vᵀGv s.t. v ≥ e_i (quadprog: min ½xᵀGx − aᵀx s.t. Cᵀx ≥ b); w = Σ_i v_i.
  m = gram.shape[0]
  g = gram / np.trace(gram) + reg_eps * np.eye(m)
  w = np.zeros(m)
  for i in range(m):
    w += quadprog.solve_qp(g, np.zeros(m), np.eye(m), np.eye(m)[i])[0]
  return w

req = json.loads(sys.stdin.read())
out = []
for gram in req["grams"]:
  gram = np.asarray(gram)
  row = {}
  prob = _cvxpy_nash.NashProblem(gram.shape[0])
  for name, fn in (("nash", prob.solve), ("upgrad", upgrad_quadprog)):
    w = fn(gram)
    times = []
    for _ in range(req["repeats"]):
      t = time.perf_counter(); w = fn(gram); times.append(time.perf_counter() - t)
    row[name] = {"times": times, "weights": np.asarray(w).tolist()}
  out.append(row)
print(json.dumps(out))
"""


CAGRAD_C = 0.4
FAIRGRAD_ALPHA = 2.0


def cagrad_scipy(gram, c=CAGRAD_C):
  """LibMTL's CAGrad dual: SLSQP from the uniform point (its defaults)."""
  m = gram.shape[0]
  b = np.full(m, 1.0 / m)
  k = c * np.sqrt(b @ gram @ b + 1e-8)
  objective = lambda w: w @ gram @ b + k * np.sqrt(w @ gram @ w + 1e-8)
  return optimize.minimize(objective, b, bounds=[(0, 1)] * m,
                           constraints={"type": "eq", "fun": lambda w: 1 - w.sum()}).x


def fairgrad_scipy(gram, alpha=FAIRGRAD_ALPHA):
  """The FairGrad authors' solve: least squares on Gw = w^{−1/α}, w ≥ 0, from 1/m."""
  m = gram.shape[0]
  return optimize.least_squares(lambda w: gram @ w - np.power(1 / w, 1 / alpha),
                                np.full(m, 1.0 / m), bounds=(0, np.inf)).x


def cagrad_objective(gram, w, c=CAGRAD_C):
  m = gram.shape[0]
  b = np.full(m, 1.0 / m)
  return float(w @ gram @ b + c * np.sqrt(b @ gram @ b) * np.sqrt(max(w @ gram @ w, 0.0)))


def host_timings(gram, repeats):
  out = {}
  for name, fn in (("cagrad", cagrad_scipy), ("fairgrad", fairgrad_scipy)):
    w = fn(gram)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      w = fn(gram)
      times.append(time.perf_counter() - t)
    out[name] = {"times": times, "weights": np.asarray(w).tolist()}
  return out


def nash_residual(gram, w):
  """max_i |w_i (Gw)_i − 1| (0 at the exact Nash-MTL weights)."""
  return float(np.max(np.abs(w * (gram @ w) - 1.0)))


def jax_timings(gram, repeats):
  m = gram.shape[0]
  g = jnp.asarray(gram)
  nash = jax.jit(lambda g: linalg.nash_system(g).x)
  eye = jnp.eye(m, dtype=g.dtype)
  upgrad = jax.jit(lambda g: linalg.dual_cone_weights(g, jnp.zeros((m,), g.dtype), eye).x)
  cagrad = jax.jit(lambda g: cagrad_dual(g, CAGRAD_C).x)
  fairgrad = jax.jit(lambda g: linalg.nash_system(g, FAIRGRAD_ALPHA).x)
  out = {}
  for name, fn in (("nash", nash), ("upgrad", upgrad), ("cagrad", cagrad), ("fairgrad", fairgrad)):
    w = fn(g).block_until_ready()   # compile + warm-up
    fn(g).block_until_ready()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      w = fn(g).block_until_ready()
      times.append(time.perf_counter() - t)
    out[name] = {"times": times, "weights": np.asarray(w).tolist()}
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--torch-python", default=os.environ.get(
      "MTL_OPTAX_TORCH_PYTHON", str(TORCH_PYTHON)))
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  sizes = (2, 11) if args.quick else SIZES
  repeats = args.repeats or (3 if args.quick else 21)
  rng = np.random.default_rng(0)
  grams = []
  common = rng.standard_normal(P)
  for m in sizes:
    # A shared component plus rank-8 task-specific parts: pairwise cosines spread
    # around 0.2 with many conflicting pairs (so UPGrad's QPs are active), but
    # every gradient has a positive component along the shared one (0 is outside
    # the convex hull: Nash-MTL's weights exist); norms vary by e^±1.
    parts = rng.standard_normal((m, 8)) @ rng.standard_normal((8, P)) / np.sqrt(8)
    j = (0.5 * common + parts) * np.exp(rng.uniform(-1, 1, size=(m, 1)))
    grams.append(j @ j.T)
  peer = subprocess.run(
      [args.torch_python, "-c", _PEER, str(ROOT / "benchmarks")],
      input=json.dumps({"grams": [g.tolist() for g in grams], "repeats": repeats}),
      capture_output=True, text=True, check=True)
  peer = json.loads(peer.stdout)
  rows = []
  for gram, theirs in zip(grams, peer):
    ours = jax_timings(gram, repeats)
    theirs = {**theirs, **host_timings(gram, repeats)}
    m = gram.shape[0]
    for name in ("nash", "upgrad", "cagrad", "fairgrad"):
      a, b = np.asarray(ours[name]["weights"]), np.asarray(theirs[name]["weights"])
      row = {"solver": name, "m": m,
             "jax_ms": 1e3 * statistics.median(ours[name]["times"]),
             "peer_ms": 1e3 * statistics.median(theirs[name]["times"]),
             "weights_rel_diff": float(np.max(np.abs(a - b)) / np.max(np.abs(b)))}
      row["speedup"] = row["peer_ms"] / row["jax_ms"]
      if name == "upgrad":
        row["conflicting_pairs"] = int(np.sum(np.triu(gram < 0)))
      if name == "nash":
        row["jax_residual"] = nash_residual(gram, a)
        row["peer_residual"] = nash_residual(gram, b)
      if name == "fairgrad":   # max_i |w_i^{1/α} (Gw)_i − 1|
        res = lambda w, gram=gram: float(
            np.max(np.abs(w ** (1 / FAIRGRAD_ALPHA) * (gram @ w) - 1.0)))
        row["jax_residual"], row["peer_residual"] = res(a), res(b)
      if name == "cagrad":     # the dual objective F(w) (lower is better)
        row["jax_objective"] = cagrad_objective(gram, a)
        row["peer_objective"] = cagrad_objective(gram, b)
      rows.append(row)
  print(f"{'solver':8s} {'m':>3s} {'JAX (ms)':>10s} {'peer (ms)':>10s} {'speed-up':>9s} "
        f"{'Δw rel':>9s} {'res JAX':>9s} {'res peer':>9s}   (CAGrad: dual objective F)")
  nan = float("nan")
  for r in rows:
    print(f"{r['solver']:8s} {r['m']:3d} {r['jax_ms']:10.3f} {r['peer_ms']:10.2f} "
          f"{r['speedup']:9.1f} {r['weights_rel_diff']:9.1e} "
          f"{r.get('jax_residual', r.get('jax_objective', nan)):9.3g} "
          f"{r.get('peer_residual', r.get('peer_objective', nan)):9.3g}")
  report = {"rows": rows, "P": P, "repeats": repeats,
            "peers": {"nash": "cvxpy + ECOS, reference convex-concave procedure",
                      "upgrad": "quadprog, one QP per task (TorchJD)",
                      "cagrad": "scipy SLSQP from the uniform point (LibMTL)",
                      "fairgrad": "scipy least_squares from 1/m (FairGrad authors)"},
            "versions": {"python": platform.python_version(), "jax": jax.__version__},
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
  out = pathlib.Path(args.out) if args.out else RESULTS / (
      "solvers_quick.json" if args.quick else "solvers.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
