"""LDC-MTL: NumPy reference of the authors' training step, properties.

The reference differentiates in NumPy (chain rule, sign(0) = 0 as autograd;
cross-checked by five-point finite differences away from the kinks) the
objective of the authors' trainers (OptMN-Lab/LDC-MTL, ``experiments/*/
trainer.py``): F(θ, ξ) = Σ σ_i L̃_i / sg(Σσ) + λ Σ |σ_i L̃_i − σ_{i+1} L̃_{i+1}|,
σ = sigmoid(ξ), with quadratic task losses L_i(θ) = ½‖A_i θ − b_i‖². The model
update must be ∇_θ F and ξ must follow Adam on ∇_ξ F, over several steps.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo

M, N, STEPS = 3, 4, 5


def _problem(seed):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((M, 6, N)) * rng.uniform(0.5, 3.0, (M, 1, 1))
  b = rng.standard_normal((M, 6))
  return a, b


def _losses(a, b, theta):
  return 0.5 * np.sum((np.einsum("imn,n->im", a, theta) - b) ** 2, axis=1)


def _normalize(losses, initial, normalization):
  """L̃ and dL̃/dL of the authors' three trainers (NYUv2 ratio, QM9 log, CelebA raw)."""
  if normalization == "ratio":
    r = initial / initial.min()
    return losses / r, 1.0 / r
  if normalization == "log":
    return np.log(losses / initial), 1.0 / losses
  return losses, np.ones_like(losses)


def _objective(theta, xi, a, b, lamb, normalization, initial, total_sigma):
  norm, _ = _normalize(_losses(a, b, theta), initial, normalization)
  sigma = 1.0 / (1.0 + np.exp(-xi))
  wl = sigma * norm
  return wl.sum() / total_sigma + lamb * np.abs(wl[:-1] - wl[1:]).sum()


def _analytic(theta, xi, a, b, lamb, normalization, initial):
  """∇_θ F and ∇_ξ F by the chain rule, sign(0) = 0 at the kinks (as autograd)."""
  res = np.einsum("imn,n->im", a, theta) - b
  grads = np.einsum("imn,im->in", a, res)
  norm, dnorm = _normalize(_losses(a, b, theta), initial, normalization)
  sigma = 1.0 / (1.0 + np.exp(-xi))
  wl = sigma * norm
  dwl = np.zeros(M)
  for i in range(M - 1):
    sgn = np.sign(wl[i] - wl[i + 1])
    dwl[i] += lamb * sgn
    dwl[i + 1] -= lamb * sgn
  d_norm = sigma / sigma.sum() + dwl * sigma
  d_sigma = norm / sigma.sum() + dwl * norm
  return (d_norm * dnorm) @ grads, d_sigma * sigma * (1 - sigma), np.min(np.abs(np.diff(wl)))


def _fd(f, x, h=1e-4):
  """Five-point central differences (error O(h⁴) + O(eps/h) ≈ 1e-12 away from kinks)."""
  out = np.zeros_like(x)
  for i in range(x.size):
    e = np.zeros_like(x)
    e[i] = h
    out[i] = (-f(x + 2 * e) + 8 * f(x + e) - 8 * f(x - e) + f(x - 2 * e)) / (12 * h)
  return out


