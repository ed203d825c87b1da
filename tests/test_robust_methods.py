"""krum and trimmed_mean (robust aggregation baselines): references, properties, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from tests import properties as P
from tests.test_projection_methods import families

# --- independent NumPy references ----------------------------------------------------

def krum_ref(j, f, k):
  m = j.shape[0]
  dist = np.linalg.norm(j[:, None, :] - j[None, :, :], axis=2)
  scores = np.array([np.sort(np.delete(dist[i], i))[:m - f - 2].sum() for i in range(m)])
  chosen = np.argsort(scores, kind="stable")[:k]
  return j[chosen].mean(axis=0), chosen


def trimmed_mean_ref(j, b):
  m = j.shape[0]
  return np.sort(j, axis=0)[b:m - b].mean(axis=0)


# --- Krum ---------------------------------------------------------------------------

def test_krum_matches_reference(x64):
  for f, k in [(0, 1), (1, 3), (2, 2)]:
    tx = mo.krum(f, k)
    for seed in range(3):
      j = P.normal_matrix(6, 5, seed=seed)
      j[seed] += 10.0  # one outlier
      d, state = P.aggregate(tx, j)
      want, chosen = krum_ref(j, f, k)
      np.testing.assert_allclose(d, want, rtol=1e-9, atol=1e-12)
      w = np.zeros(6)
      w[chosen] = 1.0 / k
      np.testing.assert_array_equal(mo.task_weights(state), w)
      assert seed not in chosen  # the outlier is never selected


def test_krum_ties_pick_lowest_index(x64):
  j = np.tile(np.array([[1.0, 2.0, 3.0]]), (4, 1))
  _, state = P.aggregate(mo.krum(), j)
  np.testing.assert_array_equal(mo.task_weights(state), [1.0, 0.0, 0.0, 0.0])


def test_krum_errors():
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="n_byzantine"):
      mo.krum(n_byzantine=bad)
  for bad in (0, -2, 2.0):
    with pytest.raises(ValueError, match="n_selected"):
      mo.krum(n_selected=bad)
  with pytest.raises(ValueError, match="n_byzantine \\+ 3 = 4"):
    mo.krum(1, num_tasks=3)                          # at construction
  with pytest.raises(ValueError, match="n_byzantine \\+ 3 = 4"):
    P.aggregate(mo.krum(1), np.ones((3, 5)))          # at update (trace time)
  with pytest.raises(ValueError, match="n_selected=5"):
    P.aggregate(mo.krum(0, 5), np.ones((4, 5)))
  mo.krum(1, 4, num_tasks=4)                          # TorchJD's boundary cases are valid
  mo.krum(12, 15, num_tasks=15)


# --- trimmed mean ---------------------------------------------------------------------

def test_trimmed_mean_matches_reference(x64):
  for b, m in [(0, 1), (1, 3), (2, 7), (4, 9)]:
    j = P.normal_matrix(m, 6, seed=m + b)
    grads = {"a": j[:, :4].reshape(m, 2, 2), "b": j[:, 4:]}
    tx = mo.trimmed_mean(b)
    params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    upd, state = jax.jit(lambda g, s: tx.update(g, s, params))(
        jax.tree_util.tree_map(jnp.asarray, grads), tx.init(params))
    want = trimmed_mean_ref(j, b)
    np.testing.assert_allclose(np.r_[np.ravel(upd["a"]), upd["b"]], want, rtol=1e-12)
    assert "weights" not in mo.diagnostics(state)
  # An outlier coordinate is discarded.
  j = np.array([[1.0, 0.0], [2.0, 0.0], [1e9, 0.0]])
  np.testing.assert_allclose(P.aggregate(mo.trimmed_mean(1), j)[0], [2.0, 0.0])


def test_trimmed_mean_bfloat16_and_huge_values():
  j = P.normal_matrix(5, 7, seed=3)
  d, _ = P.aggregate(mo.trimmed_mean(1), j, dtype=jnp.bfloat16)
  jb = np.asarray(jnp.asarray(j, jnp.bfloat16).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(d, trimmed_mean_ref(jb, 1), rtol=1e-2, atol=1e-2)
  big = np.full((3, 2), 3e38)
  d, _ = P.aggregate(mo.trimmed_mean(0), big, dtype=jnp.float32)  # no overflow in the mean
  np.testing.assert_allclose(d, [3e38, 3e38], rtol=1e-6)


def test_trimmed_mean_errors():
  for bad in (-1, 0.5, False):
    with pytest.raises(ValueError, match="trim_number"):
      mo.trimmed_mean(bad)
  with pytest.raises(ValueError, match="at least 2 \\* trim_number \\+ 1 = 3"):
    mo.trimmed_mean(1, num_tasks=2)
  with pytest.raises(ValueError, match="= 11 tasks, got m=10"):
    P.aggregate(mo.trimmed_mean(5), np.ones((10, 3)))
  P.aggregate(mo.trimmed_mean(4), np.ones((10, 3)))
  P.aggregate(mo.trimmed_mean(0), np.ones((1, 3)))


# --- property suite (methods.md §D) --------------------------------------------------

def _krum_selection_is_unique(j, f, k):
  """Krum is permutation invariant only without a tie at the selection boundary."""
  m = j.shape[0]
  dist = np.linalg.norm(j[:, None, :] - j[None, :, :], axis=2)
  scores = np.sort([np.sort(np.delete(dist[i], i))[:m - f - 2].sum() for i in range(m)])
  return k == m or scores[k] - scores[k - 1] > 1e-3 * max(scores[-1], 1e-12)


@pytest.mark.parametrize("name", ["krum", "trimmed_mean"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_properties(name, dtype, x64):
  """Structure, weighted (Krum), permutation invariance (Krum without ties)."""
  tx = mo.krum(1, 2) if name == "krum" else mo.trimmed_mean(1)
  rtol = 1e-4 if dtype == jnp.float32 else 1e-7
  for case, matrix in families():
    P.assert_structure(tx, matrix, dtype=dtype)
    if name == "krum":
      P.assert_weighted(tx, matrix, dtype=dtype, rtol=rtol, atol=1e-6)
    if case.startswith("scaled"):
      continue
    if name == "krum" and not _krum_selection_is_unique(matrix, 1, 2):
      continue
    P.assert_permutation_invariant(tx, matrix, dtype=dtype, rtol=rtol, atol=1e-6)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_method(self):
    j = jnp.asarray(P.normal_matrix(5, 6, seed=3), jnp.float32)
    for tx in [mo.krum(1, 2), mo.trimmed_mean(1)]:
      params = {"w": jnp.zeros(6)}
      state = tx.init(params)
      got, _ = self.variant(lambda g, s, tx=tx: tx.update(g, s, params))({"w": j}, state)
      want, _ = tx.update({"w": j}, state, params)
      np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, atol=1e-7)
