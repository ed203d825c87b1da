"""sum, mean, linear_scalarization, mgda, pcgrad, cagrad, imtl: values and properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mtl_optax as mo
from tests import properties as P

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])

GOLDEN = [  # TorchJD's published values (methods.md §D).
    (lambda: mo.mean(), [1.0, 1.0, 1.0]),
    (lambda: mo.sum(), [2.0, 2.0, 2.0]),
    (lambda: mo.mgda(), [0.0, 1.0, 1.0]),
    (lambda: mo.pcgrad(), [0.5848, 3.8012, 3.8012]),
    (lambda: mo.imtl(), [0.0767, 1.0, 1.0]),
    (lambda: mo.cagrad(c=0.5, rescale=0), [0.1835, 1.2041, 1.2041]),
]


@pytest.mark.parametrize("factory,expected", GOLDEN)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_golden_values(factory, expected, dtype, x64):
  d = P.assert_structure(factory(), J_GOLDEN, dtype=dtype)
  np.testing.assert_allclose(d, expected, atol=1e-4)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_foundation_method(self):
    j = jnp.asarray(P.normal_matrix(4, 6, seed=3), jnp.float32)
    losses = jnp.asarray(P.losses_for(4))
    for tx in [mo.sum(), mo.mean(), mo.linear_scalarization([1.0, 2.0, 0.5, 0.0]),
               mo.mgda(), mo.mgda("loss+"), mo.pcgrad(seed=3), mo.cagrad(), mo.imtl()]:
      params = {"w": jnp.zeros(6)}
      state = tx.init(params)
      upd = self.variant(lambda g, s, l, tx=tx: tx.update(g, s, params, losses=l))
      got, _ = upd({"w": j}, state, losses)
      want, _ = tx.update({"w": j}, state, params, losses=losses)
      np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)


def test_fixed_weightings_are_exact():
  j = P.normal_matrix(3, 5, seed=0)
  for tx, w in [(mo.sum(), [1, 1, 1]), (mo.mean(), [1 / 3] * 3),
                (mo.linear_scalarization([0.2, 0.0, 3.0]), [0.2, 0.0, 3.0])]:
    w_got = P.assert_weighted(tx, j)
    np.testing.assert_allclose(w_got, w, rtol=1e-7)
    np.testing.assert_allclose(P.aggregate(tx, j)[0], np.asarray(w) @ j, rtol=1e-6, atol=1e-6)


# --- properties (methods.md §D) -------------------------------------------------

ALL = {
    "mean": mo.mean, "sum": mo.sum, "mgda": mo.mgda, "pcgrad": mo.pcgrad,
    "cagrad": mo.cagrad, "imtl": mo.imtl,
    "linear_scalarization": lambda: mo.linear_scalarization([0.5, 1.0, 2.0]),
}
DETERMINISTIC = ["mean", "sum", "mgda", "cagrad", "imtl"]


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_structure_under_scaling(name, dtype, x64):
  tx = ALL[name]()  # one instance: the six scales share one compilation
  for _, matrix in P.scaled_matrices():
    P.assert_structure(tx, matrix, dtype=dtype)


@pytest.mark.parametrize("name", sorted(set(ALL) - {"linear_scalarization"}))
def test_structure_weighted_permutation(name, x64):
  tx = ALL[name]()  # one instance per method: each shape compiles once
  for _, matrix in P.typical_matrices():
    P.assert_structure(tx, matrix)
    P.assert_weighted(tx, matrix)
    if name in DETERMINISTIC:
      P.assert_permutation_invariant(tx, matrix, rtol=1e-5)


@pytest.mark.parametrize("factory", [mo.mgda, lambda: mo.cagrad(c=1.0), lambda: mo.cagrad(c=2.0)])
def test_non_conflicting(factory, x64):
  tx = factory()
  for _, matrix in P.typical_matrices():
    P.assert_non_conflicting(tx, matrix, rtol=1e-6)


@pytest.mark.parametrize("name", ["mean", "sum", "pcgrad"])
def test_linear_under_scaling(name, x64):
  tx = ALL[name]()
  for _, matrix in P.typical_matrices()[:6]:
    P.assert_linear_under_scaling(tx, matrix)


# --- MGDA -----------------------------------------------------------------------

@pytest.mark.parametrize("m", [2, 3, 5, 9, 20, 50])
@pytest.mark.parametrize("rank", [None, 1, 2])
def test_mgda_kkt(m, rank, x64):
  for seed in range(3):
    j = P.normal_matrix(m, 30, rank=rank, seed=seed)
    g = j @ j.T
    res = jax.jit(mo.linalg.min_norm_on_simplex)(jnp.asarray(g))
    w = np.asarray(res.x)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    gw = g @ w
    tol = 1e-5 * np.abs(g).max()
    assert np.all(gw >= w @ gw - tol), (gw, w @ gw)              # (Gw)_i ≥ wᵀGw
    assert np.all(np.abs(gw[w > 1e-9] - w @ gw) <= tol)         # equality on the support


def test_mgda_normalisations_match_reference(x64):
  j = P.normal_matrix(4, 7, seed=1) * np.array([[1.0], [10.0], [0.1], [3.0]])
  losses = np.array([0.5, 2.0, 1.5, 0.25])
  norms = np.linalg.norm(j, axis=1)
  for kind, n in [("none", np.ones(4)), ("l2", norms), ("loss", losses), ("loss+", losses * norms)]:
    jn = j / n[:, None]
    ref = optimize.minimize(lambda a: np.sum((a @ jn) ** 2), np.full(4, 0.25),
                            bounds=[(0, 1)] * 4, constraints={"type": "eq", "fun": lambda a: a.sum() - 1},
                            method="SLSQP", options={"ftol": 1e-14, "maxiter": 500}).x
    d, _ = P.aggregate(mo.mgda(kind), j, losses)
    np.testing.assert_allclose(d, ref @ jn, rtol=1e-4, atol=1e-6)


def test_mgda_resolves_tiny_normalised_rows(x64):
  """Collinear rows, opposite pair, losses 4e2 … 1e-3 ("loss+"): 0 is in the hull.

  Found by the reliability suite: with a fixed multiplier tolerance of 1e-9 the
  active set stopped at a vertex (‖d‖ = 2e-3); float64 now resolves d to round-off.
  """
  v = P.normal_matrix(1, 6, seed=3)[0]
  j = np.stack([0.0132 * v, -0.0139 * v, 0.067 * v])
  losses = np.array([407.8, 78.5, 1.04e-3])
  d, state = P.aggregate(mo.mgda("loss+"), j, losses)
  assert np.linalg.norm(d) <= 1e-8 * np.linalg.norm(j[2]) / losses[2]
  assert np.all(np.asarray(mo.task_weights(state)) >= 0)


def test_mgda_loss_normalisation_needs_losses():
  with pytest.raises(ValueError, match="losses="):
    P.aggregate(mo.mgda("loss"), P.normal_matrix(2, 3))
  with pytest.raises(ValueError, match="normalization"):
    mo.mgda("max")


# --- CAGrad against the paper's dual solved by scipy -------------------------------

def cagrad_reference(j, c, rescale):
  m = j.shape[0]
  g = j @ j.T
  b = np.full(m, 1 / m)
  g0 = b @ j
  phi = c**2 * (g0 @ g0)

  def objective(w):
    return w @ g @ b + np.sqrt(phi) * np.sqrt(max(w @ g @ w, 1e-30))

  best = None
  for start in [b, np.eye(m)[0] * 0.9 + 0.1 / m]:
    r = optimize.minimize(objective, start, bounds=[(0, 1)] * m, method="SLSQP",
                          constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                          options={"ftol": 1e-14, "maxiter": 1000})
    if best is None or r.fun < best.fun:
      best = r
  gw = best.x @ j
  d = g0 + np.sqrt(phi) / np.linalg.norm(gw) * gw
  return d / {0: 1, 1: 1 + c**2, 2: 1 + c}[rescale], best.fun


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_cagrad_matches_scipy_dual(m, x64):
  for c in (0.2, 0.5, 1.0):
    # Every c and m without rescaling; the two rescalings (a final division) once.
    rescales = (0, 1, 2) if (m, c) == (3, 0.5) else (0,)
    txs = {r: mo.cagrad(c=c, rescale=r) for r in rescales}
    for seed in range(2):
      j = P.normal_matrix(m, 10, seed=seed + 10 * m)
      ref, _ = cagrad_reference(j, c, 0)
      for rescale, tx in txs.items():
        d, _ = P.aggregate(tx, j)
        want = ref / {0: 1, 1: 1 + c**2, 2: 1 + c}[rescale]
        np.testing.assert_allclose(d, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_cagrad_c0_is_mean_and_errors(x64):
  j = P.normal_matrix(3, 4)
  np.testing.assert_allclose(P.aggregate(mo.cagrad(c=0.0), j)[0], j.mean(0), rtol=1e-7)
  with pytest.raises(ValueError, match="c must"):
    mo.cagrad(c=-0.1)
  with pytest.raises(ValueError, match="rescale"):
    mo.cagrad(rescale=3)


# --- IMTL-G: equal projections on the unit gradients --------------------------------

def test_imtl_equal_projections_and_symmetric_case(x64):
  j = P.normal_matrix(4, 9, seed=5) * np.array([[1.0], [5.0], [0.2], [2.0]])
  d, state = P.aggregate(mo.imtl(), j)
  u = j / np.linalg.norm(j, axis=1, keepdims=True)
  proj = u @ d
  np.testing.assert_allclose(proj, proj.mean(), rtol=1e-6)
  np.testing.assert_allclose(np.sum(mo.task_weights(state)), 1.0, rtol=1e-7)
  # Symmetric two-task case (Gama & Grassi A.4): equal norms → equal weights.
  sym = np.array([[3.0, 4.0, 0.0], [0.0, 4.0, 3.0]])
  _, state = P.aggregate(mo.imtl(), sym)
  np.testing.assert_allclose(mo.task_weights(state), [0.5, 0.5], rtol=1e-7)


def test_pcgrad_reference_loop_m3(x64):
  """PCGrad weights from the Gram form equal the explicit projection loop."""
  j = P.strong_stationary_matrix(3, 5, seed=2)
  key = jax.random.PRNGKey(7)

  from mtl_optax._src.methods.pcgrad import pcgrad_weights
  w = np.asarray(pcgrad_weights(jnp.asarray(j @ j.T), key))
  orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(key, 3)))
  total = np.zeros(5)
  for i in range(3):
    gi = j[i].copy()
    for jj in orders[i]:
      if jj != i and gi @ j[jj] < 0:
        gi -= (gi @ j[jj]) / (j[jj] @ j[jj]) * j[jj]
    total += gi
  np.testing.assert_allclose(w @ j, total, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_gram_matches_numpy(dtype):
  """The CPU column-blocked Gram (forced here by a tiny ``block_bytes``) equals the float64
  NumPy Gram, with a tail block, per-row scales and several leaves, like the one-product path."""
  from mtl_optax._src import linalg as linalg_lib
  rng = np.random.default_rng(0)
  cols = linalg_lib._CPU_GRAM_BLOCK_COLUMNS   # pylint: disable=protected-access
  leaves = [jnp.asarray(rng.standard_normal((3, 2 * cols + 17)), dtype),
            jnp.asarray(rng.standard_normal((3, 5, 7)), dtype)]
  scale = jnp.asarray([[2.0], [0.5], [4.0]])
  rows = np.concatenate([np.asarray(l, np.float64).reshape(3, -1) for l in leaves], 1)
  want = (rows / np.asarray(scale)) @ (rows / np.asarray(scale)).T
  for block_bytes in (1, 2 ** 62):   # blocked, and one product
    got = jax.jit(lambda ls, s, b=block_bytes: mo.linalg.gram_matrix(ls, s, block_bytes=b))(
        leaves, scale)
    assert got.dtype == jnp.float32
    # Error bound of a float32 inner product, relative to ‖g_i‖‖g_j‖ (Cauchy-Schwarz).
    norms = np.sqrt(np.diag(want))
    err = np.abs(np.asarray(got, np.float64) - want) / np.outer(norms, norms)
    assert err.max() < 1e-5, (block_bytes, err.max())
