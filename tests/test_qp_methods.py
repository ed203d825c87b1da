"""UPGrad, DualProj, Nash-MTL, FairGrad and the in-jit solvers behind them.

* KKT conditions of every solver (the lower-bounded QP of UPGrad/DualProj, the
  Nash/FairGrad equations, CAGrad's dual, MGDA's min-norm QP) on batches of
  random Gram matrices, full rank and rank-deficient, for m ∈ {2, 3, 5, 9, 20,
  50}: one jit per size, shared by the tests of that size.
* Agreement with independent SciPy references written here (``nnls`` for the
  QPs, ``least_squares`` for the Nash/FairGrad equations, as LibMTL does).
* TorchJD's published values and property suite (structure, weighted,
  permutation invariance, non-conflicting, linear under scaling) in float32
  and float64, jit and no-jit; method-specific behaviour and errors.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg as sla
from scipy import optimize

import mtl_optax as mo
from mtl_optax._src import linalg
from mtl_optax._src.methods.cagrad import cagrad_dual
from tests import properties as P

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
SIZES = (2, 3, 5, 9, 20, 50)
SEEDS = 3


def _x64():
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:  # older jax
    from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  return ctx(True)


# ---------------------------------------------------------------------------
# Independent references (NumPy / SciPy).
# ---------------------------------------------------------------------------

def qp_reference(q, u):
  """argmin vᵀQv s.t. v ≥ u via scipy's NNLS on the Cholesky factor (Q ≻ 0)."""
  lt = sla.cholesky(q, lower=False)              # Q = LᵀL, vᵀQv = ‖Lv‖²
  x, _ = optimize.nnls(lt, -lt @ u, maxiter=50 * len(u))
  return u + x


def dual_cone_reference(j, lowers, reg_eps):
  """TorchJD's recipe: Ĝ = G/tr(G) + reg_eps·I, w = Σ_k argmin vᵀĜv s.t. v ≥ u_k."""
  g = j @ j.T
  q = g / np.trace(g) + reg_eps * np.eye(len(g))
  return sum(qp_reference(q, u) for u in lowers)


