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
FAIR_ALPHAS = (0.5, 2.0, 5.0)
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
def problems(m):
  """Random problems of size m: Gram matrices (full rank, cone, rank 1, rank 2), QPs, bounds."""
  kinds = ["full", "cone", "rank1", "rank2"]
  grams = np.stack([_grams(m, k, s) for k in kinds for s in range(SEEDS)])
  qp_grams = np.stack([g / np.trace(g) + (1e-4 if i % 2 else 0.0) * np.eye(m)
                       for i, g in enumerate(grams)])
  lowers = np.random.default_rng(m).uniform(0.0, 1.0, (len(grams), m))
  nash_grams = grams[: 2 * SEEDS]  # full and cone: a root exists
  return dict(grams=grams, qp_grams=qp_grams, lowers=lowers, nash_grams=nash_grams)


def _embed(a, size):
  """A square matrix as the leading block of block-diag(a, I)."""
  out = np.eye(size)
  out[: len(a), : len(a)] = a
  return out


@functools.lru_cache(maxsize=None)
def padded_results():
  """The QP and Nash/FairGrad solvers on every size at once (one compilation).

  A problem of size m is embedded exactly as block-diag(problem, I) of size
  max(SIZES): the identity block is decoupled (QP: bound 0 → v = 0 there;
  Nash/FairGrad: unit orthogonal tasks → w = 1 there), so the leading block
  of the solution is the solution of the size-m problem, and every size
  shares one compiled solver.
  """
  big = max(SIZES)
  qps, lows, powers, alphas = [], [], [], []
  for m in SIZES:
    pr = problems(m)
    qps += [_embed(q, big) for q in pr["qp_grams"]]
    lows += [np.concatenate([u, np.zeros(big - m)]) for u in pr["lowers"]]
    for al in (1.0, *FAIR_ALPHAS):
      powers += [_embed(g, big) for g in pr["nash_grams"]]
      alphas += [al] * len(pr["nash_grams"])

  def run(qg, u, pg, a):
    # lax.map, not vmap: the solvers' loops compile once, unbatched (cheaper).
    qp = jax.lax.map(lambda x: linalg.lower_bounded_qp(*x), (qg, u))
    power = jax.lax.map(lambda x: linalg.nash_system(x[0], x[1], max_iters=30), (pg, a))
    return qp, power

  with _x64():
    args = [jnp.asarray(np.stack(x), jnp.float64) for x in (qps, lows, powers, alphas)]
    qp, power = jax.tree_util.tree_map(np.asarray, jax.jit(run)(*args))
  out, iq, ip = {}, 0, 0
  for m in SIZES:
    pr = problems(m)
    k = len(pr["qp_grams"])
    res = {"qp": linalg.SolverResult(qp.x[iq:iq + k, :m], qp.residual[iq:iq + k],
                                     qp.iterations[iq:iq + k])}
    assert np.all(qp.x[iq:iq + k, m:] == 0)               # the decoupled block
    iq += k
    k = len(pr["nash_grams"])
    for al in (1.0, *FAIR_ALPHAS):
      sol = linalg.SolverResult(power.x[ip:ip + k, :m], power.residual[ip:ip + k],
                                power.iterations[ip:ip + k])
      np.testing.assert_allclose(power.x[ip:ip + k, m:], 1.0, rtol=1e-9)
      res[al] = sol
      ip += k
    out[m] = res
  return out


