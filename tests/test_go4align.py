"""GO4Align: NumPy reference of the authors' recipe, exact 1-D k-means, properties.

The reference follows ``GO4ALIGN.get_weighted_loss`` (autumn9999/GO4Align,
``methods/cluster_methods.py``): p ← normalise(p · exp(−η L)), γ = (ΣL / L) p,
k-means of the scalars γ, each task weighted by its group's mean γ. The
grouping of the reference is checked against a brute-force search over every
assignment of the tasks to K non-empty groups (the global k-means optimum).
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax._src.methods.go4align import kmeans_1d

M, N, STEPS = 4, 5, 6


def brute_force_kmeans(x, k):
  """Group means of the minimum within-group sum of squares over all assignments."""
  best, best_cost = None, np.inf
  for labels in itertools.product(range(k), repeat=len(x)):
    labels = np.array(labels)
    if len(set(labels)) != k:
      continue
    means = np.array([x[labels == g].mean() for g in range(k)])
    cost = np.sum((x - means[labels]) ** 2)
    if cost < best_cost - 1e-12:
      best, best_cost = means[labels], cost
  return best


def go4align_ref(loss_seq, k, eta):
  m = loss_seq[0].shape[0]
  p, out = np.full(m, 1.0 / m), []
  for losses in loss_seq:
    p = p * np.exp(-eta * losses)
    p = p / p.sum()
    gamma = losses.sum() / losses * p
    w = np.full(m, gamma.mean()) if k == 1 else brute_force_kmeans(gamma, k)
    out.append((w, gamma, p))
  return out


def test_kmeans_1d_is_the_global_optimum():
  rng = np.random.default_rng(0)
  for trial in range(6):
    m = 5
    x = rng.standard_normal(m) * rng.uniform(0.1, 10)
    if trial == 0:
      x = np.array([1.0, 1.0, 1.0, 5.0, 5.0])  # ties
    for k in range(1, m + 1):
      centres, groups = kmeans_1d(jnp.asarray(x), k)
      np.testing.assert_allclose(centres, brute_force_kmeans(x, k), rtol=1e-5, atol=1e-6)
      groups = np.asarray(groups)
      assert set(groups.tolist()) <= set(range(k))
      # Groups are numbered by increasing value.
      order = np.argsort(x, kind="stable")
      assert np.all(np.diff(groups[order]) >= 0)


class ReferenceAgreement(chex.TestCase):

  def _run(self, k, eta):
    with jax.enable_x64(True):
      rng = np.random.default_rng(k)
      loss_seq = [rng.uniform(0.2, 3.0, M) for _ in range(STEPS)]
      js = [rng.standard_normal((M, N)) for _ in range(STEPS)]
      tx = mo.go4align(num_groups=k, robust_step_size=eta, num_tasks=M)
      params = {"w": jnp.zeros(N)}
      state = tx.init(params)
      step = self.variant(lambda g, s, l: tx.update(g, s, params, losses=l))
      for losses, j, (w, gamma, p) in zip(loss_seq, js, go4align_ref(loss_seq, k, eta)):
        upd, state = step({"w": jnp.asarray(j)}, state, jnp.asarray(losses))
        np.testing.assert_allclose(mo.task_weights(state), w, rtol=1e-10)
        np.testing.assert_allclose(upd["w"], w @ j, rtol=1e-10, atol=1e-12)
        diag = mo.diagnostics(state)
        np.testing.assert_allclose(diag["indicators"], gamma, rtol=1e-10)
        np.testing.assert_allclose(diag["probs"], p, rtol=1e-10)
      return diag

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_group(self):
    self._run(1, 1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_groups_large_step(self):
    # A large η makes the loss history matter within a few steps.
    diag = self._run(2, 0.5)
    assert len(set(np.asarray(diag["groups"]).tolist())) == 2

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_task_its_own_group(self):
    diag = self._run(M, 0.1)
    np.testing.assert_allclose(diag["weights"], diag["indicators"], rtol=1e-12)


def test_properties():
  tx = mo.go4align(num_groups=2, num_tasks=3)
  params = {"w": jnp.zeros(4)}
  rng = np.random.default_rng(1)
  j = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
  update = jax.jit(lambda g, s, l: tx.update({"w": g}, s, params, losses=l))
  # Equal losses: p stays uniform, γ = 1, every weight 1 (the mean loss gradient × m).
  upd, st = update(j, tx.init(params), jnp.full((3,), 0.7))
  np.testing.assert_allclose(mo.task_weights(st), np.ones(3), rtol=1e-6)
  # Permuting the tasks permutes the weights.
  losses = jnp.asarray([0.3, 2.0, 1.1])
  perm = np.array([2, 0, 1])
  _, s1 = update(j, tx.init(params), losses)
  _, s2 = update(j[perm], tx.init(params), losses[perm])
  np.testing.assert_allclose(np.asarray(mo.task_weights(s1))[perm], mo.task_weights(s2),
                             rtol=1e-6)
  # Zero and huge losses: finite weights (losses floored at eps).
  upd, st = update(j, tx.init(params), jnp.asarray([0.0, 1e30, 1.0]))
  assert np.all(np.isfinite(upd["w"])) and np.all(np.isfinite(mo.task_weights(st)))
  # A non-finite loss skips the step (the default policy): the history is kept.
  st0 = tx.init(params)
  upd, st = update(j, st0, jnp.asarray([np.nan, 1.0, 1.0]))
  np.testing.assert_array_equal(upd["w"], 0.0)
  np.testing.assert_array_equal(st.inner.probs, st0.inner.probs)


def test_errors():
  with pytest.raises(ValueError, match="num_tasks"):
    mo.go4align()
  for k in (0, 4, 1.5, True):
    with pytest.raises(ValueError, match="num_groups"):
      mo.go4align(num_groups=k, num_tasks=3)
  with pytest.raises(ValueError, match="robust_step_size"):
    mo.go4align(robust_step_size=-1.0, num_tasks=3)
  tx = mo.go4align(num_tasks=3)
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="losses"):
    tx.update({"w": jnp.ones((3, 2))}, tx.init(params), params)
