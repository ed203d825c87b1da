"""Calling conventions of the methods that need more than one batch or a model split.

* SDMGrad / MoDo (double sampling): the update is built from one batch's
  stacked gradients, the weights from two more independent batches,
  passed as ``weight_grads=(grads_a, grads_b)``
  (``mo.multi_batch_task_grads`` computes all three).
* Auto-Lambda: the transformation holds the validation loss function and
  every update receives ``params`` and ``val_batch=`` (one look-ahead
  gradient per step).
* RotoGrad: trunk / heads / rotations are three parameter pytrees;
  ``mo.rotograd_update`` returns a gradient for each (the rotations have their
  own optimizer, as in the reference code), the rotations live in a Flax
  module (``mo.rotograd_rotations``).

A two-task regression with a shared ReLU trunk and linear heads, minibatches
drawn from a fixed dataset. Run: ``python examples/multi_batch_methods.py``.
"""

import jax
import jax.numpy as jnp
import optax

import mtl_optax as mo

D_IN, HIDDEN, M, BATCH, STEPS = 8, 16, 2, 32, 400


def make_data(key, n=1024):
  kx, ka, kb = jax.random.split(key, 3)
  x = jax.random.normal(kx, (n, D_IN))
  wa = jax.random.normal(ka, (D_IN,))
  wb = -0.5 * wa + jax.random.normal(kb, (D_IN,))  # partly conflicting with task A
  return x, jnp.stack([jnp.sin(x @ wa), 5.0 * jnp.tanh(x @ wb)])  # y: (M, n)


def init_params(key):
  kt, kh = jax.random.split(key)
  return {"trunk": jax.random.normal(kt, (D_IN, HIDDEN)) / jnp.sqrt(D_IN),
          "heads": jax.random.normal(kh, (M, HIDDEN)) / jnp.sqrt(HIDDEN)}


def trunk_fn(w, x):
  return jax.nn.relu(x @ w)


def heads_loss_fn(heads, zs, y):
  """zs: (M, batch, HIDDEN) — task i reads zs[i] (plain models pass the same z M times)."""
  preds = jnp.einsum("ibh,ih->ib", zs, heads)
  return jnp.mean((preds - y) ** 2, axis=1)


def loss_fn(params, x, y):
  z = trunk_fn(params["trunk"], x)
  return heads_loss_fn(params["heads"], jnp.broadcast_to(z, (M,) + z.shape), y)


HEADS = {"trunk": False, "heads": True}


def minibatch(key, data):
  x, y = data
  idx = jax.random.choice(key, x.shape[0], (BATCH,), replace=False)
  return x[idx], y[:, idx]


def train_double_sampling(aggregator, data, key):
  params = init_params(jax.random.PRNGKey(0))
  tx = optax.chain(aggregator, optax.adam(3e-3))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    batches = [minibatch(k, data) for k in jax.random.split(key, 3)]  # main, a, b
    losses, grads, weight_grads = mo.multi_batch_task_grads(loss_fn, params, batches)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses,
                                   weight_grads=weight_grads)
    return optax.apply_updates(params, updates), opt_state

  for k in jax.random.split(key, STEPS):
    params, opt_state = step(params, opt_state, k)
  return loss_fn(params, *data), mo.task_weights(opt_state)


def train_auto_lambda(data, key, lr=0.05):
  params = init_params(jax.random.PRNGKey(0))
  tx = optax.chain(
      mo.auto_lambda(loss_fn, virtual_lr=lr, meta_lr=1e-2, task_specific=HEADS, num_tasks=M),
      optax.sgd(lr))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    k_train, k_val = jax.random.split(key)
    x, y = minibatch(k_train, data)
    losses, grads = mo.task_grads(loss_fn, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses,
                                   val_batch=minibatch(k_val, data))
    return optax.apply_updates(params, updates), opt_state

  for k in jax.random.split(key, STEPS):
    params, opt_state = step(params, opt_state, k)
  return loss_fn(params, *data), mo.task_weights(opt_state)


def train_rotograd(data, key):
  params = init_params(jax.random.PRNGKey(0))
  rotations = mo.rotograd_rotations(M, HIDDEN)  # Flax Linen module (imports flax lazily)
  rot_params = rotations.init(jax.random.PRNGKey(1), jnp.zeros((1, HIDDEN)))["params"]
  agg = mo.rotograd(num_tasks=M)
  agg_state = agg.init(jnp.zeros((BATCH, HIDDEN)))
  model_opt, rot_opt = optax.adam(3e-3), optax.adam(3e-4)  # rotations: their own lr
  model_state, rot_state = model_opt.init(params), rot_opt.init(rot_params)

  @jax.jit
  def step(params, rot_params, agg_state, model_state, rot_state, key):
    x, y = minibatch(key, data)
    losses, (g_trunk, g_heads, g_rot), agg_state = mo.rotograd_update(
        agg, agg_state, trunk_fn, heads_loss_fn, params["trunk"], params["heads"], rot_params,
        trunk_args=(x,), head_args=(y,))
    updates, model_state = model_opt.update({"trunk": g_trunk, "heads": g_heads}, model_state)
    rot_updates, rot_state = rot_opt.update(g_rot, rot_state)
    return (optax.apply_updates(params, updates), optax.apply_updates(rot_params, rot_updates),
            agg_state, model_state, rot_state)

  for k in jax.random.split(key, STEPS):
    params, rot_params, agg_state, model_state, rot_state = step(
        params, rot_params, agg_state, model_state, rot_state, k)
  x, y = data
  z = trunk_fn(params["trunk"], x)
  final = heads_loss_fn(params["heads"], rotations.apply({"params": rot_params}, z), y)
  return final, mo.task_weights(agg_state)


def main():
  data = make_data(jax.random.PRNGKey(42))
  key = jax.random.PRNGKey(7)
  print(f"initial losses: {loss_fn(init_params(jax.random.PRNGKey(0)), *data)}")
  runs = [
      ("sdmgrad", lambda: train_double_sampling(
          mo.sdmgrad(task_specific=HEADS, num_tasks=M), data, key)),
      ("modo", lambda: train_double_sampling(
          mo.modo(gamma=0.01, task_specific=HEADS, num_tasks=M), data, key)),
      ("auto_lambda", lambda: train_auto_lambda(data, key)),
      ("rotograd", lambda: train_rotograd(data, key)),
  ]
  for name, fn in runs:
    losses, weights = fn()
    print(f"{name:12s} final losses {jnp.round(losses, 4)}  last weights {jnp.round(weights, 3)}")


if __name__ == "__main__":
  main()
