"""aligned_mtl, config, edm and the IMTL variants: references, properties, errors."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def imtl_g_ref(j):
  """IMTL-G with the paper's closed form α_{2..m} = g_1 Uᵀ(DUᵀ)⁻¹ (full-rank rows)."""
  u = j / np.linalg.norm(j, axis=1, keepdims=True)
  d_mat, u_mat = j[0] - j[1:], u[0] - u[1:]
  a = j[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
  return np.r_[1.0 - a.sum(), a]


# --- golden values (methods.md §D, TorchJD's published numbers) ----------------------

@pytest.mark.parametrize("factory,expected", [
    (mo.aligned_mtl, [0.2133, 0.9673, 0.9673]),
    (mo.config, [0.1588, 2.0706, 2.0706]),
    (mo.imtl, [0.0767, 1.0, 1.0]),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_golden_values(factory, expected, dtype, x64):
  d = P.assert_structure(factory(), J_GOLDEN, dtype=dtype)
  np.testing.assert_allclose(d, expected, atol=1e-4)


# --- agreement with the references on random problems --------------------------------

def test_aligned_mtl_matches_reference(x64):
  for scale_mode in ("min", "median", "rmse"):
    txs = {None: mo.aligned_mtl(scale_mode), "pref": mo.aligned_mtl(scale_mode, [0.5, 1.0, 2.0, 0.1])}
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
  tx, tx_pref = mo.config(), mo.config([1.0, 2.0, 0.5])
  for seed in range(3):
    j = P.normal_matrix(3, 6, seed=seed) * np.array([[1.0], [7.0], [0.2]])
    d, _ = P.aggregate(tx, j)
    np.testing.assert_allclose(d, config_ref(j), rtol=1e-8, atol=1e-10)
    cos = (j @ d) / np.linalg.norm(j, axis=1) / np.linalg.norm(d)
    np.testing.assert_allclose(cos, cos[0], rtol=1e-8)  # equal cosines for p = 1
    d, _ = P.aggregate(tx_pref, j)
    np.testing.assert_allclose(d, config_ref(j, [1.0, 2.0, 0.5]), rtol=1e-8, atol=1e-10)
  # m > n and rank-deficient: least-squares / minimum-norm solution.
  for _, j in [P.typical_matrices()[i] for i in (3, 4, 5, 8)]:
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
  for m, seed in [(2, 0), (3, 1), (4, 2), (4, 3)]:
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
  j = P.weak_stationary_matrix(3, 5)
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


# --- IMTL: G, L and hybrid ----------------------------------------------------------

def test_imtl_gradient_matches_paper_formula(x64):
  j = P.normal_matrix(4, 9, seed=8) * np.array([[1.0], [4.0], [0.3], [2.0]])
  _, state = P.aggregate(mo.imtl(), j)
  np.testing.assert_allclose(mo.task_weights(state), imtl_g_ref(j), rtol=1e-7)
  assert mo.aggregator_info(mo.imtl()).needs_losses is False


def _adam_ref(grads, lr, b1=0.9, b2=0.999, eps=1e-8, s0=0.0):
  """The s trajectory of a NumPy Adam (bias-corrected) fed with grads(s, k)."""
  s = np.full(3, s0)
  mu = nu = np.zeros(3)
  out = []
  for k in range(4):
    out.append(s.copy())
    g = grads(s, k)
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    mhat, vhat = mu / (1 - b1 ** (k + 1)), nu / (1 - b2 ** (k + 1))
    s = s - lr * mhat / (np.sqrt(vhat) + eps)
  return out


@pytest.mark.parametrize("variant", ["loss", "hybrid"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_imtl_loss_and_hybrid_match_reference(variant, optimizer, x64):
  """Four steps: weights, head weights and the loss-scale trajectory."""
  rng = np.random.default_rng(0)
  js = [P.normal_matrix(3, 6, seed=k) * np.array([[1.0], [3.0], [0.5]]) for k in range(4)]
  heads = [rng.standard_normal((3, 2)) for _ in range(4)]
  losses = [rng.uniform(0.2, 3.0, 3) for _ in range(4)]
  lr = 0.3
  tx = mo.imtl(variant, learning_rate=lr, optimizer=optimizer, init_log_scale=0.1,
               task_specific={"w": False, "h": True}, num_tasks=3)
  params = {"w": jnp.zeros(6), "h": jnp.zeros(2)}
  state = tx.init(params)
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))

  grad_s = lambda s, k: np.exp(s) * losses[k] - 1.0
  if optimizer == "adam":
    s_traj = _adam_ref(grad_s, lr, s0=0.1)
  else:
    s_traj, s = [], np.full(3, 0.1)
    for k in range(4):
      s_traj.append(s.copy())
      s = s - lr * grad_s(s, k)
  for k in range(4):
    upd, state = step({"w": jnp.asarray(js[k]), "h": jnp.asarray(heads[k])}, state,
                      jnp.asarray(losses[k]))
    scales = np.exp(s_traj[k])
    np.testing.assert_allclose(mo.diagnostics(state)["log_loss_scales"], s_traj[k], rtol=1e-10)
    if variant == "loss":
      w = scales
    else:
      w = imtl_g_ref(scales[:, None] * js[k]) * scales  # IMTL-G on the scaled gradients
    np.testing.assert_allclose(mo.task_weights(state), w, rtol=1e-7)
    np.testing.assert_allclose(upd["w"], w @ js[k], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(upd["h"], scales @ heads[k], rtol=1e-7)  # heads: e^{s_i}
  # The equilibrium of s is e^{s_i} L_i = 1 (every scaled loss equals one).
  tx = mo.imtl(variant, learning_rate=0.5, optimizer="sgd", num_tasks=3)
  state = tx.init({"w": jnp.zeros(6)})
  fixed = jnp.asarray([0.5, 2.0, 4.0])
  step = jax.jit(lambda s: tx.update({"w": jnp.asarray(js[0])}, s, None, losses=fixed)[1])
  for _ in range(300):
    state = step(state)
  np.testing.assert_allclose(np.exp(state.inner.log_scales) * fixed, 1.0, rtol=1e-6)


def test_imtl_heads_unweighted_on_request(x64):
  tx = mo.imtl("hybrid", num_tasks=2, weight_heads=False, task_specific={"w": False, "h": True})
  grads = {"w": jnp.asarray(J_GOLDEN), "h": jnp.ones((2, 3))}
  params = {"w": jnp.zeros(3), "h": jnp.zeros(3)}
  upd, _ = tx.update(grads, tx.init(params), params, losses=jnp.ones(2))
  np.testing.assert_allclose(upd["h"], [2.0, 2.0, 2.0])
  # IMTL-G's direction is invariant to the loss scales (full rank): hybrid ∥ IMTL-G.
  g_dir = P.aggregate(mo.imtl(), J_GOLDEN)[0]
  np.testing.assert_allclose(upd["w"] / np.linalg.norm(upd["w"]), g_dir / np.linalg.norm(g_dir),
                             rtol=1e-9)


def test_imtl_representation_facts():
  assert mo.aggregator_info(mo.imtl()).representation == "invalid"
  assert mo.aggregator_info(mo.imtl("loss", num_tasks=2)).representation == "exact"
  assert mo.aggregator_info(mo.imtl("hybrid", num_tasks=2)).representation == "invalid"
  assert mo.aggregator_info(mo.aligned_mtl()).representation == "variant"


# --- symmetric two-task case (Gama & Grassi, App. A.4) -------------------------------

@pytest.mark.parametrize("factory", [mo.imtl, mo.edm, lambda: mo.imtl("hybrid", num_tasks=2)])
def test_symmetric_two_tasks_equal_weights(factory, x64):
  _, state = P.aggregate(factory(), SYMMETRIC, losses=np.array([0.7, 0.7]))
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(w[0], w[1], rtol=1e-12)


# --- property suite (methods.md §D) --------------------------------------------------

FACTORIES = {
    "aligned_mtl": mo.aligned_mtl,
    "aligned_mtl_median": lambda: mo.aligned_mtl("median"),
    "aligned_mtl_rmse": lambda: mo.aligned_mtl("rmse"),
    "config": mo.config,
    "edm": mo.edm,
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_structure_weighted_permutation(name, dtype, x64):
  tx = FACTORIES[name]()  # one instance: each shape compiles once
  for _, matrix in P.scaled_matrices():
    P.assert_structure(tx, matrix, dtype=dtype)
  rtol = 1e-4 if dtype == jnp.float32 else 1e-6
  for _, matrix in P.typical_matrices():
    P.assert_structure(tx, matrix, dtype=dtype)
    P.assert_weighted(tx, matrix, dtype=dtype, rtol=rtol, atol=1e-6)
    deficient = np.linalg.matrix_rank(matrix) < matrix.shape[0]
    if dtype == jnp.float64 or not (deficient and name.startswith("aligned")):
      # A float32 rank-deficient Gram matrix has round-off eigenvalues around
      # λ_max·eps, some just above Aligned-MTL's cut-off λ_max·m·eps; σ = such
      # an eigenvalue makes w depend on round-off, which differs per task order.
      P.assert_permutation_invariant(tx, matrix, dtype=dtype, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_config_linear_under_scaling(dtype, x64):
  tx = mo.config()
  rtol = 1e-4 if dtype == jnp.float32 else 1e-7
  for _, matrix in P.typical_matrices()[:6]:
    P.assert_linear_under_scaling(tx, matrix, dtype=dtype, rtol=rtol)


def test_edm_non_conflicting(x64):
  """d = γ Σ α_i u_i is MGDA's direction on unit rows: u_iᵀd ≥ 0."""
  tx = mo.edm()
  for _, matrix in P.typical_matrices():
    P.assert_non_conflicting(tx, matrix, rtol=1e-7)


@pytest.mark.parametrize("variant", ["loss", "hybrid"])
def test_imtl_variants_properties(variant, x64):
  for _, matrix in P.typical_matrices()[:4]:
    m = matrix.shape[0]
    tx = mo.imtl(variant, num_tasks=m)
    losses = P.losses_for(m)
    P.assert_structure(tx, matrix, losses)
    P.assert_weighted(tx, matrix, losses)
    P.assert_permutation_invariant(tx, matrix, losses)
  for _, matrix in P.scaled_matrices():
    P.assert_structure(mo.imtl(variant, num_tasks=3), matrix, P.losses_for(3))


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_method(self):
    j = jnp.asarray(P.normal_matrix(4, 6, seed=3), jnp.float32)
    losses = jnp.asarray(P.losses_for(4), jnp.float32)
    for tx in [mo.aligned_mtl(), mo.aligned_mtl("median"), mo.aligned_mtl("rmse"), mo.config(),
               mo.edm(), mo.imtl("loss", num_tasks=4), mo.imtl("hybrid", num_tasks=4)]:
      params = {"w": jnp.zeros(6)}
      state = tx.init(params)
      upd = self.variant(lambda g, s, l, tx=tx: tx.update(g, s, params, losses=l))
      got, _ = upd({"w": j}, state, losses)
      want, _ = tx.update({"w": j}, state, params, losses=losses)
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
  with pytest.raises(ValueError, match="variant"):
    mo.imtl("both")
  with pytest.raises(ValueError, match="num_tasks"):
    mo.imtl("loss")
  with pytest.raises(ValueError, match="learning_rate"):
    mo.imtl("hybrid", learning_rate=-1.0, num_tasks=2)
  with pytest.raises(ValueError, match="optimizer"):
    mo.imtl("hybrid", optimizer="rmsprop", num_tasks=2)
  with pytest.raises(ValueError, match="init_log_scale"):
    mo.imtl("loss", init_log_scale=float("inf"), num_tasks=2)
  with pytest.raises(ValueError, match="losses="):
    P.aggregate(mo.imtl("loss", num_tasks=2), J_GOLDEN)
  # A custom optax optimizer is accepted.
  tx = mo.imtl("loss", optimizer=optax.sgd(0.1), num_tasks=2)
  P.aggregate(tx, J_GOLDEN, losses=np.ones(2))