def power_reference(g, alpha=1.0):
  """Positive root of Gw = w^{-1/α} with scipy least_squares (LibMTL's approach)."""
  m = len(g)
  res = optimize.least_squares(lambda w: g @ w - w ** (-1.0 / alpha), np.full(m, 1.0 / m),
                               bounds=(1e-12, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15,
                               max_nfev=10000)
  return res.x


def nash_reference(j, max_norm=1.0):
  w = power_reference(j @ j.T)
  norm = np.linalg.norm(w @ j)
  if max_norm > 0 and norm > max_norm:
    w = w * max_norm / norm
  return w @ j


# ---------------------------------------------------------------------------
# Solvers: KKT on random Gram matrices (one jit per size).
# ---------------------------------------------------------------------------

def _grams(m, kind, seed):
  rng = np.random.default_rng(1000 * m + seed)
  n = m + 5
  if kind == "full":
    j = rng.standard_normal((m, n))
  elif kind == "cone":   # rank ≤ 2, rows in a pointed cone: the Nash system has a root
    j = rng.uniform(0.1, 1.0, (m, 2)) @ rng.standard_normal((2, n))
  else:                  # rank 1 and 2 with arbitrary signs (often Pareto-stationary)
    r = 1 if kind == "rank1" else 2
    j = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
  return j @ j.T


@functools.lru_cache(maxsize=None)
def solver_results(m):
  """All solvers on one batch of problems of size m, in float64 (one compilation)."""
  kinds = ["full", "cone", "rank1", "rank2"]
  grams = np.stack([_grams(m, k, s) for k in kinds for s in range(SEEDS)])
  qp_grams = np.stack([g / np.trace(g) + (1e-4 if i % 2 else 0.0) * np.eye(m)
                       for i, g in enumerate(grams)])
  lowers = np.random.default_rng(m).uniform(0.0, 1.0, (len(grams), m))
  nash_grams = grams[: 2 * SEEDS]  # full and cone: a root exists

  def run(qg, u, g, ng):
    qp = jax.vmap(linalg.lower_bounded_qp)(qg, u)
    nash = jax.vmap(lambda a: linalg.nash_system(a, 1.0))(ng)
    fair = {a: jax.vmap(lambda x, a=a: linalg.nash_system(x, a, max_iters=30))(ng)
            for a in (0.5, 2.0, 5.0)}
    mgda = jax.vmap(linalg.min_norm_on_simplex)(g)
    cag = jax.vmap(lambda a: cagrad_dual(a, 0.5))(g)
    return qp, nash, fair, mgda, cag

  with _x64():
    out = jax.jit(run)(*(jnp.asarray(a, jnp.float64) for a in (qp_grams, lowers, grams, nash_grams)))
    out = jax.tree_util.tree_map(np.asarray, out)
  return dict(qp_grams=qp_grams, lowers=lowers, grams=grams, nash_grams=nash_grams,
              qp=out[0], nash=out[1], fair=out[2], mgda=out[3], cagrad=out[4])


@pytest.mark.parametrize("m", SIZES)
def test_lower_bounded_qp_kkt(m):
  """v ≥ u, Qv ≥ 0, (v − u)ᵀQv = 0 (Q = G/tr G, with and without ridge 1e-4)."""
  r = solver_results(m)
  for q, u, v, res in zip(r["qp_grams"], r["lowers"], r["qp"].x, r["qp"].residual):
    qv = q @ v
    scale = np.abs(q) @ np.abs(v)
    assert np.all(v >= u), (v - u).min()
    assert np.all(qv >= -1e-10 * scale), (qv / scale).min()
    assert abs((v - u) @ qv) <= 1e-10 * (np.abs(v - u) @ scale + 1e-300)
    assert res <= 1e-10
  # Against SciPy's NNLS where the QP is strictly convex (ridge 1e-4).
  for q, u, v in list(zip(r["qp_grams"], r["lowers"], r["qp"].x))[1::2]:
    ref = qp_reference(q, u)
    np.testing.assert_allclose(v, ref, rtol=1e-7, atol=1e-8 * np.abs(ref).max())


@pytest.mark.parametrize("m", SIZES)
def test_nash_system_kkt(m):
  """‖Gw − 1/w‖ / ‖1/w‖ small, w > 0 (Nash-MTL), and SciPy agrees."""
  r = solver_results(m)
  for g, w, res in zip(r["nash_grams"], r["nash"].x, r["nash"].residual):
    assert np.all(w > 0)
    rel = np.linalg.norm(g @ w - 1.0 / w) / np.linalg.norm(1.0 / w)
    assert rel <= 1e-9, rel
    assert res <= 1e-9
  if m <= 9:
    for g, w in zip(r["nash_grams"], r["nash"].x):
      np.testing.assert_allclose(w, power_reference(g), rtol=1e-6)


@pytest.mark.parametrize("m", SIZES)
def test_fairgrad_system_kkt(m):
  """‖Gw − w^{-1/α}‖ / ‖w^{-1/α}‖ small for α ∈ {0.5, 2, 5}, and SciPy agrees."""
  r = solver_results(m)
  for alpha, sol in r["fair"].items():
    for g, w in zip(r["nash_grams"], sol.x):
      target = w ** (-1.0 / alpha)
      rel = np.linalg.norm(g @ w - target) / np.linalg.norm(target)
      assert np.all(w > 0) and rel <= 1e-9, (alpha, rel)
    if m <= 5:
      for g, w in zip(r["nash_grams"], sol.x):
        np.testing.assert_allclose(w, power_reference(g, alpha), rtol=1e-6)


@pytest.mark.parametrize("m", SIZES)
def test_mgda_kkt(m):
  """w ∈ Δ, (Gw)_i ≥ wᵀGw, with equality on the support."""
  r = solver_results(m)
  for g, w in zip(r["grams"], r["mgda"].x):
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    gw = g @ w
    tol = 1e-7 * np.abs(g).max()
    assert np.all(gw >= w @ gw - tol)
    assert np.all(np.abs(gw[w > 1e-9] - w @ gw) <= tol)


@pytest.mark.parametrize("m", SIZES)
def test_cagrad_dual_kkt(m):
  """Optimality of F(w) = wᵀGb + c‖g₀‖‖Jᵀw‖ over the simplex (b = 1/m)."""
  r = solver_results(m)
  c = 0.5
  for g, w in zip(r["grams"], r["cagrad"].x):
    b = np.full(m, 1.0 / m)
    k = c * np.sqrt(b @ g @ b)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-7
    gw_norm = np.sqrt(max(w @ g @ w, 0.0))
    if gw_norm <= 1e-6 * np.sqrt(np.trace(g)):
      continue  # F is not differentiable at g_w = 0 (0 in the hull): checked below
    grad = g @ b + k * (g @ w) / gw_norm
    nu = w @ grad
    tol = 1e-5 * np.abs(grad).max()
    assert np.all(grad >= nu - tol), (grad - nu).min()
    assert np.all(np.abs(grad[w > 1e-7] - nu) <= tol)
  # Objective no worse than SciPy's SLSQP (small sizes).
  if m <= 9:
    for g, w in zip(r["grams"], r["cagrad"].x):
      b = np.full(m, 1.0 / m)
      k = c * np.sqrt(b @ g @ b)
      f = lambda x, g=g, b=b, k=k: x @ g @ b + k * np.sqrt(max(x @ g @ x, 0.0))
      ref = optimize.minimize(f, b, bounds=[(0, 1)] * m, method="SLSQP",
                              constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                              options={"ftol": 1e-14, "maxiter": 1000})
      assert f(w) <= ref.fun + 1e-7 * abs(ref.fun) + 1e-12


def test_solvers_float32_accuracy(x64):
  """float32 solves agree with float64 ones to the conditioning of the problem."""
  m = 9
  j = np.random.default_rng(3).standard_normal((m, 14))
  g = j @ j.T
  q = g / np.trace(g) + 1e-4 * np.eye(m)
  u = np.full(m, 1.0 / m)
  v32 = np.asarray(linalg.lower_bounded_qp(jnp.asarray(q, jnp.float32), jnp.asarray(u, jnp.float32)).x)
  np.testing.assert_allclose(v32, qp_reference(q, u), rtol=2e-4, atol=1e-5)
  w32 = np.asarray(linalg.nash_system(jnp.asarray(g, jnp.float32)).x)
  np.testing.assert_allclose(w32, power_reference(g), rtol=1e-4)


def test_nash_system_edge_cases(x64):
  """Zero rows get weight 0; Pareto-stationary rows give finite w and d ≈ 0."""
  j = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 3.0]])
  sol = linalg.nash_system(jnp.asarray(j @ j.T))
  w = np.asarray(sol.x)
  assert w[1] == 0.0
  ref = power_reference((j @ j.T)[np.ix_([0, 2], [0, 2])])
  np.testing.assert_allclose(w[[0, 2]], ref, rtol=1e-8)
  opposite = np.array([[1.0, 2.0, -1.0], [-2.0, -4.0, 2.0]])   # g2 = −2 g1: no root
  sol = linalg.nash_system(jnp.asarray(opposite @ opposite.T))
  w = np.asarray(sol.x)
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  assert np.linalg.norm(w @ opposite) <= 1e-6 * np.abs(w).max() * np.linalg.norm(opposite)
  assert float(sol.residual) > 0.5  # reports that there is no solution


