"""krum, trimmed_mean and cdtt: references, properties, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from tests import properties as P
from tests.test_projection_methods import edm_ref

SYMMETRIC = np.array([[3.0, 4.0, 0.0, 1.0], [0.0, 4.0, 3.0, -1.0]])  # equal norms


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


class CDTTRef:
  """Gama & Grassi's ``optimizers/task_tensioners.py``, step by step, in NumPy (with trig)."""

  def __init__(self, m, alpha, window=10):
    self.alpha, self.window = alpha, window
    self.acc = np.zeros((m, window))
    self.iterations = 0
    self.prev = None

  def step(self, j, losses):
    norms = np.linalg.norm(j, axis=1)
    if np.any(norms == 0):
      return np.zeros(j.shape[1]), np.zeros(len(j))
    self.acc[:, self.iterations % self.window] = norms
    self.iterations += 1
    common, w = edm_ref(j)
    if self.iterations >= self.window:
      sums = self.acc.sum(axis=1)
      if self.prev is not None:
        param = sums / self.prev + np.log10(losses)
        a = self.alpha
        t = np.maximum(0.0, a / (1 + np.exp(-param * math.e + math.e)) + 1 - a)
        diff = j - common
        dn = np.linalg.norm(diff, axis=1)
        v = common + (t[:, None] * diff / dn[:, None]).sum(axis=0)
        w = w + t / dn - w * np.sum(t / dn)
        for i in range(len(j)):
          angle = np.arccos(j[i] @ v / (norms[i] * np.linalg.norm(v)))
          if angle > np.pi / 2:
            u = j[i] / norms[i]
            dot = v @ u
            perp = v - dot * u
            diff_i = v - j[i]
            alpha_angle = np.pi - np.arccos(j[i] @ diff_i / (norms[i] * np.linalg.norm(diff_i)))
            v = np.tan(alpha_angle) * norms[i] * perp / np.linalg.norm(perp)
            w = w * norms[i] * np.tan(alpha_angle) / np.linalg.norm(perp)
            w[i] -= dot * np.tan(alpha_angle) / np.linalg.norm(perp)
        common = v
      self.prev = sums
    return common, w


# --- Krum ---------------------------------------------------------------------------

def test_krum_matches_reference(x64):
  for f, k in [(0, 1), (1, 1), (1, 3), (2, 2)]:
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
  for b, m in [(0, 1), (0, 4), (1, 3), (1, 5), (2, 7), (4, 9)]:
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


# --- CDTT ------------------------------------------------------------------------------

def _cdtt_sequence(steps, m=3, n=6, seed=0):
  """Conflicting gradients of norm ~0.1-1 whose norms drift, and decreasing losses."""
  rng = np.random.default_rng(seed)
  base = P.strong_stationary_matrix(m, n, seed=seed) * rng.uniform(0.05, 0.5, (m, 1))
  js, ls = [], []
  for k in range(steps):
    js.append(base * (1.0 + 0.1 * np.sin(k + np.arange(m)))[:, None]
              + 0.02 * rng.standard_normal((m, n)))
    ls.append(rng.uniform(0.2, 3.0, m) / (1 + 0.1 * k))
  return js, ls


@pytest.mark.parametrize("alpha,window", [(0.2, 10), (0.8, 3)])
def test_cdtt_matches_reference(alpha, window, x64):
  m, steps = 3, window + 8
  js, ls = _cdtt_sequence(steps)
  js[4] = js[4].copy()
  js[4][1] = 0.0  # a zero gradient: skipped step (no shared update, state not advanced)
  tx = mo.cdtt(alpha, window, num_tasks=m)
  params = {"w": jnp.zeros(6)}
  state = tx.init(params)
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  ref = CDTTRef(m, alpha, window)
  corrections = 0
  for k in range(steps):
    upd, state = step({"w": jnp.asarray(js[k])}, state, jnp.asarray(ls[k]))
    d_ref, w_ref = ref.step(js[k], ls[k])
    np.testing.assert_allclose(upd["w"], d_ref, rtol=1e-7, atol=1e-10, err_msg=f"step {k}")
    np.testing.assert_allclose(mo.task_weights(state), w_ref, rtol=1e-7, atol=1e-10)
    corrections += int(mo.diagnostics(state)["corrections"])
    active = ref.prev is not None and ref.iterations > window and np.all(js[k][1] != 0)
    assert np.any(mo.diagnostics(state)["tensions"] > 0) == active
  assert int(state.inner.steps) == steps - 1
  assert corrections > 0  # the direction check was exercised


