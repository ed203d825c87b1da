"""CAGrad vs F-CAGrad (sharpness-aware CAGrad) on multi-MNIST: accuracy and sharpness.

Both runs train the same LeNet (shared encoder, one classification head per
digit: task CL_CR) from the same initialisation, on the same batches, with Adam:

* CAGrad:   ``optax.chain(mo.cagrad(c, task_specific=heads), optax.adam(lr))``
  and ``mo.make_train_step(loss_fn, tx)``;
* F-CAGrad: ``optax.chain(mo.flat(mo.cagrad(c), task_specific=heads), optax.adam(lr))``
  and ``mo.make_train_step(loss_fn, tx, perturbation=mo.task_perturbation(...))``
  (Phan et al., ICCV 2025: each task's SAM gradient split into loss + flat
  gradient, the two families aggregated separately by CAGrad).

After training it prints, per task, the test accuracy and the sharpness
``mo.metrics.sharpness`` = L_i(θ + ε_i) − L_i(θ) on the test set, with ε_i the
training perturbation (and at a few more radii in the JSON), and writes
``benchmarks/results/flat_cagrad_example.json``.

    python examples/flat_cagrad.py              # 3000 images, 5 epochs: ~2 min on one CPU core
    python examples/flat_cagrad.py --full       # 20 000 images, 4 000 test, 10 epochs

The SAM settings follow the FS-MTL multi-MNIST runs (adaptive SAM, one norm
over all of a task's parameters) except the radius: their ρ = 2 (200 epochs)
stalls F-CAGrad in a few-epoch run (test accuracy ≈ 0.16 after 5 epochs here),
so the default is ρ = 0.5 (``--rho 2`` for theirs). The data, model and head
mask are those of ``benchmarks/multimnist.py``. A single seed at the default size is a smoke
test, not evidence either way: use ``--full`` and several ``--seed``s (or
``python -m benchmarks.multimnist --methods cagrad,f_cagrad``) to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the benchmarks package (data loading, LeNet) lives in the repo

import mtl_optax as mo  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import multimnist  # pylint: disable=g-import-not-at-top,wrong-import-position

TASK = "CL_CR"
FULL = {"n_train": 20_000, "n_test": 4_000, "epochs": 10}
EVAL_RHOS = (0.5, 1.0, 2.0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n-train", type=int, default=3000)
  p.add_argument("--n-test", type=int, default=1000)
  p.add_argument("--epochs", type=int, default=5)
  p.add_argument("--full", action="store_true",
                 help=f"the full run: {FULL} (explicit --n-train/--n-test/--epochs win)")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--c", type=float, default=0.4, help="CAGrad's c")
  p.add_argument("--rho", type=float, default=0.5,
                 help="SAM radius, shared and heads (FS-MTL multi-MNIST: 2.0 over 200 epochs)")
  p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                 help="adaptive SAM (ASAM), as the FS-MTL multi-MNIST runs")
  p.add_argument("--sam-norm", default="joint", choices=("joint", "separate"))
  p.add_argument("--encoder", default="lenet", choices=models.ENCODERS)
  p.add_argument("--chunk-size", type=int, default=1,
                 help="tasks differentiated at once (1 = in sequence: the faster setting on "
                      "CPU, see benchmarks/flat_speed.py; 0 = all at once)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                               "flat_cagrad_example.json"))
  args = p.parse_args(argv)
  if args.full:
    given = set(a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv))
    for k, v in FULL.items():
      if "--" + k.replace("_", "-") not in given:
        setattr(args, k, v)
  args.chunk_size = args.chunk_size or None
  return args


def train(name, args, model, data, perturbation):
  """Trains one method; returns final params and the per-epoch log."""
  heads = multimnist.heads_mask
  m = model.num_tasks
  if perturbation is None:
    agg = mo.cagrad(args.c, task_specific=heads, num_tasks=m)
  else:
    agg = mo.flat(mo.cagrad(args.c, num_tasks=m), task_specific=heads)
  tx = optax.chain(agg, optax.adam(args.lr))
  step = mo.make_train_step(model.task_losses, tx, perturbation=perturbation,
                            chunk_size=args.chunk_size)
  evaluate = jax.jit(model.task_metrics)

  params = model.init(jax.random.key(args.seed))
  opt_state = tx.init(params)
  images, targets = data["train"].images, data["train"].targets
  test = {"images": jnp.asarray(data["test"].images),
          "targets": tuple(jnp.asarray(t) for t in data["test"].targets)}
  rng = np.random.default_rng(args.seed)  # same batches for both methods
  steps = len(images) // args.batch_size
  log, t0 = [], time.perf_counter()
  for epoch in range(args.epochs):
    perm = rng.permutation(len(images))
    losses = []
    for s in range(steps):
      idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
      batch = {"images": jnp.asarray(images[idx]), "targets": tuple(jnp.asarray(t[idx])
                                                                     for t in targets)}
      params, opt_state, loss, _ = step(params, opt_state, batch)
      losses.append(np.asarray(loss))
    acc = np.asarray(evaluate(params, test), np.float64)
    log.append({"epoch": epoch + 1, "train_loss": np.mean(losses, 0).tolist(),
                "test_accuracy": acc.tolist(), "seconds": time.perf_counter() - t0})
    print(f"  {name:9s} epoch {epoch + 1}/{args.epochs}: train loss "
          f"{np.round(log[-1]['train_loss'], 4)}, test acc {np.round(acc, 4)} "
          f"({log[-1]['seconds']:.0f} s)", flush=True)
  return params, test, log


def main(argv=None):
  args = parse_args(argv)
  model = models.make_model(TASK, args.encoder)
  data = multimnist.load_data(TASK, args.n_train, n_val=100, n_test=args.n_test,
                              seed=args.seed)
  perturbation = mo.task_perturbation(args.rho, args.rho, adaptive=args.adaptive,
                                      task_specific=multimnist.heads_mask, norm=args.sam_norm)
  sharp_kw = dict(adaptive=args.adaptive, task_specific=multimnist.heads_mask,
                  norm=args.sam_norm, chunk_size=args.chunk_size)
  at_train_rho = jax.jit(lambda p, b: mo.metrics.sharpness(
      model.task_losses, p, b, rho_shared=args.rho, **sharp_kw))
  at_rhos = jax.jit(lambda p, b: mo.metrics.sharpness(
      model.task_losses, p, b, rhos=EVAL_RHOS, **sharp_kw))
  print(f"multi-MNIST {TASK} ({args.encoder}): {args.n_train} train / {args.n_test} test "
        f"composites, {args.epochs} epochs, batch {args.batch_size}, Adam {args.lr}, "
        f"c = {args.c}; F-CAGrad: rho = {args.rho}, adaptive = {args.adaptive}, "
        f"norm = {args.sam_norm}", flush=True)

  results = {}
  for name, pert in (("CAGrad", None), ("F-CAGrad", perturbation)):
    params, test, log = train(name, args, model, data, pert)
    # Sharpness on the test set (the full set in one batch; split it for large --n-test).
    sharp = np.asarray(at_train_rho(params, test), np.float64)
    sharp_rhos = np.asarray(at_rhos(params, test), np.float64)
    test_loss = np.asarray(jax.jit(model.task_losses)(params, test), np.float64)
    results[name] = {"test_accuracy": log[-1]["test_accuracy"], "test_loss": test_loss.tolist(),
                     "sharpness": sharp.tolist(),
                     "sharpness_at_rhos": {str(r): v.tolist() for r, v in zip(EVAL_RHOS,
                                                                              sharp_rhos)},
                     "train_seconds": log[-1]["seconds"], "epochs": log}

  print(f"\n{'method':9s} {'acc left':>9s} {'acc right':>9s} {'mean acc':>9s} "
        f"{'sharp left':>11s} {'sharp right':>11s}   (sharpness at rho = {args.rho}, test set)")
  for name, r in results.items():
    a, s = r["test_accuracy"], r["sharpness"]
    print(f"{name:9s} {a[0]:9.4f} {a[1]:9.4f} {np.mean(a):9.4f} {s[0]:11.4f} {s[1]:11.4f}")

  out = {"task": TASK, "tasks": ["classify left digit", "classify right digit"],
         "config": {k: v for k, v in vars(args).items() if k != "out"},
         "eval_rhos": list(EVAL_RHOS), "results": results,
         "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                         "platform": platform.platform(), "python": platform.python_version()}}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
