# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""SAM on a small BatchNorm + dropout CNN: where the reported collapse comes from.

A reproduction for issue 19 ("a collapse"): a Linen CNN (conv 16 → BN → ReLU →
pool → conv 32 → BN → ReLU → pool → dense 100 → ReLU → dropout 0.2 → two
10-way heads) on multi-MNIST CL_CR, batch 64, Adam 1e-3, trained with the model
state carried by ``has_state=True``. Three runs from one initialisation, on the
same batches:

* ``no_sam``: ``mo.mean()`` (the summed loss's gradient);
* ``plain_sam``: textbook SAM on the summed loss (one global norm, ρ = 0.05,
  written out here without mtl_optax's perturbation code);
* ``f_mean``: ``mo.flat(mo.mean())`` with ``mo.task_perturbation(0.05, 0.05)``
  (per-task offsets, separate shared / head norms).

Every 8 steps it records the fraction of active units of the dense layer's
ReLU (train mode, on the step's batch) and the shared gradient norm; at the
end, eval-mode test accuracy. Writes ``benchmarks/results/sam_dead_relu.json``.

    python -m benchmarks.sam_dead_relu          # ~4 min on 2 cores
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import mtl_optax as mo
from mtl_optax import datasets

STEPS, BATCH, RHO = 80, 64, 0.05
OUT = pathlib.Path(__file__).resolve().parent / "results" / "sam_dead_relu.json"


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(100, name="dense")(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10, name="head0")(x), nn.Dense(10, name="head1")(x)


MODEL = CNN()


def is_head(path, leaf):
  del leaf
  return "head" in jax.tree_util.keystr(path)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(params, state, x, y):
  key, dropout_key = jax.random.split(state["key"])
  (a, b), updates = MODEL.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"],
                                rngs={"dropout": dropout_key})
  losses = jnp.stack([cross_entropy(a, y[:, 0]), cross_entropy(b, y[:, 1])])
  return losses, {"batch_stats": updates["batch_stats"], "key": key}


@jax.jit
def probe(params, state, x, y):
  """(fraction of active dense ReLU units, shared gradient norm of the summed loss)."""
  _, inter = MODEL.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                         capture_intermediates=True, mutable=["intermediates", "batch_stats"],
                         rngs={"dropout": jax.random.PRNGKey(0)})
  pre = inter["intermediates"]["dense"]["__call__"][0]
  g = jax.grad(lambda p: jnp.sum(loss_fn(p, state, x, y)[0]))(params)
  shared = [v for path, v in jax.tree_util.tree_leaves_with_path(g) if not is_head(path, v)]
  return jnp.mean(pre > 0), jnp.sqrt(sum(jnp.sum(v * v) for v in shared))


def plain_sam_step(tx):
  """Textbook SAM (Foret et al.) on the summed loss, statistics from the pass at θ."""
  def total(p, st, x, y):
    losses, new_state = loss_fn(p, st, x, y)
    return jnp.sum(losses), new_state

  @jax.jit
  def step(p, opt_state, st, x, y):
    (_, new_state), g = jax.value_and_grad(total, has_aux=True)(p, st, x, y)
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
    point = jax.tree.map(lambda q, v: q + RHO * v / (norm + 1e-12), p, g)
    g_sam = jax.grad(lambda q: total(q, st, x, y)[0])(point)
    updates, opt_state = tx.update(g_sam, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, new_state
  return step


def library_step(tx, perturbation):
  step = mo.make_train_step(loss_fn, tx, has_state=True, perturbation=perturbation)
  return lambda p, o, st, x, y: step(p, o, st, x, y)[:3]


def main():
  train = datasets.multi_mnist("CL_CR", "train", n_train=6400, n_val=100, n_test=1000)
  test = datasets.multi_mnist("CL_CR", "test", n_train=6400, n_val=100, n_test=1000)
  images = np.asarray(train.images, np.float32)
  labels = np.stack([np.asarray(t) for t in train.targets], 1)
  test_x = jnp.asarray(test.images, jnp.float32)
  test_y = jnp.stack([jnp.asarray(t) for t in test.targets], 1)
  variables = MODEL.init(jax.random.PRNGKey(0), test_x[:2], train=False)
  params0 = variables["params"]
  state0 = {"batch_stats": variables["batch_stats"], "key": jax.random.PRNGKey(1)}

  @jax.jit
  def accuracy(p, batch_stats):
    a, b = MODEL.apply({"params": p, "batch_stats": batch_stats}, test_x, train=False)
    return jnp.stack([jnp.mean(a.argmax(-1) == test_y[:, 0]),
                      jnp.mean(b.argmax(-1) == test_y[:, 1])])

  adam = optax.adam(1e-3)
  runs = {
      "no_sam": (optax.chain(mo.mean(task_specific=is_head), adam), None),
      "plain_sam": (adam, "plain"),
      "f_mean": (optax.chain(mo.flat(mo.mean(), task_specific=is_head), adam),
                 mo.task_perturbation(RHO, RHO, task_specific=is_head)),
  }
  report = {"steps": STEPS, "batch": BATCH, "rho": RHO, "runs": {}}
  for name, (tx, pert) in runs.items():
    step = plain_sam_step(tx) if pert == "plain" else library_step(tx, pert)
    p, st, opt_state = params0, state0, tx.init(params0)
    rng = np.random.default_rng(0)   # the same batches for every run
    trace, t0 = [], time.perf_counter()
    for s in range(STEPS):
      idx = rng.choice(len(images), BATCH, replace=False)
      x, y = jnp.asarray(images[idx]), jnp.asarray(labels[idx])
      if s % 8 == 0 or s == STEPS - 1:
        alive, gnorm = probe(p, st, x, y)
        trace.append({"step": s, "alive": float(alive), "shared_grad_norm": float(gnorm)})
      p, opt_state, st = step(p, opt_state, st, x, y)
    acc = np.asarray(accuracy(p, st["batch_stats"]), np.float64).tolist()
    report["runs"][name] = {"trace": trace, "test_accuracy": acc,
                            "seconds": time.perf_counter() - t0}
    print(f"{name:10s} alive " + " ".join(f"{t['alive']:.3f}" for t in trace)
          + f" | test acc {np.round(acc, 3)}", flush=True)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(json.dumps(report, indent=1))
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