def test_cdtt_first_steps_are_edm_and_heads_unweighted(x64):
  js, ls = _cdtt_sequence(3)
  tx = mo.cdtt(num_tasks=3, task_specific={"w": False, "h": True})
  params = {"w": jnp.zeros(6), "h": jnp.zeros(2)}
  state = tx.init(params)
  heads = np.arange(6.0).reshape(3, 2)
  for k in range(3):
    upd, state = tx.update({"w": jnp.asarray(js[k]), "h": jnp.asarray(heads)}, state, params,
                           losses=jnp.asarray(ls[k]))
    np.testing.assert_allclose(upd["w"], edm_ref(js[k])[0], rtol=1e-8)
    np.testing.assert_allclose(upd["h"], heads.sum(0))
  assert mo.aggregator_info(tx).needs_losses


def test_cdtt_symmetric_two_tasks_equal_weights(x64):
  """Gama & Grassi A.4: equal norms and losses → equal weights, with tension active."""
  tx = mo.cdtt(alpha=0.6, window=3, num_tasks=2)
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  for k in range(8):
    scale = 1.0 + 0.2 * k
    upd, state = step({"w": jnp.asarray(SYMMETRIC * scale)}, state, jnp.full((2,), 0.7 / scale))
    w = np.asarray(mo.task_weights(state))
    np.testing.assert_allclose(w[0], w[1], rtol=1e-12)
  assert np.all(mo.diagnostics(state)["tensions"] > 0)
  np.testing.assert_allclose(upd["w"], 0.5 * SYMMETRIC.sum(0) * scale, rtol=1e-12)


def test_cdtt_tension_function():
  from mtl_optax._src.methods.cdtt import tension
  p = jnp.asarray([-5.0, 0.0, 1.0, 3.0])
  for a in (0.0, 0.2, 1.0, 1.5):
    want = np.maximum(0.0, a / (1 + np.exp(-np.asarray(p) * math.e + math.e)) + 1 - a)
    np.testing.assert_allclose(tension(p, a), want, rtol=1e-6)


def test_cdtt_errors():
  with pytest.raises(ValueError, match="num_tasks"):
    mo.cdtt()
  for bad in (-0.1, float("inf"), True):
    with pytest.raises(ValueError, match="alpha"):
      mo.cdtt(alpha=bad, num_tasks=2)
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match="window"):
      mo.cdtt(window=bad, num_tasks=2)
  with pytest.raises(ValueError, match="losses="):
    P.aggregate(mo.cdtt(num_tasks=2), np.ones((2, 3)))
  with pytest.raises(ValueError, match="num_tasks=2"):
    P.aggregate(mo.cdtt(num_tasks=2), np.ones((3, 3)), losses=np.ones(3))


# --- property suite (methods.md §D) --------------------------------------------------

FACTORIES = {
    "krum": lambda m: mo.krum(1, 2) if m >= 4 else mo.krum(),
    "trimmed_mean": lambda m: mo.trimmed_mean(1),
    "cdtt": lambda m: mo.cdtt(num_tasks=m),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_structure_weighted_permutation(name, dtype, x64):
  rtol = 1e-4 if dtype == jnp.float32 else 1e-7
  cases = [(c, j) for c, j in P.typical_matrices() if j.shape[0] >= 3] + P.scaled_matrices()
  for case, matrix in cases:
    m = matrix.shape[0]
    losses = P.losses_for(m) if name == "cdtt" else None
    tx = FACTORIES[name](m)
    P.assert_structure(tx, matrix, losses, dtype=dtype)
    if name != "trimmed_mean":
      P.assert_weighted(tx, matrix, losses, dtype=dtype, rtol=rtol, atol=1e-6)
    if not case.startswith("scaled"):
      # Krum: distinct scores in these families (no ties); CDTT: its first
      # step is EDM (order-independent); the direction check is order-dependent.
      P.assert_permutation_invariant(tx, matrix, losses, dtype=dtype, rtol=rtol, atol=1e-6)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_method_over_steps(self):
    js, ls = _cdtt_sequence(5, m=4)
    for tx in [mo.krum(1, 2), mo.trimmed_mean(1), mo.cdtt(window=2, num_tasks=4)]:
      params = {"w": jnp.zeros(6)}
      upd = self.variant(lambda g, s, l, tx=tx: tx.update(g, s, params, losses=l))
      s_jit = s_eager = tx.init(params)
      for k in range(5):  # CDTT's tension is active from step 3 with window=2
        j = jnp.asarray(js[k], jnp.float32)
        l = jnp.asarray(ls[k], jnp.float32)
        got, s_jit = upd({"w": j}, s_jit, l)
        want, s_eager = tx.update({"w": j}, s_eager, params, losses=l)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)