# ---------------------------------------------------------------------------
# Golden values (TorchJD's published values, methods.md §D).
# ---------------------------------------------------------------------------

GOLDEN = [
    (lambda: mo.upgrad(), [0.2929, 1.9004, 1.9004]),
    (lambda: mo.dualproj(), [0.5563, 1.1109, 1.1109]),
    (lambda: mo.nash_mtl(num_tasks=2), [0.0542, 0.7061, 0.7061]),
]


@pytest.mark.parametrize("factory,expected", GOLDEN)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_golden_values(factory, expected, dtype, x64):
  d = P.assert_structure(factory(), J_GOLDEN, dtype=dtype)
  np.testing.assert_allclose(d, expected, atol=1e-4)


# ---------------------------------------------------------------------------
# Property suite (methods.md §D), float32 and float64, jit and no-jit.
# ---------------------------------------------------------------------------

def families():
  """TorchJD-style input families, all 4 × 6 (one compilation), plus one m > n."""
  base = P.normal_matrix(4, 6, seed=21)
  cases = [
      ("normal", base),
      ("rank1", P.normal_matrix(4, 6, rank=1, seed=22)),
      ("rank2", P.normal_matrix(4, 6, rank=2, seed=23)),
      ("zero", np.zeros((4, 6))),
      ("strong_stationary", P.strong_stationary_matrix(4, 6, seed=24)),
      ("weak_stationary", P.weak_stationary_matrix(4, 6, seed=25)),
  ]
  return cases + [(f"scaled_{s:g}", base * s) for s in P.SCALES]