@functools.lru_cache(maxsize=None)
def solver_results(m):
  """All solvers on the problems of size m (MGDA, CAGrad: one compilation per size)."""
  pr = problems(m)

  def run(g):
    return (jax.lax.map(linalg.min_norm_on_simplex, g),
            jax.lax.map(lambda x: cagrad_dual(x, 0.5), g))

  with _x64():
    mgda, cag = jax.tree_util.tree_map(np.asarray, jax.jit(run)(jnp.asarray(pr["grams"])))
  res = padded_results()[m]
  return dict(pr, qp=res["qp"], nash=res[1.0], fair={al: res[al] for al in FAIR_ALPHAS},
              mgda=mgda, cagrad=cag)


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
  """float32 solves agree with float64 references to the conditioning of the problem."""
  m = 9
  j = np.random.default_rng(3).standard_normal((m, 14))
  g = j @ j.T
  q = g / np.trace(g) + 1e-4 * np.eye(m)
  u = np.full(m, 1.0 / m)
  run = jax.jit(lambda q, u, g: (linalg.lower_bounded_qp(q, u).x, linalg.nash_system(g).x))
  v32, w32 = run(*(jnp.asarray(a, jnp.float32) for a in (q, u, g)))
  np.testing.assert_allclose(v32, qp_reference(q, u), rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(w32, power_reference(g), rtol=1e-4)


def test_nash_system_edge_cases(x64):
  """Zero rows get weight 0; without a positive root (Pareto-stationary) w = 0."""
  with_zero = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 3.0]])
  g1 = np.array([1.0, 2.0, -1.0])
  stationary = np.stack([g1, -2.0 * g1, [2.0, -1.0, 0.0]])   # g1 + g2/2 = 0: no root
  grams = jnp.asarray(np.stack([with_zero @ with_zero.T, stationary @ stationary.T]))
  sol = jax.jit(lambda g: jax.lax.map(linalg.nash_system, g))(grams)
  w = np.asarray(sol.x)
  assert w[0, 1] == 0.0 and np.all(w[0, [0, 2]] > 0)
  ref = power_reference((with_zero @ with_zero.T)[np.ix_([0, 2], [0, 2])])
  np.testing.assert_allclose(w[0, [0, 2]], ref, rtol=1e-8)
  assert float(sol.residual[0]) <= 1e-10
  np.testing.assert_array_equal(w[1], 0.0)
  assert float(sol.residual[1]) > 0.5                       # reported


def test_nash_system_never_returns_conflicting_weights(x64):
  """Many random gradients in R⁶ (nearly Pareto-stationary): the root, if any, is far.

  Found by the reliability suite: Newton ran out of steps at residual ~1e3 and the
  un-converged weights gave g_iᵀd < 0. Returned weights either solve the system
  to residual < 1/2, which implies (Gw)_i > 0 for every task, or are 0; without a
  root (0 in the hull of the unit rows, decided independently by an LP) they are 0.
  """
  kinds = set()
  for seed in range(12):
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((13, 6))
    unit = j / np.linalg.norm(j, axis=1, keepdims=True)
    in_hull = optimize.linprog(np.zeros(13), A_eq=np.vstack([unit.T, np.ones(13)]),
                               b_eq=np.r_[np.zeros(6), 1.0], bounds=[(0, None)] * 13).status == 0
    kinds.add(in_hull)
    g = jnp.asarray(j @ j.T)
    for max_iters in (5, 40):
      sol = linalg.nash_system(g, max_iters=max_iters)
      w = np.asarray(sol.x)
      assert np.all(np.isfinite(w))
      if in_hull or np.all(w == 0):
        np.testing.assert_array_equal(w, 0.0)
        assert float(sol.residual) > 0.5                    # reported
      else:
        assert float(sol.residual) <= 0.5
        assert np.all(j @ (w @ j) > 0)
  assert kinds == {True, False}                             # both kinds were exercised


# ---------------------------------------------------------------------------
# Shared transformation instances: P.aggregate compiles once per (instance,
# shape, dtype), so every test below reuses these on 4 × 6 matrices.
# ---------------------------------------------------------------------------

M, N = 4, 6
BUILDERS = {
    "upgrad": lambda: mo.upgrad(),
    "upgrad_exact": lambda: mo.upgrad(reg_eps=0.0),
    "dualproj": lambda: mo.dualproj(),
    "dualproj_exact": lambda: mo.dualproj(reg_eps=0.0),
    "nash_mtl": lambda: mo.nash_mtl(num_tasks=M),
    "fairgrad": lambda: mo.fairgrad(alpha=2.0),
}


