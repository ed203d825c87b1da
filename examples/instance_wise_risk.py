"""Instance-wise risk minimisation (IWRM): every example's loss is a task.

TorchJD's IWRM example treats the m losses of a minibatch as m objectives
and trains with a Jacobian-descent aggregator instead of averaging them. Here
a small MLP regresses a noisy non-linear target; with batch size m there are
m tasks per step. Three trainings from the same initialisation and batches:

* ``mean``: the usual empirical risk (the mean of the per-example losses);
* ``upgrad``: UPGrad over the m per-example gradients (non-conflicting update);
* ``mgda``: MGDA, the min-norm point of their convex hull.

The per-example gradients come from ``mo.factored_task_grads``
(``make_train_step(mode="factored")``): the dense layers' Jacobian blocks stay
factored as (activations, per-example output cotangents), so the m × m Gram
matrix the aggregators need is formed without materialising m gradient copies
(see the README's "Concepts"; ``benchmarks/iwrm.py`` times both engines).

The printout gives, per method, the train and test mean squared errors and
the worst training example's loss (the quantity instance-wise methods tend to
lower). Run: ``python examples/instance_wise_risk.py`` (under a minute on two
CPU cores); ``--batch``, ``--steps`` change the size.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import mtl_optax as mo

D_IN, HIDDEN = 8, 32


def make_data(key, n):
  kx, kw, kn = jax.random.split(key, 3)
  x = jax.random.normal(kx, (n, D_IN))
  w = jax.random.normal(kw, (D_IN,))
  noise = 0.1 * jax.random.normal(kn, (n,))
  return x, jnp.sin(x @ w) + 0.5 * jnp.cos(2.0 * x[:, 0]) + noise


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (D_IN, HIDDEN)) / jnp.sqrt(D_IN), "b1": jnp.zeros(HIDDEN),
          "w2": jax.random.normal(k2, (HIDDEN,)) / jnp.sqrt(HIDDEN), "b2": jnp.zeros(())}


def predict(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def per_example_losses(params, x, y):
  """The m tasks: one squared error per example of the batch."""
  return (predict(params, x) - y) ** 2


def train(method, data, *, batch, steps, seed=0, lr=1e-2):
  x, y, x_test, y_test = data
  params = init_params(jax.random.PRNGKey(seed))
  aggregator = {"mean": mo.mean, "upgrad": mo.upgrad, "mgda": mo.mgda}[method]
  tx = optax.chain(aggregator(num_tasks=batch), optax.adam(lr))
  opt_state = tx.init(params)
  step = mo.make_train_step(per_example_losses, tx, mode="factored")
  order = jax.random.permutation(jax.random.PRNGKey(seed + 1), steps * batch) % x.shape[0]
  t0 = time.perf_counter()
  for s in range(steps):
    idx = order[s * batch:(s + 1) * batch]
    params, opt_state, _, _ = step(params, opt_state, x[idx], y[idx])
  seconds = time.perf_counter() - t0
  train_losses = per_example_losses(params, x, y)
  return {"train_mse": float(jnp.mean(train_losses)), "train_worst": float(jnp.max(train_losses)),
          "test_mse": float(jnp.mean(per_example_losses(params, x_test, y_test))),
          "seconds": seconds}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32, help="m: examples (tasks) per step")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--n-train", type=int, default=512)
  parser.add_argument("--methods", default="mean,upgrad,mgda")
  args = parser.parse_args(argv)
  x, y = make_data(jax.random.PRNGKey(0), args.n_train + 1024)
  data = (x[:args.n_train], y[:args.n_train], x[args.n_train:], y[args.n_train:])
  results = {}
  print(f"IWRM: m = {args.batch} tasks per step, {args.steps} steps")
  print(f"{'method':8s} {'train MSE':>10s} {'worst ex.':>10s} {'test MSE':>10s} {'time (s)':>9s}")
  for method in args.methods.split(","):
    r = train(method, data, batch=args.batch, steps=args.steps)
    results[method] = r
    print(f"{method:8s} {r['train_mse']:10.4f} {r['train_worst']:10.4f} {r['test_mse']:10.4f} "
          f"{r['seconds']:9.1f}")
  return results


if __name__ == "__main__":
  main()
