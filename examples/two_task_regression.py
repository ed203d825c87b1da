"""Train a small two-task Flax NNX model with mtl_optax: `mean` vs `cagrad`.

A shared MLP trunk (with BatchNorm and dropout) feeds two regression heads
whose targets conflict (their true weight vectors point in different
directions and their scales differ by 10×). `mo.make_nnx_train_step` updates
the BatchNorm statistics and the dropout RNG stream in place, once per step;
the losses are evaluated in eval mode (`model.eval()`: running statistics, no
dropout). Run: `python examples/two_task_regression.py`.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mtl_optax as mo


class TwoTaskNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, d_in=16, hidden=32):
    self.trunk = nnx.Linear(d_in, hidden, use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(hidden, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head_a = nnx.Linear(hidden, 1, rngs=rngs)
    self.head_b = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x):
    z = self.dropout(jax.nn.relu(self.norm(self.trunk(x))))
    return self.head_a(z)[:, 0], self.head_b(z)[:, 0]


def make_data(key, n=512, d=16):
  kx, ka, kb = jax.random.split(key, 3)
  x = jax.random.normal(kx, (n, d))
  wa = jax.random.normal(ka, (d,))
  wb = -0.5 * wa + jax.random.normal(kb, (d,))  # partly opposed to task A
  return x, jnp.sin(x @ wa), 10.0 * jnp.tanh(x @ wb)


def losses_fn(model, x, ya, yb):
  pa, pb = model(x)
  return jnp.stack([jnp.mean((pa - ya) ** 2), jnp.mean((pb - yb) ** 2)])


def eval_losses(model, x, ya, yb):
  model.eval()
  out = losses_fn(model, x, ya, yb)
  model.train()
  return out


def train(aggregator, steps=300, seed=0):
  x, ya, yb = make_data(jax.random.PRNGKey(42))
  model = TwoTaskNet(nnx.Rngs(seed))
  heads = lambda path, leaf: "head" in jax.tree_util.keystr(path)
  tx = optax.chain(aggregator(task_specific=heads, num_tasks=2), optax.adam(3e-3))
  opt_state = tx.init(nnx.state(model, nnx.Param))
  step = mo.make_nnx_train_step(losses_fn, tx)
  before = eval_losses(model, x, ya, yb)
  for _ in range(steps):
    opt_state, losses, _ = step(model, opt_state, x, ya, yb)
  return before, eval_losses(model, x, ya, yb), mo.task_weights(opt_state)


def main():
  print(f"{'method':8s} {'L_A before':>10s} {'L_B before':>10s} {'L_A after':>10s} "
        f"{'L_B after':>10s}  last weights")
  for name, agg in [("mean", mo.mean), ("cagrad", mo.cagrad), ("mgda", mo.mgda)]:
    before, after, w = train(agg)
    print(f"{name:8s} {before[0]:10.4f} {before[1]:10.4f} {after[0]:10.4f} {after[1]:10.4f}  "
          f"{jnp.round(w, 3)}")


if __name__ == "__main__":
  main()