WIDE = ("wide_7x3", P.normal_matrix(7, 3, seed=26))

METHODS = {
    "upgrad": (lambda m: mo.upgrad(), True),
    "upgrad_exact": (lambda m: mo.upgrad(reg_eps=0.0), True),
    "dualproj": (lambda m: mo.dualproj(), True),
    "nash_mtl": (lambda m: mo.nash_mtl(num_tasks=m), True),
    "fairgrad": (lambda m: mo.fairgrad(alpha=2.0), False),
}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_properties(name, dtype, x64):
  build, non_conflicting = METHODS[name]
  f32 = dtype == jnp.float32
  rtol = 1e-4 if f32 else 1e-6
  txs = {4: build(4), 7: build(7)}  # one instance per shape: every case compiles once
  for cases, m in ((families(), 4), ([WIDE], 7)):
    tx = txs[m]
    for case, j in cases:
      j = np.asarray(jnp.asarray(j, dtype), np.float64)   # the matrix the method sees
      P.assert_structure(tx, j, dtype=dtype)
      w = P.assert_weighted(tx, j, dtype=dtype, rtol=rtol)
      P.assert_permutation_invariant(tx, j, dtype=dtype, rtol=rtol, atol=rtol)
      if name == "upgrad" or name == "dualproj":
        # reg_eps = 1e-4: g_iᵀd ≥ −reg_eps·tr(G)·w_i (exactly non-conflicting for reg_eps = 0).
        d, _ = P.aggregate(tx, j, dtype=dtype)
        bound = 1e-4 * np.sum(j * j) * np.abs(w) + 10 * rtol * np.abs(j).max() * np.abs(d).max()
        assert np.all(j @ d >= -bound), (case, j @ d, bound)
      elif non_conflicting and "scaled_1e+15" not in case:
        P.assert_non_conflicting(tx, j, dtype=dtype, rtol=rtol)
  if name == "upgrad_exact":
    for _, j in families()[:3]:
      P.assert_linear_under_scaling(txs[4], j, dtype=dtype, rtol=10 * rtol, atol=10 * rtol)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree(self):
    for dtype in (jnp.float32, jnp.float64):
      with _x64():
        for _, j in (families()[0], families()[4]):
          jj = jnp.asarray(j, dtype)
          for name, (build, _) in sorted(METHODS.items()):
            tx = build(4)
            params = {"w": jnp.zeros(6, dtype)}
            state = tx.init(params)
            upd = self.variant(lambda g, s, tx=tx, params=params: tx.update(g, s, params))
            got, got_state = upd({"w": jj}, state)
            want, _ = jax.jit(lambda g, s, tx=tx, params=params: tx.update(g, s, params))(
                {"w": jj}, state)
            tol = 1e-4 if dtype == jnp.float32 else 1e-9
            np.testing.assert_allclose(got["w"], want["w"], rtol=tol, atol=tol, err_msg=name)
            assert np.all(np.isfinite(np.asarray(mo.task_weights(got_state))))


# ---------------------------------------------------------------------------
# UPGrad and DualProj.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("reg_eps", [0.0, 1e-4])
def test_upgrad_and_dualproj_match_scipy(reg_eps, x64):
  txs = {k: f(reg_eps) for k, f in (("u", lambda r: mo.upgrad(reg_eps=r)),
                                    ("d", lambda r: mo.dualproj(reg_eps=r)),
                                    ("up", lambda r: mo.upgrad([0.5, 0.1, 2.0, 0.0, 1.0], r)))}
  for seed in range(3):
    j = P.normal_matrix(5, 8, seed=seed) * np.array([[1.0], [3.0], [0.3], [1.0], [10.0]])
    p = np.full(5, 0.2)
    for key, lowers in (("u", np.diag(p)), ("d", p[None]),
                        ("up", np.diag([0.5, 0.1, 2.0, 0.0, 1.0]))):
      d, state = P.aggregate(txs[key], j)
      w = dual_cone_reference(j, lowers, reg_eps)
      np.testing.assert_allclose(d, w @ j, rtol=1e-7, atol=1e-9 * np.abs(j).max())
      np.testing.assert_allclose(mo.task_weights(state), w, rtol=1e-6, atol=1e-9)
      assert float(mo.diagnostics(state)["residual"]) <= 1e-10