@functools.lru_cache(maxsize=None)
def tx_of(name):
  return BUILDERS[name]()


# ---------------------------------------------------------------------------
# Golden values (TorchJD's published values, methods.md §D).
# ---------------------------------------------------------------------------

GOLDEN = [
    (lambda: mo.upgrad(), [0.2929, 1.9004, 1.9004]),
    (lambda: mo.dualproj(), [0.5563, 1.1109, 1.1109]),
    (lambda: mo.nash_mtl(num_tasks=2), [0.0542, 0.7061, 0.7061]),
]


@pytest.mark.parametrize("index", range(len(GOLDEN)))
def test_golden_values(index, x64):
  factory, expected = GOLDEN[index]
  tx = factory()
  for dtype in (jnp.float32, jnp.float64):
    d = P.assert_structure(tx, J_GOLDEN, dtype=dtype)
    np.testing.assert_allclose(d, expected, atol=1e-4)


# ---------------------------------------------------------------------------
# Property suite (methods.md §D), float32 and float64, jit and no-jit.
# ---------------------------------------------------------------------------

def families():
  """TorchJD-style input families, all 4 × 6 (one compilation per method and dtype)."""
  base = P.normal_matrix(M, N, seed=21)
  cases = [
      ("normal", base),
      ("rank1", P.normal_matrix(M, N, rank=1, seed=22)),
      ("rank2", P.normal_matrix(M, N, rank=2, seed=23)),
      ("zero", np.zeros((M, N))),
      ("strong_stationary", P.strong_stationary_matrix(M, N, seed=24)),
      ("weak_stationary", P.weak_stationary_matrix(M, N, seed=25)),
  ]
  return cases + [(f"scaled_{s:g}", base * s) for s in P.SCALES]


NON_CONFLICTING = {"upgrad_exact", "dualproj_exact", "nash_mtl"}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_properties(name, dtype, x64):
  tx = tx_of(name)
  rtol = 1e-4 if dtype == jnp.float32 else 1e-6
  for case, j in families():
    j = np.asarray(jnp.asarray(j, dtype), np.float64)   # the matrix the method sees
    P.assert_structure(tx, j, dtype=dtype)
    # Weighted: d = Jᵀw up to the round-off of the weighted sum (relative to |J|ᵀ|w|,
    # not to |d|: at Pareto-stationary points d is pure cancellation).
    d, state = P.aggregate(tx, j, dtype=dtype)
    w = np.asarray(mo.task_weights(state), np.float64)
    np.testing.assert_allclose(d, w @ j, rtol=rtol, atol=rtol * np.max(np.abs(w) @ np.abs(j)) + 1e-30)
    P.assert_permutation_invariant(tx, j, dtype=dtype, rtol=rtol, atol=rtol)
    if name in NON_CONFLICTING:
      P.assert_non_conflicting(tx, j, dtype=dtype, rtol=rtol)
    elif name in ("upgrad", "dualproj"):
      # reg_eps = 1e-4: g_iᵀd ≥ −reg_eps·tr(G)·w_i (up to round-off).
      bound = 1e-4 * np.sum(j * j) * np.abs(w) + rtol * np.abs(j).max() * np.abs(d).max() * N
      assert np.all(j @ d >= -bound), (case, j @ d, bound)
  if name == "upgrad_exact":
    for _, j in families()[:3]:
      P.assert_linear_under_scaling(tx, j, dtype=dtype, rtol=10 * rtol, atol=10 * rtol)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree(self):
    j = P.strong_stationary_matrix(M, N, seed=31) + 0.3 * P.normal_matrix(M, N, seed=32)
    for dtype in (jnp.float32, jnp.float64):
      with _x64():
        params = {"w": jnp.zeros(N, dtype)}
        for name in ("upgrad", "dualproj", "nash_mtl", "fairgrad"):
          tx = tx_of(name)
          want, _ = P.aggregate(tx, j, dtype=dtype)
          # The very function P.aggregate jits: the with_jit variant reuses its compilation.
          update = P._jitted(tx).__wrapped__  # pylint: disable=protected-access
          got, got_state = self.variant(update)({"w": jnp.asarray(j, dtype)}, tx.init(params),
                                                params, {})
          tol = 1e-4 if dtype == jnp.float32 else 1e-9
          np.testing.assert_allclose(got["w"], want, rtol=tol, atol=tol, err_msg=name)
          assert np.all(np.isfinite(np.asarray(mo.task_weights(got_state))))


