"""Issue 16 (part A): COSMOS, PBI, CR-MOGM, ConicGrad, NGDiff and grouped aggregation.

Each method against an independent NumPy/SciPy reference written from the paper
(numerical differentiation of the scalarisations, the EMA recurrence by hand, a
SLSQP solve of ConicGrad's primal cone problem, NGDiff's secant step size from
the analytic Hessian of a quadratic), jitted and not (chex.variants), plus the
shared properties of tests/properties.py and clear errors.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import mtl_optax as mo
from tests import properties as P

N = 5


@contextlib.contextmanager
def x64():
  with jax.enable_x64(True):
    yield


def numeric_grad(f, x, h=1e-6):
  """Central differences of a scalar function of a small vector (float64)."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in range(x.size):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def cosmos_ref(losses, r, lam):
  return r @ losses - lam * (r @ losses) / (np.linalg.norm(r) * np.linalg.norm(losses))


def pbi_ref(losses, r, theta, z=0.0):
  f = losses - z
  r_hat = r / np.linalg.norm(r)
  d1 = f @ r_hat
  return d1 + theta * np.linalg.norm(f - d1 * r_hat)


def one_step(tx, j, losses=None, variant=None, **extra):
  params = {"w": jnp.zeros(j.shape[1:], j.dtype)}
  fn = lambda g, s, kw: tx.update({"w": g}, s, params, **kw)
  fn = variant(fn) if variant is not None else fn
  kw = dict(extra)
  if losses is not None:
    kw["losses"] = jnp.asarray(losses, j.dtype)
  upd, state = fn(j, tx.init(params), kw)
  return np.asarray(upd["w"]), state


