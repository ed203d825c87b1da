"""MGDA-UB: mgda through the shared-representation path equals an explicit reference."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mtl_optax as mo

B, F_IN, F_Z, M = 6, 3, 5, 3


def trunk(tp, x):
  return jnp.tanh(x @ tp["w"] + tp["b"])


def heads_loss(hp, z, y):
  """Task i: linear head a_i on z, mean squared error against y[:, i]."""
  return jnp.mean((z @ hp["a"].T - y) ** 2, axis=0)


def problem(seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, F_IN))
  y = rng.standard_normal((B, M))
  tp = {"w": rng.standard_normal((F_IN, F_Z)), "b": 0.1 * rng.standard_normal(F_Z)}
  hp = {"a": rng.standard_normal((M, F_Z))}
  return x, y, tp, hp


def min_norm_scipy(g):
  m = g.shape[0]
  res = optimize.minimize(lambda w: w @ g @ w, np.full(m, 1 / m), jac=lambda w: 2 * g @ w,
                          bounds=[(0, 1)] * m, method="SLSQP",
                          constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                          options={"ftol": 1e-15, "maxiter": 1000})
  return res.x


def mgda_ub_reference(x, y, tp, hp):
  """Everything by hand in NumPy: ∂L_i/∂z, min-norm weights, one VJP through the trunk."""
  z = np.tanh(x @ tp["w"] + tp["b"])
  resid = z @ hp["a"].T - y                                  # (B, M)
  losses = np.mean(resid ** 2, axis=0)
  dz = np.stack([2.0 / B * resid[:, i:i + 1] * hp["a"][i][None, :] for i in range(M)])
  flat = dz.reshape(M, -1)
  w = min_norm_scipy(flat @ flat.T)
  cot = np.tensordot(w, dz, axes=1)                          # Σ w_i ∂L_i/∂z
  pre = cot * (1.0 - z ** 2)
  trunk_upd = {"w": x.T @ pre, "b": pre.sum(axis=0)}
  head_upd = {"a": 2.0 / B * resid.T @ z}                    # each head: its own gradient
  return losses, w, trunk_upd, head_upd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_ub_equals_explicit_reference(seed, x64):
  x, y, tp, hp = problem(seed)
  tx = mo.mgda()
  assert mo.aggregator_info(tx).representation == "variant"
  step = jax.jit(lambda tp, hp, s: mo.representation_update(
      tx, s, trunk, heads_loss, tp, hp, trunk_args=(x,), head_args=(y,)))
  losses, (trunk_upd, head_upd), state = step(tp, hp, tx.init(None))
  losses_ref, w_ref, trunk_ref, head_ref = mgda_ub_reference(x, y, tp, hp)
  np.testing.assert_allclose(losses, losses_ref, rtol=1e-12)
  np.testing.assert_allclose(mo.task_weights(state), w_ref, atol=1e-6)
  for k in ("w", "b"):
    np.testing.assert_allclose(trunk_upd[k], trunk_ref[k], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(head_upd["a"], head_ref["a"], rtol=1e-12)
  # The representation Gram matrix is what the weights were computed from.
  z = np.tanh(x @ tp["w"] + tp["b"])
  dz = np.stack([2.0 / B * (z @ hp["a"][i] - y[:, i])[:, None] * hp["a"][i][None, :]
                 for i in range(M)]).reshape(M, -1)
  np.testing.assert_allclose(mo.diagnostics(state)["gram"], dz @ dz.T, rtol=1e-10)


def test_mgda_ub_differs_from_mgda_on_parameters(x64):
  """A variant, not the same method: parameter-space MGDA weights differ in general."""
  x, y, tp, hp = problem(0)
  _, w_ref, _, _ = mgda_ub_reference(x, y, tp, hp)
  losses, grads = mo.task_grads(lambda p: heads_loss(hp, trunk(p, x), y), tp)
  _, state = mo.mgda().update(grads, mo.mgda().init(tp), tp)
  assert np.max(np.abs(np.asarray(mo.task_weights(state)) - w_ref)) > 1e-3


def test_docstring_example_runs():
  """The MGDA-UB example in ``mo.mgda``'s docstring stays valid."""
  examples = doctest.DocTestParser().get_examples(mo.mgda.__doc__)
  assert examples, "mo.mgda's docstring lost its MGDA-UB example"
  env = {"jnp": jnp, "mo": mo}
  for example in examples:
    exec(example.source, env)  # pylint: disable=exec-used
  w = np.asarray(env["weights"])
  assert w.shape == (3,) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-6
  assert env["trunk_update"]["w"].shape == (4, 16)
  assert env["head_update"]["a"].shape == (3, 16)
