"""aligned_mtl, config and edm: references, properties, errors (IMTL: test_imtl_variants.py)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from tests import properties as P

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
SYMMETRIC = np.array([[3.0, 4.0, 0.0, 1.0], [0.0, 4.0, 3.0, -1.0]])  # equal norms


# --- independent NumPy references ----------------------------------------------------

def aligned_mtl_ref(j, scale_mode="min", pref=None):
  """Algorithm 1 of Senushkin et al. on the rows of j (float64 NumPy)."""
  m = j.shape[0]
  g = j @ j.T
  lam, v = np.linalg.eigh(g)
  keep = lam > lam.max() * m * np.finfo(np.float64).eps
  if not keep.any():
    b = np.eye(m)
  else:
    lk, vk = lam[keep], v[:, keep]
    kept_sorted = np.sort(lk)
    sigma = {"min": kept_sorted[0], "median": kept_sorted[(len(lk) - 1) // 2],
             "rmse": lk.mean()}[scale_mode]
    b = np.sqrt(sigma) * vk @ np.diag(lk ** -0.5) @ vk.T
  p = np.full(m, 1.0 / m) if pref is None else np.asarray(pref, float)
  return (b @ p) @ j


def config_ref(j, pref=None):
  """ConFIG from the unit-row matrix itself (pinv of the m×n matrix, as TorchJD)."""
  norms = np.linalg.norm(j, axis=1, keepdims=True)
  units = np.divide(j, norms, out=np.zeros_like(j), where=norms > 0)
  p = np.ones(j.shape[0]) if pref is None else np.asarray(pref, float)
  best = np.linalg.pinv(units) @ p
  norm = np.linalg.norm(best)
  if norm < 1e-12 * np.sqrt(j.shape[0]):  # torch.nn.functional.normalize's eps: d = 0
    return np.zeros(j.shape[1])
  unit = best / norm
  return np.sum(j @ unit) * unit


def min_norm_ref(g):
  """argmin_{w∈Δ} wᵀGw by enumerating supports (exact; small m only)."""
  m = g.shape[0]
  best, best_val = None, np.inf
  for k in range(1, m + 1):
    for supp in itertools.combinations(range(m), k):
      s = list(supp)
      kkt = np.zeros((k + 1, k + 1))
      kkt[:k, :k] = g[np.ix_(s, s)]
      kkt[:k, k] = kkt[k, :k] = 1.0
      sol = np.linalg.lstsq(kkt, np.r_[np.zeros(k), 1.0], rcond=None)[0]
      w = np.zeros(m)
      w[s] = sol[:k]
      if np.all(w >= -1e-12) and w @ g @ w < best_val - 1e-15:
        best, best_val = np.maximum(w, 0) / np.maximum(w, 0).sum(), w @ g @ w
  return best


def edm_ref(j):
  """Katrutsa et al.'s EDM: min-norm α on unit rows, γ = 1/Σ α_i/‖g_i‖."""
  norms = np.linalg.norm(j, axis=1)
  u = j / norms[:, None]
  alpha = min_norm_ref(u @ u.T)
  gamma = 1.0 / np.sum(alpha / norms)
  return gamma * alpha @ u, gamma * alpha / norms


# --- golden values (methods.md §D, TorchJD's published numbers) ----------------------

@pytest.mark.parametrize("factory,expected", [
    (mo.aligned_mtl, [0.2133, 0.9673, 0.9673]),
    (mo.config, [0.1588, 2.0706, 2.0706]),
])  # IMTL-G's [0.0767, 1, 1] is in test_foundation_methods.py
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_golden_values(factory, expected, dtype, x64):
  d = P.assert_structure(factory(), J_GOLDEN, dtype=dtype)
  np.testing.assert_allclose(d, expected, atol=1e-4)


# --- agreement with the references on random problems --------------------------------

def test_aligned_mtl_matches_reference(x64):
  for scale_mode in ("min", "median", "rmse"):
    txs = {None: mo.aligned_mtl(scale_mode)}
    if scale_mode == "min":
      txs["pref"] = mo.aligned_mtl(scale_mode, [0.5, 1.0, 2.0, 0.1])
    for seed, rank in [(0, None), (1, 2), (2, 3)]:
      j = P.normal_matrix(4, 7, rank=rank, seed=seed) * np.array([[1.0], [3.0], [0.5], [2.0]])
      for key, tx in txs.items():
        pref = None if key is None else [0.5, 1.0, 2.0, 0.1]
        d, state = P.aggregate(tx, j)
        np.testing.assert_allclose(d, aligned_mtl_ref(j, scale_mode, pref), rtol=1e-7, atol=1e-9)
        assert int(mo.diagnostics(state)["rank"]) == np.linalg.matrix_rank(j)


