"""cdtt (EDM central direction + task tensioners): reference, properties, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from tests import properties as P
from tests.test_projection_methods import SYMMETRIC, edm_ref, families

# --- independent NumPy reference -----------------------------------------------------

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
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  for k in range(3):
    upd, state = step({"w": jnp.asarray(js[k]), "h": jnp.asarray(heads)}, state,
                      jnp.asarray(ls[k]))
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

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_properties(dtype, x64):
  """Structure and weighted on every family; permutation invariance of the first
  step (EDM). Later steps are not permutation invariant: the direction check
  runs over the tasks in order (as the reference code)."""
  rtol = 1e-4 if dtype == jnp.float32 else 1e-7
  txs = {}  # one instance per m: each shape compiles once
  for case, matrix in families():
    m = matrix.shape[0]
    losses = P.losses_for(m)
    tx = txs.setdefault(m, mo.cdtt(num_tasks=m))
    P.assert_structure(tx, matrix, losses, dtype=dtype)
    P.assert_weighted(tx, matrix, losses, dtype=dtype, rtol=rtol, atol=1e-6)
    if not case.startswith("scaled"):
      P.assert_permutation_invariant(tx, matrix, losses, dtype=dtype, rtol=rtol, atol=1e-6)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_over_steps(self):
    js, ls = _cdtt_sequence(3, m=4)
    tx = mo.cdtt(window=1, num_tasks=4)
    params = {"w": jnp.zeros(6)}
    upd = self.variant(lambda g, s, l: tx.update(g, s, params, losses=l))
    s_jit = s_eager = tx.init(params)
    for k in range(3):  # the tension is active from step 2 with window=1
      j = jnp.asarray(js[k], jnp.float32)
      l = jnp.asarray(ls[k], jnp.float32)
      got, s_jit = upd({"w": j}, s_jit, l)
      want, s_eager = tx.update({"w": j}, s_eager, params, losses=l)
      np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)
    assert np.all(mo.diagnostics(s_jit)["tensions"] > 0)