# ---------------------------------------------------------------------------
# UPGrad and DualProj.
# ---------------------------------------------------------------------------

def test_upgrad_and_dualproj_match_scipy(x64):
  p = np.full(M, 1.0 / M)
  pref = [0.5, 0.1, 2.0, 0.0]
  cases = [("upgrad", np.diag(p), 1e-4), ("upgrad_exact", np.diag(p), 0.0),
           ("dualproj", p[None], 1e-4), ("dualproj_exact", p[None], 0.0)]
  for seed in range(3):
    j = P.normal_matrix(M, N, seed=seed) * np.array([[1.0], [3.0], [0.3], [10.0]])
    for name, lowers, reg in cases:
      d, state = P.aggregate(tx_of(name), j)
      w = dual_cone_reference(j, lowers, reg)
      np.testing.assert_allclose(d, w @ j, rtol=1e-7, atol=1e-9 * np.abs(j).max(), err_msg=name)
      np.testing.assert_allclose(mo.task_weights(state), w, rtol=1e-6, atol=1e-9, err_msg=name)
      assert float(mo.diagnostics(state)["residual"]) <= 1e-10
  # A custom preference vector (one zero preference).
  j = P.normal_matrix(M, N, seed=7)
  d, _ = P.aggregate(mo.upgrad(pref), j)
  np.testing.assert_allclose(d, dual_cone_reference(j, np.diag(pref), 1e-4) @ j, rtol=1e-7,
                             atol=1e-12)


def test_non_conflicting_for_disparate_task_scales(x64):  # x64: shares compilations
  """J d ≥ 0 on unit rows when task gradients differ by 1e±20 (float32, Gram form).

  The methods work on the cosine matrix and the row norms, so the property
  holds to float32 round-off relative to ‖d‖ for generic gradients; with
  exactly opposite gradients (a Pareto-stationary pair) d is at the noise level
  of a Gram-based solver, ~√(m·eps)·max‖g_i‖·Σ|w_i| (as in test_reliability).
  """
  rng = np.random.default_rng(0)
  scales = np.array([1e-20, 1.0, 1e10, 1e20])[:, None]
  generic = rng.standard_normal((M, N))
  generic[3] = -generic[1] + 0.3 * rng.standard_normal(N)   # strongly conflicting, not opposite
  opposite = generic.copy()
  opposite[3] = -0.5 * generic[1]
  for name in ("upgrad_exact", "dualproj_exact", "nash_mtl"):
    for kind, base_j in (("generic", generic), ("opposite", opposite)):
      j = base_j * scales
      d, state = P.aggregate(tx_of(name), j, dtype=jnp.float32)
      w = np.asarray(mo.task_weights(state), np.float64)
      assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))
      norms = np.linalg.norm(j, axis=1)
      unit = j / norms[:, None]
      noise = 0.0 if kind == "generic" else (
          10 * np.sqrt(M * np.finfo(np.float32).eps) * norms.max() * max(np.abs(w).sum(), 1.0))
      assert np.all(unit @ d >= -(1e-4 * np.linalg.norm(d) + noise)), (name, kind, unit @ d)