def test_upgrad_exact_is_non_conflicting_for_disparate_scales():
  """reg_eps = 0: J d ≥ 0 on unit rows even when task gradients differ by 1e±20 (float32)."""
  rng = np.random.default_rng(0)
  j = rng.standard_normal((5, 8))
  j[3] = -0.5 * j[1]                                 # opposite tasks
  j = j * np.array([1e-20, 1.0, 1e10, 1e20, 1e-5])[:, None]
  for tx in (mo.upgrad(reg_eps=0.0), mo.dualproj(reg_eps=0.0), mo.nash_mtl(num_tasks=5)):
    d, state = P.aggregate(tx, j, dtype=jnp.float32)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(np.asarray(mo.task_weights(state))))
    unit = j / np.linalg.norm(j, axis=1, keepdims=True)
    assert np.all(unit @ d >= -1e-4 * np.linalg.norm(d)), unit @ d


def test_dualproj_keeps_a_non_conflicting_mean(x64):
  """If the mean is already in the dual cone, the projection is the identity."""
  rng = np.random.default_rng(1)
  j = rng.uniform(0.1, 1.0, (4, 6))                  # all gradients in the positive orthant
  d, state = P.aggregate(mo.dualproj(reg_eps=0.0), j)
  np.testing.assert_allclose(d, j.mean(0), rtol=1e-12)
  np.testing.assert_allclose(mo.task_weights(state), np.full(4, 0.25), rtol=1e-12)
  d, _ = P.aggregate(mo.upgrad(reg_eps=0.0), j)
  np.testing.assert_allclose(d, j.mean(0), rtol=1e-12)


def test_norm_eps_fallback_to_preferences(x64):
  j = P.normal_matrix(3, 5, seed=4) * 1e-3            # ‖J‖_F² ~ 1e-5 < 1e-4
  for factory in (mo.upgrad, mo.dualproj):
    _, state = P.aggregate(factory(norm_eps=1e-4), j)  # TorchJD's behaviour: the mean
    np.testing.assert_allclose(mo.task_weights(state), np.full(3, 1 / 3), rtol=1e-12)
    _, state = P.aggregate(factory(), j)               # default: a genuine projection
    w_small = np.asarray(mo.task_weights(state))
    _, state = P.aggregate(factory(), j * 1e3)
    np.testing.assert_allclose(w_small, 1e3 * np.asarray(mo.task_weights(state)), rtol=1e-9)
    _, state = P.aggregate(factory(), np.zeros((3, 5)))  # all zero: the preferences
    np.testing.assert_allclose(mo.task_weights(state), np.full(3, 1 / 3), rtol=1e-12)


def test_upgrad_dualproj_errors():
  for factory in (mo.upgrad, mo.dualproj):
    with pytest.raises(ValueError, match="reg_eps"):
      factory(reg_eps=-1.0)
    with pytest.raises(ValueError, match="norm_eps"):
      factory(norm_eps=float("nan"))
    with pytest.raises(ValueError, match="pref_vector"):
      factory(pref_vector=[1.0, -1.0])
    with pytest.raises(ValueError, match="pref_vector"):
      factory(pref_vector=[0.0, 0.0])
    with pytest.raises(ValueError, match="num_tasks"):
      factory(pref_vector=[1.0, 2.0], num_tasks=3)
    with pytest.raises(ValueError, match="m=3"):
      P.aggregate(factory(pref_vector=[1.0, 2.0]), np.ones((3, 4)))
    with pytest.raises(ValueError, match="max_iters"):
      factory(max_iters=0)


# ---------------------------------------------------------------------------
# Nash-MTL.
# ---------------------------------------------------------------------------

def test_nash_mtl_matches_scipy_and_is_scale_invariant(x64):
  for m in (2, 3, 5):
    tx = mo.nash_mtl(num_tasks=m)
    tx_free = mo.nash_mtl(max_norm=0.0, num_tasks=m)
    for seed in range(2):
      j = P.normal_matrix(m, 7, seed=seed + 10 * m)
      d, state = P.aggregate(tx, j)
      np.testing.assert_allclose(d, nash_reference(j), rtol=1e-7, atol=1e-10)
      assert float(mo.diagnostics(state)["residual"]) <= 1e-10
      assert np.all(j @ d > 0)                          # g_iᵀd = c / w_i > 0
      # Unclipped: the exact root of Gw = 1/w, ‖d‖ = √m.
      d_free, _ = P.aggregate(tx_free, j)
      np.testing.assert_allclose(np.linalg.norm(d_free), np.sqrt(m), rtol=1e-9)
      # Invariant to a positive rescaling of each task.
      c = np.random.default_rng(seed).uniform(0.01, 100.0, m)
      d_scaled, _ = P.aggregate(tx, c[:, None] * j)
      np.testing.assert_allclose(d_scaled, d, rtol=1e-7, atol=1e-10)


