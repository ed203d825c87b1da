"""Flax training-step helpers (Linen-style functional and NNX) and the representation mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import mtl_optax as mo

pytestmark = pytest.mark.accelerator   # run on the device by benchmarks.accelerator


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    z = nn.tanh(nn.Dense(8, name="trunk")(x))
    return nn.Dense(1, name="head_0")(z)[:, 0], nn.Dense(1, name="head_1")(z)[:, 0]


def data():
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 5))
  return x, jnp.sin(x[:, 0]), jnp.cos(x[:, 1]) * 3


HEADS = lambda path, leaf: "head" in jax.tree_util.keystr(path)


def test_linen_step_equals_manual_pipeline():
  model = LinenNet()
  x, ya, yb = data()
  params = model.init(jax.random.PRNGKey(1), x)

  def loss_fn(p, x, ya, yb):
    pa, pb = model.apply(p, x)
    return jnp.stack([jnp.mean((pa - ya) ** 2), jnp.mean((pb - yb) ** 2)])

  tx = optax.chain(mo.mgda(task_specific=HEADS, num_tasks=2), optax.sgd(0.1))
  step = mo.make_train_step(loss_fn, tx)
  new_params, state, losses, aux = step(params, tx.init(params), x, ya, yb)
  assert aux is None
  # Manual: per-task jax.grad, MGDA on the trunk, own gradient on each head.
  g = [jax.grad(lambda p, i=i: loss_fn(p, x, ya, yb)[i])(params) for i in range(2)]
  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t["params"]["trunk"])])
  j = np.stack([flat(t) for t in g])
  gram = j @ j.T
  gamma = np.clip((gram[1, 1] - gram[0, 1]) / (gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]), 0, 1)
  w = np.array([gamma, 1 - gamma])
  want_trunk = jax.tree.map(lambda p, a, b: p - 0.1 * (w[0] * a + w[1] * b),
                            params["params"]["trunk"], g[0]["params"]["trunk"],
                            g[1]["params"]["trunk"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_params["params"]["trunk"], want_trunk)
  np.testing.assert_allclose(new_params["params"]["head_1"]["kernel"],
                             params["params"]["head_1"]["kernel"]
                             - 0.1 * g[1]["params"]["head_1"]["kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses, loss_fn(params, x, ya, yb), rtol=1e-6)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.trunk = nnx.Linear(5, 8, rngs=rngs)
    self.head_0 = nnx.Linear(8, 1, rngs=rngs)
    self.head_1 = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    z = jnp.tanh(self.trunk(x))
    return self.head_0(z)[:, 0], self.head_1(z)[:, 0]


def test_nnx_step_decreases_losses_and_matches_functional():
  x, ya, yb = data()

  def loss_fn(model, x, ya, yb):
    pa, pb = model(x)
    return jnp.stack([jnp.mean((pa - ya) ** 2), jnp.mean((pb - yb) ** 2)]), {"n": x.shape[0]}

  model = NnxNet(nnx.Rngs(0))
  tx = optax.chain(mo.cagrad(task_specific=HEADS, num_tasks=2), optax.adam(1e-2))
  params0 = nnx.state(model, nnx.Param)
  opt_state = tx.init(params0)
  # Functional reference on the same parameters.
  graphdef, _ = nnx.split(model)
  ref = mo.make_train_step(lambda p, *b: loss_fn(nnx.merge(graphdef, p), *b), tx, has_aux=True)
  ref_params, _, _, _ = ref(params0, opt_state, x, ya, yb)
  step = mo.make_nnx_train_step(loss_fn, tx, has_aux=True)
  first = None
  for i in range(30):
    opt_state, losses, aux = step(model, opt_state, x, ya, yb)
    if i == 0:
      first = losses
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                   nnx.state(model, nnx.Param), ref_params)
  assert aux["n"] == 32
  assert np.all(np.asarray(loss_fn(model, x, ya, yb)[0]) < np.asarray(first))


def test_representation_mode_exact_for_mean_and_refused_for_cagrad():
  x, ya, yb = data()
  trunk_params = {"w": jax.random.normal(jax.random.PRNGKey(3), (5, 6))}
  head_params = {"a": jnp.ones((6,)) * 0.1, "b": -jnp.ones((6,)) * 0.2}
  trunk = lambda tp, x: jnp.tanh(x @ tp["w"])
  heads = lambda hp, z, ya, yb: jnp.stack([jnp.mean((z @ hp["a"] - ya) ** 2),
                                           jnp.mean((z @ hp["b"] - yb) ** 2)])
  tx = mo.mean()
  losses, (trunk_upd, head_upd), _ = mo.representation_update(
      tx, tx.init(None), trunk, heads, trunk_params, head_params, (x,), (ya, yb))
  full = lambda tp, hp: jnp.mean(heads(hp, trunk(tp, x), ya, yb))
  want_t, want_h = jax.grad(full, argnums=(0, 1))(trunk_params, head_params)
  np.testing.assert_allclose(trunk_upd["w"], want_t["w"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(head_upd["a"], want_h["a"], rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="not exact in shared-representation mode"):
    mo.representation_update(mo.cagrad(), None, trunk, heads, trunk_params, head_params,
                             (x,), (ya, yb))