def test_dualproj_keeps_a_non_conflicting_mean(x64):
  """If the mean is already in the dual cone, both projections are the identity."""
  j = np.random.default_rng(1).uniform(0.1, 1.0, (M, N))   # pairwise non-conflicting
  for name in ("dualproj_exact", "upgrad_exact"):
    d, state = P.aggregate(tx_of(name), j)
    np.testing.assert_allclose(d, j.mean(0), rtol=1e-12)
    np.testing.assert_allclose(mo.task_weights(state), np.full(M, 1 / M), rtol=1e-12)


def test_norm_eps_fallback_to_preferences(x64):
  j = P.normal_matrix(M, N, seed=4)
  j[3] = -2.0 * j[0] + 0.5 * j[1]                      # conflicts: the projections are not p
  j = j * 5e-4 / np.linalg.norm(j)                     # ‖J‖_F² = 2.5e-7 < 1e-4
  for name, factory in (("upgrad", mo.upgrad), ("dualproj", mo.dualproj)):
    _, state = P.aggregate(factory(norm_eps=1e-4), j)   # TorchJD's behaviour: the mean
    np.testing.assert_allclose(mo.task_weights(state), np.full(M, 1 / M), rtol=1e-12)
    tx = tx_of(name)                                    # default: a genuine projection,
    _, state = P.aggregate(tx, j)                       # whose weights do not depend on
    w_small = np.asarray(mo.task_weights(state))        # a common scale of J
    assert np.abs(w_small - 1 / M).max() > 0.01
    _, state = P.aggregate(tx, j * 2e3)
    np.testing.assert_allclose(w_small, np.asarray(mo.task_weights(state)), rtol=1e-9)
    _, state = P.aggregate(tx, np.zeros((M, N)))         # all zero: the preferences
    np.testing.assert_allclose(mo.task_weights(state), np.full(M, 1 / M), rtol=1e-12)


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
      factory(pref_vector=[1.0, 2.0]).update({"w": jnp.ones((3, 4))},
                                             factory(pref_vector=[1.0, 2.0]).init({"w": jnp.ones(4)}))
    with pytest.raises(ValueError, match="max_iters"):
      factory(max_iters=0)


# ---------------------------------------------------------------------------
# Nash-MTL.
# ---------------------------------------------------------------------------

def test_nash_mtl_matches_scipy_and_is_scale_invariant(x64):
  tx = tx_of("nash_mtl")
  tx_free = mo.nash_mtl(max_norm=0.0, num_tasks=M)
  for seed in range(3):
    j = P.normal_matrix(M, N, seed=seed + 40)
    d, state = P.aggregate(tx, j)
    np.testing.assert_allclose(d, nash_reference(j), rtol=1e-7, atol=1e-10)
    assert float(mo.diagnostics(state)["residual"]) <= 1e-10
    assert np.all(j @ d > 0)                            # g_iᵀd ∝ 1 / w_i > 0
    d_free, _ = P.aggregate(tx_free, j)                 # unclipped: the root, ‖d‖ = √m
    np.testing.assert_allclose(d_free, nash_reference(j, max_norm=0.0), rtol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(d_free), np.sqrt(M), rtol=1e-9)
    c = np.random.default_rng(seed).uniform(0.01, 100.0, M)
    d_scaled, _ = P.aggregate(tx, c[:, None] * j)       # invariant to per-task scales
    np.testing.assert_allclose(d_scaled, d, rtol=1e-7, atol=1e-10)


def test_nash_mtl_symmetric_two_tasks_equal_weights(x64):
  """Gama & Grassi A.4: equal norms → equal weights."""
  j = np.array([[3.0, 4.0, 0.0], [0.0, 4.0, 3.0]])
  _, state = P.aggregate(mo.nash_mtl(num_tasks=2), j)
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(w[0], w[1], rtol=1e-12)