def test_nash_mtl_symmetric_two_tasks_equal_weights(x64):
  """Gama & Grassi A.4: equal norms → equal weights."""
  j = np.array([[3.0, 4.0, 0.0], [0.0, 4.0, 3.0]])
  _, state = P.aggregate(mo.nash_mtl(num_tasks=2), j)
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(w[0], w[1], rtol=1e-12)


def test_nash_mtl_update_weights_every(x64):
  m, every = 3, 3
  tx = mo.nash_mtl(update_weights_every=every, num_tasks=m)
  params = {"w": jnp.zeros(5)}
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  mats = [P.normal_matrix(m, 5, seed=s) for s in range(5)]
  alpha = None
  for t, j in enumerate(mats):
    upd, state = step({"w": jnp.asarray(j)}, state)
    diag = mo.diagnostics(state)
    if t % every == 0:
      alpha = power_reference(j @ j.T)                 # recomputed (unclipped weights)
      assert bool(diag["updated"]) and int(diag["iterations"]) > 0
    else:
      assert not bool(diag["updated"]) and int(diag["iterations"]) == 0
    d_want = alpha @ j
    d_want = d_want / max(np.linalg.norm(d_want), 1.0)  # clipped with the current J
    np.testing.assert_allclose(upd["w"], d_want, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(state.inner.weights, alpha, rtol=1e-7)
  assert step._cache_size() == 1
  # The reported residual is that of the weights used, against the current J.
  res = np.abs(alpha * ((mats[-1] @ mats[-1].T) @ alpha) - 1).max()
  np.testing.assert_allclose(float(diag["residual"]), res, rtol=1e-6)


def test_nash_mtl_errors():
  with pytest.raises(ValueError, match="num_tasks"):
    mo.nash_mtl()
  with pytest.raises(ValueError, match="max_norm"):
    mo.nash_mtl(max_norm=-1.0, num_tasks=2)
  with pytest.raises(ValueError, match="update_weights_every"):
    mo.nash_mtl(update_weights_every=0, num_tasks=2)
  with pytest.raises(ValueError, match="optim_niter"):
    mo.nash_mtl(optim_niter=2.5, num_tasks=2)


# ---------------------------------------------------------------------------
# FairGrad.
# ---------------------------------------------------------------------------

def test_fairgrad_matches_scipy_and_scaling_law(x64):
  for alpha in (0.5, 1.0, 2.0, 5.0):
    tx = mo.fairgrad(alpha=alpha)
    for seed in range(2):
      j = P.normal_matrix(4, 7, seed=seed) * np.array([[1.0], [3.0], [0.2], [1.0]])
      d, state = P.aggregate(tx, j)
      w_ref = power_reference(j @ j.T, alpha)
      np.testing.assert_allclose(mo.task_weights(state), w_ref, rtol=1e-7)
      np.testing.assert_allclose(d, w_ref @ j, rtol=1e-7, atol=1e-10)
      # d(sJ) = s^{(1−α)/(1+α)} d(J).
      s = 37.0
      d_s, _ = P.aggregate(tx, s * j)
      np.testing.assert_allclose(d_s, s ** ((1 - alpha) / (1 + alpha)) * d, rtol=1e-7, atol=1e-10)


def test_fairgrad_alpha1_is_unclipped_nash(x64):
  j = P.normal_matrix(3, 6, seed=9)
  d_fair, _ = P.aggregate(mo.fairgrad(alpha=1.0), j)
  d_nash, _ = P.aggregate(mo.nash_mtl(max_norm=0.0, num_tasks=3), j)
  np.testing.assert_allclose(d_fair, d_nash, rtol=1e-10)


def test_fairgrad_errors():
  with pytest.raises(ValueError, match="alpha"):
    mo.fairgrad(alpha=0.0)
  with pytest.raises(ValueError, match="max_iters"):
    mo.fairgrad(max_iters=0)