def test_aligned_mtl_aligns_the_gradients(x64):
  """The rows of BJ are orthogonal with equal norms √σ (condition number 1)."""
  from mtl_optax._src.methods.aligned_mtl import balance_transformation
  j = P.normal_matrix(5, 8, seed=3) * np.array([[1.0], [10.0], [0.1], [2.0], [1.0]])
  g = j @ j.T
  for mode in ("min", "median", "rmse"):
    b, rank, cond = balance_transformation(jnp.asarray(g), mode)
    b = np.asarray(b)
    aligned = b @ j
    gram = aligned @ aligned.T
    np.testing.assert_allclose(gram, gram[0, 0] * np.eye(5), atol=1e-8 * gram[0, 0])
    lam = np.linalg.eigvalsh(g)
    sigma = {"min": lam[0], "median": lam[2], "rmse": lam.mean()}[mode]
    np.testing.assert_allclose(gram[0, 0], sigma, rtol=1e-8)
    assert int(rank) == 5
    np.testing.assert_allclose(float(cond), lam[-1] / lam[0], rtol=1e-8)
  # No eigenvalue kept (J = 0): B = I, so w = p and d = 0.
  d, state = P.aggregate(mo.aligned_mtl(), np.zeros((3, 4)))
  np.testing.assert_array_equal(d, 0.0)
  np.testing.assert_allclose(mo.task_weights(state), np.full(3, 1 / 3))


def test_config_matches_reference_and_has_equal_cosines(x64):
  tx, tx_pref = mo.config(), mo.config([1.0, 2.0, 0.5, 1.5])
  for seed in range(3):
    j = P.normal_matrix(4, 6, seed=seed) * np.array([[1.0], [7.0], [0.2], [2.0]])
    d, _ = P.aggregate(tx, j)
    np.testing.assert_allclose(d, config_ref(j), rtol=1e-8, atol=1e-10)
    cos = (j @ d) / np.linalg.norm(j, axis=1) / np.linalg.norm(d)
    np.testing.assert_allclose(cos, cos[0], rtol=1e-8)  # equal cosines for p = 1
    d, _ = P.aggregate(tx_pref, j)
    np.testing.assert_allclose(d, config_ref(j, [1.0, 2.0, 0.5, 1.5]), rtol=1e-8, atol=1e-10)
  # m > n and rank-deficient: least-squares / minimum-norm solution.
  for _, j in [families()[i] for i in (1, 2, 5, 6)]:
    np.testing.assert_allclose(P.aggregate(tx, j)[0], config_ref(j), rtol=1e-6, atol=1e-8)


def test_config_rows_of_wildly_different_norms():
  """float32, rows scaled by 1e±30: the update is still the exact one."""
  j = P.normal_matrix(3, 5, seed=4)
  scaled = j * np.array([[1e-30], [1.0], [1e30]])
  d, _ = P.aggregate(mo.config(), scaled, dtype=jnp.float32)
  ref = config_ref(scaled)
  np.testing.assert_allclose(d, ref, rtol=2e-4, atol=0)