def test_nash_mtl_update_weights_every(x64):
  every = 3
  tx = mo.nash_mtl(update_weights_every=every, num_tasks=M)
  params = {"w": jnp.zeros(N)}
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  mats = [P.normal_matrix(M, N, seed=s) for s in range(5)]
  alpha = None
  for t, j in enumerate(mats):
    upd, state = step({"w": jnp.asarray(j)}, state)
    diag = mo.diagnostics(state)
    if t % every == 0:
      alpha = power_reference(j @ j.T)                  # recomputed (unclipped weights)
      assert bool(diag["updated"]) and int(diag["iterations"]) > 0
    else:
      assert not bool(diag["updated"]) and int(diag["iterations"]) == 0
    d_want = alpha @ j
    d_want = d_want / max(np.linalg.norm(d_want), 1.0)   # clipped with the current J
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
  alpha = 2.0
  tx = tx_of("fairgrad")
  for seed in range(3):
    j = P.normal_matrix(M, N, seed=seed) * np.array([[1.0], [3.0], [0.2], [1.0]])
    d, state = P.aggregate(tx, j)
    w_ref = power_reference(j @ j.T, alpha)
    np.testing.assert_allclose(mo.task_weights(state), w_ref, rtol=1e-7)
    np.testing.assert_allclose(d, w_ref @ j, rtol=1e-7, atol=1e-10)
    s = 37.0                                            # d(sJ) = s^{(1−α)/(1+α)} d(J)
    d_s, _ = P.aggregate(tx, s * j)
    np.testing.assert_allclose(d_s, s ** ((1 - alpha) / (1 + alpha)) * d, rtol=1e-7, atol=1e-10)


def test_fairgrad_alpha1_is_unclipped_nash(x64):
  j = P.normal_matrix(M, N, seed=9)
  d_fair, _ = P.aggregate(mo.fairgrad(alpha=1.0), j)
  np.testing.assert_allclose(d_fair, nash_reference(j, max_norm=0.0), rtol=1e-8)


def test_fairgrad_errors():
  with pytest.raises(ValueError, match="alpha"):
    mo.fairgrad(alpha=0.0)
  with pytest.raises(ValueError, match="max_iters"):
    mo.fairgrad(max_iters=0)


def test_nash_mtl_weighted_heads_get_unclipped_weights(x64):
  """weight_heads=True: heads get α_i g_i, only the shared update is clipped (authors, LibMTL).

  Reference (NumPy/SciPy, LibMTL's Nash_MTL.backward): α solves Gα = 1/α on the shared
  rows; Σ α_i L_i is back-propagated, so head i gets α_i g_i^head, then the shared
  gradient Jᵀα is clipped to max_norm.
  """
  rng = np.random.default_rng(7)
  m, n_shared, n_head = 3, 5, 4
  j = rng.standard_normal((m, n_shared)) + 1.0       # norms ≫ 1: the clip is active
  heads = np.zeros((m, m, n_head))                     # head i touched by task i only
  for i in range(m):
    heads[i, i] = rng.standard_normal(n_head)
  grads = {"trunk": jnp.asarray(j), "heads": jnp.asarray(heads)}
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
  alpha = power_reference(j @ j.T)
  assert np.linalg.norm(alpha @ j) > 1.5               # clipping matters here
  tx = mo.nash_mtl(num_tasks=m, task_specific={"trunk": False, "heads": True},
                   weight_heads=True)
  upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(upd["trunk"], nash_reference(j), rtol=1e-6, atol=1e-9)
  want_heads = np.einsum("i,ihk->hk", alpha, heads)
  np.testing.assert_allclose(upd["heads"], want_heads, rtol=1e-6, atol=1e-9)
  # The default: each head its own unweighted gradient.
  tx = mo.nash_mtl(num_tasks=m, task_specific={"trunk": False, "heads": True})
  upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(upd["heads"], heads.sum(0), rtol=1e-12)
