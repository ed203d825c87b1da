"""CAGrad's two-task toy problem: trajectories of every method (benchmarks.md §2).

    python -m benchmarks.toy [--methods all] [--iters 100000] [--quick] [--scale 1.0]

Settings as CAGrad's ``toy.py`` (Liu et al. 2021): θ ∈ R², the two losses of
``mtl_optax.datasets.toy_losses``, Adam with learning rate 1e-3 for 100 000
iterations from each start, CAGrad with c = 0.5 and the ÷(1 + c) rescaling of
that script (``rescale=2``). Starts: the five of benchmarks.md §2
(``datasets.TOY_INITS``). ``--scale 0.1`` multiplies L1 by 0.1 as in the
Nash-MTL / FAMO versions of the experiment.

Every gradient-based method of the registry is run (loss-based weightings are
skipped: the toy losses are negative, where log/ratio weightings are
undefined); all starts of a method run at once (``jax.vmap``) and the
iterations are one ``jax.lax.scan``.

"Reached the Pareto set": the final point is within ``--tol`` (default 0.05,
Euclidean distance in θ) of the Pareto set, computed exactly
(``datasets.toy_pareto_set``, 4 001 points for x1 ∈ [−7, 7], so the
discretisation error is < 0.002). We also report Pareto stationarity,
min_{w∈Δ} ‖w₁∇L1 + w₂∇L2‖ at the final point (0 on the Pareto set; it can also
vanish at a local Pareto-stationary point elsewhere, which is why the
distance criterion is the one used).

Outputs ``benchmarks/results/toy_<tag>.png`` (trajectories over the contours
of the average loss, one panel per method) and ``.json`` (final losses,
distance, reached, stationarity).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mo
from mtl_optax import datasets
from benchmarks import registry

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# CAGrad's toy.py settings.
TOY_OVERRIDES = {"cagrad": {"c": 0.5, "rescale": 2}}


def run_method(name, starts, *, iters, lr, scale, record_every, seed=0):
  """Trajectories ``(S, T, 2)`` of method ``name`` from every start, vmapped."""
  tx_agg, _ = registry.build(name, num_tasks=2, seed=seed, overrides=TOY_OVERRIDES)
  tx = optax.chain(tx_agg, optax.adam(lr))
  loss_fn = lambda p: datasets.toy_losses(p["x"], scale=scale)

  def one_start(x0):
    params = {"x": x0}
    state = tx.init(params)

    def step(carry, _):
      p, s = carry
      losses, g = mo.task_grads(loss_fn, p)
      u, s = tx.update(g, s, p, losses=losses)
      return (optax.apply_updates(p, u), s), None

    def block(carry, _):
      carry, _ = jax.lax.scan(step, carry, None, length=record_every)
      return carry, carry[0]["x"]

    (_, _), traj = jax.lax.scan(block, (params, state), None, length=iters // record_every)
    return jnp.concatenate([x0[None], traj], axis=0)

  return jax.jit(jax.vmap(one_start))(jnp.asarray(starts, jnp.float32))


def pareto_stationarity(x, scale):
  """min_{w∈Δ} ‖Jᵀw‖ at x (two tasks: closed form)."""
  jac = np.asarray(jax.jacobian(lambda t: datasets.toy_losses(t, scale=scale))(
      jnp.asarray(x, jnp.float32)), np.float64)
  g1, g2 = jac
  d = g1 - g2
  dd = d @ d
  w = 0.5 if dd == 0 else float(np.clip((g2 @ (g2 - g1)) / dd, 0.0, 1.0))
  return float(np.linalg.norm(w * g1 + (1 - w) * g2))


def evaluate(trajs, scale, pareto, tol):
  out = []
  for traj in trajs:
    x = np.asarray(traj[-1], np.float64)
    losses = np.asarray(datasets.toy_losses(jnp.asarray(x, jnp.float32), scale=scale), np.float64)
    dist = float(np.min(np.linalg.norm(pareto - x[None], axis=1)))
    out.append({"final_x": x.tolist(), "final_losses": losses.tolist(), "distance": dist,
                "reached": bool(dist < tol), "stationarity": pareto_stationarity(x, scale)})
  return out


def plot(results, trajs, scale, pareto, path, starts):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(trajs)
  cols = min(4, len(names))
  rows = (len(names) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
  grid = np.linspace(-11, 11, 300)
  xx, yy = np.meshgrid(grid, grid)
  pts = jnp.asarray(np.stack([xx, yy], -1), jnp.float32)
  avg = np.asarray(datasets.toy_losses(pts, scale=scale)).mean(-1)
  colors = plt.cm.tab10(np.arange(len(starts)))
  for ax, name in zip(axes.flat, names):
    ax.contour(xx, yy, avg, levels=25, cmap="viridis", linewidths=0.8)
    ax.plot(pareto[:, 0], pareto[:, 1], color="gray", lw=5, alpha=0.6, zorder=1)
    for k, tr in enumerate(trajs[name]):
      tr = np.asarray(tr)
      ok = results[name][k]["reached"]
      ax.plot(tr[:, 0], tr[:, 1], "-", color=colors[k], lw=1.5, zorder=3)
      ax.plot(tr[0, 0], tr[0, 1], "o", color="k", ms=5, zorder=4)
      ax.plot(tr[-1, 0], tr[-1, 1], "*" if ok else "x", color=colors[k], ms=10, zorder=5,
              markeredgecolor="k")
    n_ok = sum(r["reached"] for r in results[name])
    ax.set_title(f"{registry.label(name)}  ({n_ok}/{len(starts)} reached)", fontsize=10)
    ax.set_xlim(-11, 11)
    ax.set_ylim(-11, 11)
    ax.set_aspect("equal")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle("CAGrad toy problem: trajectories over the contours of (L1 + L2)/2; "
               "gray = Pareto set, * = reached, x = not", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def format_table(results, starts):
  lines = []
  hdr = f"{'method':<14}" + "".join(f"{str(tuple(s)):>22}" for s in starts) + f"{'reached':>9}"
  lines.append(hdr)
  lines.append("-" * len(hdr))
  for name, res in results.items():
    row = f"{registry.label(name)[:13]:<14}"
    for r in res:
      l1, l2 = r["final_losses"]
      row += f"{'(%.2f, %.2f)%s' % (l1, l2, ' ✓' if r['reached'] else ' ✗'):>22}"
    row += f"{sum(r['reached'] for r in res):>7}/{len(res)}"
    lines.append(row)
  return "\n".join(lines)


def default_methods():
  avail = registry.available()
  # The toy problem has no data (no validation batches) and runs mo.task_grads only.
  return [n for n, s in avail.items()
          if (s.gradient_based or n == "mean") and not s.needs and s.engine == "task_grads"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default="all",
                 help="comma list, or 'all' (every gradient-based method + mean)")
  p.add_argument("--iters", type=int, default=100_000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--scale", type=float, default=1.0, help="factor on L1 (Nash-MTL/FAMO: 0.1)")
  p.add_argument("--record-every", type=int, default=100)
  p.add_argument("--tol", type=float, default=0.05, help="distance to the Pareto set")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--tag", default=None)
  p.add_argument("--out-dir", default=RESULTS_DIR)
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    if args.methods == "all":
      args.methods = "mean,mgda,cagrad"
    if args.iters == 100_000:
      args.iters = 2_000
  args.method_list = (default_methods() if args.methods == "all"
                      else registry.resolve(args.methods))
  args.method_list = [n for n in args.method_list if not n.startswith("f_")]
  if args.tag is None:
    args.tag = "quick" if args.quick else f"scale{args.scale:g}"
  args.record_every = max(1, min(args.record_every, args.iters))
  return args


def main(argv=None):
  args = parse_args(argv)
  starts = [tuple(map(float, s)) for s in datasets.TOY_INITS]
  pareto = datasets.toy_pareto_set(4001)
  results, trajs, seconds = {}, {}, {}
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm(args.method_list, desc="toy", file=sys.stderr, leave=False)
  except ImportError:  # pragma: no cover
    it = args.method_list
  for name in it:
    t0 = time.perf_counter()
    try:
      tr = np.asarray(run_method(name, starts, iters=args.iters, lr=args.lr, scale=args.scale,
                                 record_every=args.record_every))
    except Exception as e:  # pylint: disable=broad-except
      print(f"[toy] {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
      continue
    seconds[name] = time.perf_counter() - t0
    trajs[name] = tr
    results[name] = evaluate(tr, args.scale, pareto, args.tol)
  print(format_table(results, starts))
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"toy_{args.tag}")
  payload = {"config": {k: v for k, v in vars(args).items()}, "starts": starts,
             "results": results, "seconds": seconds,
             "definition_reached": f"distance of the final point to the Pareto set < {args.tol}"}
  with open(stem + ".json", "w") as f:
    json.dump(payload, f, indent=1)
  if not args.no_plot and trajs:
    plot(results, trajs, args.scale, pareto, stem + ".png", starts)
  print(f"results: {stem}.json" + ("" if args.no_plot else f", {stem}.png"))
  return payload


if __name__ == "__main__":
  main()