class ReferenceAgreement(chex.TestCase):

  def _run(self, normalization, lamb):
    with jax.enable_x64(True):
      a, b = _problem({"ratio": 0, "log": 1, "none": 2}[normalization])
      lr = 0.05
      tx = mo.ldc_mtl(lamb, lr, normalization=normalization, num_tasks=M)
      loss_fn = lambda p: 0.5 * jnp.sum((jnp.einsum("imn,n->im", a, p["w"]) - b) ** 2, axis=1)
      params = {"w": jnp.zeros(N)}
      state = tx.init(params)
      step = self.variant(lambda g, s, l: tx.update(g, s, params, losses=l))
      theta, xi = np.zeros(N), np.ones(M)
      mom, vel, initial = np.zeros(M), np.zeros(M), None
      for k in range(STEPS):
        losses, grads = mo.task_grads(loss_fn, {"w": jnp.asarray(theta)})
        upd, state = step(grads, state, losses)
        initial = _losses(a, b, theta) if initial is None else initial
        d_theta, d_xi, gap = _analytic(theta, xi, a, b, lamb, normalization, initial)
        if gap > 1e-3:  # away from the |·| kinks (step 0 sits on one: L̃ all equal)
          total = np.sum(1.0 / (1.0 + np.exp(-xi)))
          f = lambda t, x: _objective(t, x, a, b, lamb, normalization, initial, total)
          np.testing.assert_allclose(_fd(lambda t: f(t, xi), theta), d_theta, rtol=1e-7)
          np.testing.assert_allclose(_fd(lambda x: f(theta, x), xi), d_xi, rtol=1e-7)
        np.testing.assert_allclose(upd["w"], d_theta, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(
            mo.task_weights(state) @ np.asarray(grads["w"]), d_theta, rtol=1e-8, atol=1e-10)
        mom = 0.9 * mom + 0.1 * d_xi
        vel = 0.999 * vel + 0.001 * d_xi ** 2
        xi = xi - lr * (mom / (1 - 0.9 ** (k + 1))) / (
            np.sqrt(vel / (1 - 0.999 ** (k + 1))) + 1e-8)
        np.testing.assert_allclose(state.inner.logits, xi, rtol=1e-7, atol=1e-9)
        theta = theta - 0.05 * d_theta
      return np.asarray(mo.task_weights(state))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ratio_normalization(self):
    self._run("ratio", 0.1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_log_normalization(self):
    self._run("log", 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_normalization_large_lambda(self):
    w = self._run("none", 2.0)
    assert np.any(w < 0)  # the discrepancy term may push a task's loss up


def test_properties():
  params = {"w": jnp.zeros(3)}
  j = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 3)), jnp.float32)}
  tx = mo.ldc_mtl(0.5, normalization="none", num_tasks=3)
  # Equal weighted losses: no discrepancy gradient, w = σ/Σσ = 1/3.
  _, st = tx.update(j, tx.init(params), params, losses=jnp.full((3,), 0.8))
  np.testing.assert_allclose(mo.task_weights(st), np.full(3, 1 / 3), rtol=1e-6)
  # λ = 0: plain weighted mean (σ/Σσ), positive; the weights shrink the largest loss' σ.
  tx0 = mo.ldc_mtl(0.0, 0.1, normalization="none", num_tasks=3)
  s = tx0.init(params)
  for _ in range(3):
    _, s = tx0.update(j, s, params, losses=jnp.asarray([0.1, 1.0, 5.0]))
  assert np.all(np.asarray(mo.task_weights(s)) > 0)
  sig = np.asarray(mo.diagnostics(s)["sigma"])
  assert sig[0] > sig[1] > sig[2]
  # The first call's losses set the ratio normalisation: equal normalised losses.
  tx = mo.ldc_mtl(num_tasks=3)
  _, st = tx.update(j, tx.init(params), params, losses=jnp.asarray([2.0, 4.0, 8.0]))
  np.testing.assert_allclose(mo.diagnostics(st)["normalized_losses"], [2.0, 2.0, 2.0],
                             rtol=1e-6)
  np.testing.assert_allclose(mo.task_weights(st), [1 / 3, 1 / 6, 1 / 12], rtol=1e-6)
  # Zero losses stay finite.
  for norm in ("ratio", "log", "none"):
    t = mo.ldc_mtl(normalization=norm, num_tasks=3)
    upd, st = t.update(j, t.init(params), params, losses=jnp.zeros(3))
    assert np.all(np.isfinite(upd["w"])), norm


def test_errors():
  with pytest.raises(ValueError, match="num_tasks"):
    mo.ldc_mtl()
  with pytest.raises(ValueError, match="normalization"):
    mo.ldc_mtl(normalization="mean", num_tasks=2)
  with pytest.raises(ValueError, match="lamb"):
    mo.ldc_mtl(-0.1, num_tasks=2)
  with pytest.raises(ValueError, match="init"):
    mo.ldc_mtl(init=float("nan"), num_tasks=2)
  tx = mo.ldc_mtl(num_tasks=2)
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="losses"):
    tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