def test_edm_matches_reference_and_bisector(x64):
  tx = mo.edm()
  for m, seed in [(2, 0), (4, 2), (4, 3)]:
    j = P.normal_matrix(m, 6, seed=seed) * np.linspace(0.3, 3.0, m)[:, None]
    d, state = P.aggregate(tx, j)
    d_ref, w_ref = edm_ref(j)
    np.testing.assert_allclose(d, d_ref, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(mo.task_weights(state), w_ref, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(np.sum(w_ref), 1.0)
    if m == 2:  # the bisector (1/‖g_1‖ + 1/‖g_2‖)⁻¹ (u_1 + u_2)
      n = np.linalg.norm(j, axis=1)
      np.testing.assert_allclose(d, (j[0] / n[0] + j[1] / n[1]) / (1 / n[0] + 1 / n[1]),
                                 rtol=1e-9)
  # A zero gradient: no shared update (as the reference code).
  j = P.weak_stationary_matrix(4, 6)
  d, state = P.aggregate(tx, j)
  np.testing.assert_array_equal(d, 0.0)
  np.testing.assert_array_equal(mo.task_weights(state), 0.0)


def test_edm_per_row_scales_float32():
  j = P.normal_matrix(3, 5, seed=6)
  scaled = j * np.array([[1e-30], [1.0], [1e28]])
  d, state = P.aggregate(mo.edm(), scaled, dtype=jnp.float32)
  d_ref, w_ref = edm_ref(scaled)
  np.testing.assert_allclose(d, d_ref, rtol=1e-4)
  np.testing.assert_allclose(mo.task_weights(state), w_ref, rtol=1e-4, atol=1e-35)


# --- symmetric two-task case (Gama & Grassi, App. A.4) -------------------------------

def test_edm_symmetric_two_tasks_equal_weights(x64):
  _, state = P.aggregate(mo.edm(), SYMMETRIC)
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(w[0], w[1], rtol=1e-12)


# --- property suite (methods.md §D) --------------------------------------------------

def families():
  """TorchJD's input families in two shapes (4×6 and m > n), so each compiles once."""
  return [
      ("normal", P.normal_matrix(4, 6, seed=1)),
      ("rank1", P.normal_matrix(4, 6, rank=1, seed=4)),
      ("rank2", P.normal_matrix(4, 6, rank=2, seed=5)),
      ("zero", np.zeros((4, 6))),
      ("strong_stationary", P.strong_stationary_matrix(4, 6, seed=7)),
      ("weak_stationary", P.weak_stationary_matrix(4, 6, seed=8)),
      ("wide_m_gt_n", P.normal_matrix(7, 3, seed=6)),
  ] + P.scaled_matrices(P.normal_matrix(4, 6, seed=11))


FACTORIES = {
    "aligned_mtl": mo.aligned_mtl,
    "aligned_mtl_median": lambda: mo.aligned_mtl("median"),
    "aligned_mtl_rmse": lambda: mo.aligned_mtl("rmse"),
    "config": mo.config,
    "edm": mo.edm,
}
CASES = [(name, dtype) for name in sorted(FACTORIES) for dtype in (jnp.float32, jnp.float64)
         if dtype == jnp.float64 or name in ("aligned_mtl", "config", "edm")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_properties(name, dtype, x64):
  """Structure, weighted, permutation invariance (all); linear under scaling
  (ConFIG); non-conflicting (EDM: MGDA's direction on unit rows, u_iᵀd ≥ 0)."""
  tx = FACTORIES[name]()  # one instance: each shape compiles once
  rtol = 1e-4 if dtype == jnp.float32 else 1e-6
  for case, matrix in families():
    P.assert_structure(tx, matrix, dtype=dtype)
    P.assert_weighted(tx, matrix, dtype=dtype, rtol=rtol, atol=1e-6)
    if case.startswith("scaled"):
      continue
    if name == "config":
      P.assert_linear_under_scaling(tx, matrix, dtype=dtype, rtol=rtol / 10)
    if name == "edm":
      P.assert_non_conflicting(tx, matrix, dtype=dtype, rtol=rtol / 10)
    deficient = np.linalg.matrix_rank(matrix) < matrix.shape[0]
    if not (dtype == jnp.float32 and deficient and name.startswith("aligned")):
      # A float32 rank-deficient Gram matrix has round-off eigenvalues around
      # λ_max·eps, some just above Aligned-MTL's cut-off λ_max·m·eps; σ = such
      # an eigenvalue makes w depend on round-off, which differs per task order.
      P.assert_permutation_invariant(tx, matrix, dtype=dtype, rtol=rtol, atol=1e-6)
  if name in ("aligned_mtl", "config", "edm"):  # the jitted update is cached: eager run only
    P.assert_jit_equal(tx, families()[0][1], dtype=dtype, rtol=rtol)

class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_aligned_median(self):
    # aligned_mtl (min), config and edm: P.assert_jit_equal in test_properties
    # (both dtypes); the IMTL variants: test_imtl_variants.py.
    j = jnp.asarray(P.normal_matrix(4, 6, seed=3), jnp.float32)
    tx = mo.aligned_mtl("median")
    params = {"w": jnp.zeros(6)}
    state = tx.init(params)
    got, _ = self.variant(lambda g, s: tx.update(g, s, params))({"w": j}, state)
    want, _ = tx.update({"w": j}, state, params)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)


# --- errors -------------------------------------------------------------------------

def test_errors():
  with pytest.raises(ValueError, match="scale_mode"):
    mo.aligned_mtl("max")
  with pytest.raises(ValueError, match="pref_vector"):
    mo.aligned_mtl(pref_vector=[1.0, 2.0], num_tasks=3)
  with pytest.raises(ValueError, match="pref_vector"):
    mo.config(pref_vector=[[1.0]])
  with pytest.raises(ValueError, match="pref_vector"):
    mo.config(pref_vector=[1.0, float("nan")])
  with pytest.raises(ValueError, match="pref_vector has 2 entries"):
    P.aggregate(mo.config([1.0, 2.0]), np.ones((3, 4)))
  with pytest.raises(ValueError, match="tol"):
    mo.edm(tol=0.0)
  with pytest.raises(ValueError, match="max_iters"):
    mo.edm(max_iters=0)