class Scalarisations(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_cosmos_and_pbi_are_the_gradient_of_the_paper_objectives(self):
    with x64():
      rng = np.random.default_rng(0)
      j = jnp.asarray(rng.standard_normal((3, N)))
      losses = rng.uniform(0.2, 3.0, 3)
      r = np.array([0.2, 0.5, 0.3])
      z = np.array([0.1, -0.2, 0.05])
      cases = [
          (mo.cosmos(r, lam=2.0), lambda l: cosmos_ref(l, r, 2.0), {}),
          (mo.cosmos(lam=0.5), lambda l: cosmos_ref(l, np.full(3, 1 / 3), 0.5), {}),
          (mo.pbi(r, theta=5.0), lambda l: pbi_ref(l, r, 5.0), {}),
          (mo.pbi(theta=3.0, reference=z), lambda l: pbi_ref(l, np.ones(3), 3.0, z), {}),
      ]
      for tx, s_ref, extra in cases:
        d, state = one_step(tx, j, losses, self.variant, **extra)
        w_ref = numeric_grad(s_ref, losses)
        w = np.asarray(mo.task_weights(state))
        np.testing.assert_allclose(w, w_ref, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(d, np.asarray(j).T @ w_ref, rtol=1e-7, atol=1e-9)

  def test_preference_at_update_time_overrides_the_fixed_one(self):
    with x64():
      rng = np.random.default_rng(1)
      j = jnp.asarray(rng.standard_normal((2, N)))
      losses = np.array([0.7, 1.9])
      r = np.array([0.9, 0.1])
      for tx, ref in [(mo.cosmos(lam=1.0), lambda l: cosmos_ref(l, r, 1.0)),
                      (mo.pbi(theta=2.0), lambda l: pbi_ref(l, r, 2.0))]:
        _, state = one_step(tx, j, losses, jax.jit, preference=jnp.asarray(r))
        np.testing.assert_allclose(mo.task_weights(state), numeric_grad(ref, losses),
                                   rtol=1e-7, atol=1e-9)

  def test_limits_and_edge_cases(self):
    j = jnp.asarray(P.normal_matrix(3, N, seed=2), jnp.float32)
    r = np.array([1.0, 2.0, 3.0])
    # λ = 0: linear scalarisation rᵀL; θ = 0: the projection r̂ᵀL.
    _, s = one_step(mo.cosmos(r, lam=0.0), j, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(mo.task_weights(s), r, rtol=1e-6)
    _, s = one_step(mo.pbi(r, theta=0.0), j, [1.0, 5.0, 3.0])
    np.testing.assert_allclose(mo.task_weights(s), r / np.linalg.norm(r), rtol=1e-6)
    # On the preference ray, PBI's d2 = 0: the zero subgradient (w = r̂), finite.
    _, s = one_step(mo.pbi(r, theta=5.0), j, 2.0 * r)
    np.testing.assert_allclose(mo.task_weights(s), r / np.linalg.norm(r), rtol=1e-6)
    # Zero, huge and tiny losses: finite weights (COSMOS's cosine is constant at L = 0).
    for losses in ([0.0, 0.0, 0.0], [1e30, 2e30, 1e29], [1e-30, 3e-30, 2e-30]):
      for tx in (mo.cosmos(r, lam=1.0), mo.pbi(r)):
        d = P.assert_structure(tx, j, losses)
        assert np.all(np.isfinite(d))
    _, s = one_step(mo.cosmos(r, lam=1.0), j, [0.0, 0.0, 0.0])
    np.testing.assert_allclose(mo.task_weights(s), r, rtol=1e-6)
    # Scale invariance of COSMOS's cosine gradient direction: w(cL) − r = (w(L) − r)/c.
    with x64():
      j64 = jnp.asarray(j, jnp.float64)
      _, s1 = one_step(mo.cosmos(r, lam=1.0), j64, [1.0, 2.0, 0.5])
      _, s2 = one_step(mo.cosmos(r, lam=1.0), j64, [1e6, 2e6, 0.5e6])
      np.testing.assert_allclose((np.asarray(mo.task_weights(s2)) - r) * 1e6,
                                 np.asarray(mo.task_weights(s1)) - r, rtol=1e-6)

  def test_heads_are_weighted_and_properties(self):
    g = {"trunk": jnp.asarray(P.normal_matrix(3, 4, seed=3), jnp.float32),
         "head": jnp.asarray(P.normal_matrix(3, 2, seed=4), jnp.float32)}
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
    losses = jnp.asarray([0.5, 1.0, 2.0])
    for tx in (mo.cosmos([0.2, 0.3, 0.5], task_specific={"trunk": False, "head": True}),
               mo.pbi([0.2, 0.3, 0.5], task_specific={"trunk": False, "head": True})):
      upd, state = tx.update(g, tx.init(params), params, losses=losses)
      w = np.asarray(mo.task_weights(state))
      np.testing.assert_allclose(upd["head"], w @ np.asarray(g["head"]), rtol=1e-5, atol=1e-6)
    j = P.normal_matrix(3, 6, seed=5)
    for tx in (mo.cosmos(num_tasks=3), mo.pbi(num_tasks=3)):
      P.assert_weighted(tx, j, P.losses_for(3))
      P.assert_permutation_invariant(tx, j, P.losses_for(3))  # uniform preference

  def test_errors(self):
    j = jnp.ones((3, N))
    with pytest.raises(ValueError, match="losses"):
      one_step(mo.cosmos(), j)
    with pytest.raises(ValueError, match="preference"):
      mo.pbi([0.0, 0.0])
    with pytest.raises(ValueError, match="preference"):
      mo.cosmos([1.0, -1.0])
    with pytest.raises(ValueError, match="2 entries"):
      one_step(mo.cosmos([0.5, 0.5]), j, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="preference= must have shape"):
      one_step(mo.pbi(), j, [1.0, 1.0, 1.0], preference=jnp.ones(2))
    with pytest.raises(ValueError, match="lam"):
      mo.cosmos(lam=-1.0)
    with pytest.raises(ValueError, match="reference"):
      mo.pbi(reference=[np.nan, 1.0])


class CRMOGM(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_of_the_wrapped_weights(self):
    with x64():
      rng = np.random.default_rng(2)
      js = [jnp.asarray(rng.standard_normal((3, N))) for _ in range(4)]
      beta = 0.7
      tx = mo.cr_mogm(mo.mgda(num_tasks=3), beta=beta, num_tasks=3)
      params = {"w": jnp.zeros(N)}
      step = self.variant(lambda g, s: tx.update({"w": g}, s, params))
      state, lam = tx.init(params), None
      for t, j in enumerate(js):
        d, state = step(j, state)
        # Reference: MGDA's min-norm weights solved independently by SLSQP, then the EMA.
        gram = np.asarray(j) @ np.asarray(j).T
        res = optimize.minimize(lambda w: w @ gram @ w, np.full(3, 1 / 3), method="SLSQP",
                                bounds=[(0, 1)] * 3,
                                constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                                options={"ftol": 1e-15, "maxiter": 500})
        lam = res.x if t == 0 else beta * lam + (1 - beta) * res.x
        np.testing.assert_allclose(mo.diagnostics(state)["inner_weights"], res.x, atol=1e-6)
        np.testing.assert_allclose(mo.task_weights(state), lam, atol=1e-6)
        np.testing.assert_allclose(d["w"], np.asarray(j).T @ np.asarray(mo.task_weights(state)),
                                   rtol=1e-9, atol=1e-12)

  def test_beta_limits_initial_weights_heads_and_errors(self):
    rng = np.random.default_rng(3)
    js = [jnp.asarray(rng.standard_normal((2, 4)), jnp.float32) for _ in range(3)]
    params = {"w": jnp.zeros(4)}

    def weights(tx):
      state, out = tx.init(params), []
      for j in js:
        _, state = tx.update({"w": j}, state, params)
        out.append(np.asarray(mo.task_weights(state)))
      return out

    bare = weights(mo.mgda(num_tasks=2))
    np.testing.assert_allclose(weights(mo.cr_mogm(mo.mgda(), beta=0.0, num_tasks=2)), bare,
                               rtol=1e-6)
    frozen = weights(mo.cr_mogm(mo.mgda(), beta=1.0, num_tasks=2))
    np.testing.assert_allclose(frozen, [bare[0]] * 3, rtol=1e-6)
    init = weights(mo.cr_mogm(mo.mgda(), beta=0.5, initial_weights=[1.0, 0.0], num_tasks=2))
    np.testing.assert_allclose(init[0], 0.5 * np.array([1.0, 0.0]) + 0.5 * bare[0], rtol=1e-6)
    # Loss weightings: heads weighted by the averaged weights, losses passed through.
    g = {"trunk": js[0], "head": js[1]}
    p = {"trunk": jnp.zeros(4), "head": jnp.zeros(4)}
    tx = mo.cr_mogm(mo.scale_invariant(), num_tasks=2, task_specific={"trunk": False, "head": True})
    upd, st = tx.update(g, tx.init(p), p, losses=jnp.asarray([0.5, 2.0]))
    np.testing.assert_allclose(mo.task_weights(st), [2.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(upd["head"], np.array([2.0, 0.5]) @ np.asarray(js[1]), rtol=1e-5)
    with pytest.raises(ValueError, match="not a weighted aggregator"):
      mo.cr_mogm(mo.graddrop(), num_tasks=2)
    with pytest.raises(ValueError, match="beta"):
      mo.cr_mogm(mo.mgda(), beta=1.5, num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks"):
      mo.cr_mogm(mo.mgda())
    with pytest.raises(ValueError, match="initial_weights"):
      mo.cr_mogm(mo.mgda(), initial_weights=[1.0], num_tasks=2)


def conic_ref(j, c):
  """SLSQP on ConicGrad's primal: max t s.t. J d ≥ t, ‖d‖ ≤ 1, ⟨d, ĝ0⟩ ≥ c; returns d."""
  m, n = j.shape
  g0 = j.mean(0)
  g0_hat = g0 / np.linalg.norm(g0)
  best = None
  for seed in range(4):  # a few starts: SLSQP is local on this (convex) problem's corners
    x0 = np.concatenate([np.random.default_rng(seed).standard_normal(n) * 0.1 + c * g0_hat,
                         [-10.0]])
    res = optimize.minimize(
        lambda x: -x[-1], x0, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda x: j @ x[:n] - x[-1]},
                     {"type": "ineq", "fun": lambda x: 1.0 - x[:n] @ x[:n]},
                     {"type": "ineq", "fun": lambda x: x[:n] @ g0_hat - c}],
        options={"ftol": 1e-14, "maxiter": 1000})
    if best is None or res.x[-1] > best.x[-1]:
      best = res
  d = best.x[:n]
  return d, best.x[-1]


class ConicGrad(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_agrees_with_a_slsqp_solve_of_the_cone_problem(self):
    with x64():
      # One shape and two cone angles: four programs in all (compilation dominates).
      for seed, c in [(1, 0.5), (2, 0.5), (3, 0.9), (4, 0.9)]:
        j = P.normal_matrix(3, 6, seed=seed) + 0.5  # a shared component: both cases occur
        d, state = one_step(mo.conicgrad(c=c), jnp.asarray(j), variant=self.variant)
        d_ref, t_ref = conic_ref(j, c)
        g0 = j.mean(0)
        want = np.linalg.norm(g0) * d_ref / np.linalg.norm(d_ref)
        np.testing.assert_allclose(d, want, atol=1e-4 * np.linalg.norm(g0))
        diag = mo.diagnostics(state)
        assert diag["cone_cosine"] >= c - 1e-9
        assert d @ g0 >= (c - 1e-6) * np.linalg.norm(d) * np.linalg.norm(g0)
        if t_ref > 1e-6:  # some direction improves every task: non-conflicting
          assert np.all(j @ d >= -1e-9)

  def test_golden_limits_and_properties(self):
    j = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    # The MGDA direction [0, 1, 1] is inside the 60° cone: d = ‖g0‖ [0, 1, 1]/√2.
    d, _ = P.aggregate(mo.conicgrad(c=0.5), j)
    np.testing.assert_allclose(d, np.sqrt(3) * np.array([0, 1, 1]) / np.sqrt(2), atol=1e-5)
    d, _ = P.aggregate(mo.conicgrad(c=1.0), j)   # c = 1: the mean gradient
    np.testing.assert_allclose(d, j.mean(0), rtol=1e-5, atol=1e-6)
    tx = mo.conicgrad(num_tasks=3)   # one instance, one (3, 6) shape: one compilation
    for mat in (P.normal_matrix(3, 6, seed=2), P.normal_matrix(3, 6, rank=1, seed=4)):
      P.assert_weighted(tx, mat)
      P.assert_permutation_invariant(tx, mat, rtol=1e-4, atol=1e-5)
      d1, _ = P.aggregate(tx, mat)
      d2, _ = P.aggregate(tx, 7.0 * mat)            # positively homogeneous
      np.testing.assert_allclose(d2, 7.0 * d1, atol=1e-4 * np.max(np.abs(7.0 * d1)))
    for _, mat in P.scaled_matrices():
      P.assert_structure(tx, mat)
    d, _ = P.aggregate(tx, np.zeros((3, 6)))
    np.testing.assert_array_equal(d, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
      mo.conicgrad(c=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
      mo.conicgrad(c=1.5)


class NGDiff(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_normalised_difference(self):
    with x64():
      j = np.array([[3.0, 4.0, 0.0], [0.0, 1e-3, 0.0]])
      d, state = one_step(mo.ngdiff(), jnp.asarray(j), variant=self.variant)
      np.testing.assert_allclose(d, j[0] / 5.0 - j[1] / 1e-3, rtol=1e-12)
      np.testing.assert_allclose(mo.task_weights(state), [0.2, -1e3], rtol=1e-12)
      d, _ = one_step(mo.ngdiff(ascend_forget=False), jnp.asarray(j), variant=self.variant)
      np.testing.assert_allclose(d, j[0] / 5.0 + j[1] / 1e-3, rtol=1e-12)

  def test_edge_cases_and_errors(self):
    j = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])   # a zero gradient contributes 0
    d, _ = one_step(mo.ngdiff(), j)
    np.testing.assert_allclose(d, -np.array([1.0, 2.0, 2.0]) / 3.0, rtol=1e-6)
    for scale in (1e-15, 1e30):
      d = P.assert_structure(mo.ngdiff(), np.array([[1.0, 0, 0], [0, 1.0, 0]]) * scale)
      np.testing.assert_allclose(d, [1.0, -1.0, 0.0], rtol=1e-5)
    for m in (1, 3):
      with pytest.raises(ValueError, match="exactly two objectives"):
        one_step(mo.ngdiff(), jnp.ones((m, 3)))
    with pytest.raises(ValueError, match="lr_smoothing"):
      mo.ngdiff(lr_smoothing=1.0)

  def test_automatic_learning_rate_is_the_secant_generalised_newton_step(self):
    """On quadratic losses the secant curvature is exactly dᵀH d (H of the frozen-weight F)."""
    with x64():
      rng = np.random.default_rng(4)
      a = [np.diag(rng.uniform(0.5, 2.0, 3)), np.diag(rng.uniform(0.1, 1.0, 3))]
      b = [rng.standard_normal(3), rng.standard_normal(3)]
      loss_fn = lambda p: jnp.stack([0.5 * p @ a[i] @ p - b[i] @ p for i in range(2)])
      beta, eta0 = 0.5, 0.05
      tx = optax.chain(mo.ngdiff(auto_lr=True, learning_rate=eta0, lr_smoothing=beta),
                       optax.scale(-1.0))
      theta = jnp.asarray(rng.standard_normal(3))
      state = tx.init(theta)
      def task_grads_and_losses(p):
        losses, grads = mo.task_grads(loss_fn, p)
        return grads, losses

      step = jax.jit(lambda p, s: (lambda gl: tx.update(gl[0], s, p, losses=gl[1]))(
          task_grads_and_losses(p)))
      th, eta = np.asarray(theta), eta0
      d_prev = w_prev = None
      for t in range(4):
        upd, state = step(theta, state)
        # Reference: d_t = g_R/‖g_R‖ − g_F/‖g_F‖ at θ_t; η from the previous step.
        g = [a[i] @ th - b[i] for i in range(2)]
        w = np.array([1 / np.linalg.norm(g[0]), -1 / np.linalg.norm(g[1])])
        d = w[0] * g[0] + w[1] * g[1]
        if t > 0:
          q = d_prev @ (w_prev[0] * a[0] + w_prev[1] * a[1]) @ d_prev
          eta_star = (d_prev @ d_prev) / q
          if q > 0:
            eta = beta * eta + (1 - beta) * eta_star
          np.testing.assert_allclose(mo.diagnostics(state)["curvature"], q, rtol=1e-8)
        np.testing.assert_allclose(mo.diagnostics(state)["learning_rate"], eta, rtol=1e-8)
        np.testing.assert_allclose(upd, -eta * d, rtol=1e-8, atol=1e-12)
        theta = optax.apply_updates(theta, upd)
        th = th - eta * d
        d_prev, w_prev = d, w


class Grouped(chex.TestCase):

  def _grads(self, m=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"enc": {"kernel": jnp.asarray(rng.standard_normal((m, 3, 2)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal((m, 2)), jnp.float32)},
            "dec": {"kernel": jnp.asarray(rng.standard_normal((m, 2, 2)), jnp.float32)},
            "head": jnp.asarray(rng.standard_normal((m, 2)), jnp.float32)}

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_group_is_the_aggregator_and_two_groups_are_separate_runs(self):
    g = self._grads()
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
    heads = {"enc": {"kernel": False, "bias": False}, "dec": {"kernel": False}, "head": True}
    # One group.
    tx1 = mo.grouped(mo.mgda(num_tasks=3), groups=lambda path, leaf: 0, task_specific=heads)
    ref = mo.mgda(num_tasks=3, task_specific=heads)
    got, st = self.variant(lambda g, s: tx1.update(g, s, params))(g, tx1.init(params))
    want, ref_st = ref.update(g, ref.init(params), params)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mo.task_weights(st), mo.task_weights(ref_st), rtol=1e-6)
    # Two groups == MGDA run on each group's gradients alone (flattening order: "dec", "enc").
    tx2 = mo.grouped(mo.mgda(num_tasks=3), groups="top_level", task_specific=heads)
    got, st = self.variant(lambda g, s: tx2.update(g, s, params))(g, tx2.init(params))
    diags = mo.group_diagnostics(st)
    assert len(diags) == 2
    for key, diag in zip(("dec", "enc"), diags):
      alone = mo.mgda(num_tasks=3)
      want, s_alone = alone.update(g[key], alone.init(params[key]), params[key])
      chex.assert_trees_all_close(got[key], want, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(diag["weights"], mo.task_weights(s_alone), rtol=1e-6)
    np.testing.assert_allclose(got["head"], np.asarray(g["head"]).sum(0), rtol=1e-6)
    np.testing.assert_allclose(mo.task_weights(st), diags[0]["weights"])

  def test_groupings_state_heads_and_nonfinite(self):
    g = self._grads()
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
    counts = {"leaf": 4, "layer": 3, "top_level": 3}
    for groups, k in counts.items():
      assert len(mo.grouped(mo.mean(), groups=groups).init(params).groups) == k
    # Loss weightings: heads weighted by the (common) weights; state fixed under jit.
    tx = optax.chain(mo.grouped(mo.scale_invariant(num_tasks=3), task_specific=lambda p, l:
                                "head" in jax.tree_util.keystr(p)), optax.sgd(0.1))
    state = tx.init(params)
    step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
    losses = jnp.asarray([0.5, 1.0, 2.0])
    for i in range(2):
      upd, state = step(self._grads(seed=i), state, losses)
    assert step._cache_size() == 1
    np.testing.assert_allclose(upd["head"], -0.1 * (1 / np.asarray(losses)) @ np.asarray(
        self._grads(seed=1)["head"]), rtol=1e-5)
    # A non-finite task gradient anywhere: the whole step is skipped.
    bad = self._grads()
    bad["dec"]["kernel"] = bad["dec"]["kernel"].at[1, 0, 0].set(jnp.nan)
    upd, st = step(bad, state, losses)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(upd))
    assert all(int(d["nonfinite_tasks"]) == 1 for d in mo.group_diagnostics(st))
    with pytest.raises(ValueError, match="groups"):
      mo.grouped(mo.mean(), groups="bogus")
    with pytest.raises(TypeError, match="aggregator"):
      mo.grouped(optax.sgd(0.1))
