"""IMTL's three variants: IMTL-G (gradient), IMTL-L (loss scales) and the hybrid."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests import properties as P
from tests.test_projection_methods import J_GOLDEN, SYMMETRIC, families


# --- reference ---------------------------------------------------------------------

def imtl_g_ref(j):
  """IMTL-G with the paper's closed form α_{2..m} = g_1 Uᵀ(DUᵀ)⁻¹ (full-rank rows)."""
  u = j / np.linalg.norm(j, axis=1, keepdims=True)
  d_mat, u_mat = j[0] - j[1:], u[0] - u[1:]
  a = j[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
  return np.r_[1.0 - a.sum(), a]


# --- IMTL-G, IMTL-L, hybrid ---------------------------------------------------------

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


@pytest.mark.parametrize("variant,optimizer", [("loss", "adam"), ("hybrid", "sgd"),
                                               ("hybrid", "adam")])
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
  if optimizer == "adam":
    return  # the equilibrium depends only on the dynamics of s: checked once
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
  g_dir = imtl_g_ref(J_GOLDEN) @ J_GOLDEN
  np.testing.assert_allclose(upd["w"] / np.linalg.norm(upd["w"]), g_dir / np.linalg.norm(g_dir),
                             rtol=1e-9)


def test_imtl_representation_facts():
  assert mo.aggregator_info(mo.imtl()).representation == "invalid"
  assert mo.aggregator_info(mo.imtl("loss", num_tasks=2)).representation == "exact"
  assert mo.aggregator_info(mo.imtl("hybrid", num_tasks=2)).representation == "invalid"
  assert mo.aggregator_info(mo.aligned_mtl()).representation == "variant"


# --- symmetric two-task case (Gama & Grassi, App. A.4) -------------------------------

@pytest.mark.parametrize("variant", ["gradient", "hybrid"])
def test_symmetric_two_tasks_equal_weights(variant, x64):
  _, state = P.aggregate(mo.imtl(variant, num_tasks=2), SYMMETRIC, losses=np.array([0.7, 0.7]))
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(w[0], w[1], rtol=1e-12)


# --- property suite (methods.md §D) --------------------------------------------------

@pytest.mark.parametrize("variant", ["loss", "hybrid"])
def test_imtl_variants_properties(variant, x64):
  tx = mo.imtl(variant, num_tasks=4)
  losses = P.losses_for(4)
  for case, matrix in families():
    if matrix.shape[0] != 4:
      continue
    P.assert_structure(tx, matrix, losses)
    P.assert_weighted(tx, matrix, losses)
    if not case.startswith("scaled"):
      P.assert_permutation_invariant(tx, matrix, losses)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_loss_and_hybrid(self):
    j = jnp.asarray(P.normal_matrix(4, 6, seed=3), jnp.float32)
    losses = jnp.asarray(P.losses_for(4), jnp.float32)
    for tx in [mo.imtl("loss", num_tasks=4), mo.imtl("hybrid", num_tasks=4)]:
      params = {"w": jnp.zeros(6)}
      upd = self.variant(lambda g, s, l, tx=tx: tx.update(g, s, params, losses=l))
      s_jit = s_eager = tx.init(params)
      for _ in range(2):  # the second step sees the updated loss scales
        got, s_jit = upd({"w": j}, s_jit, losses)
        want, s_eager = tx.update({"w": j}, s_eager, params, losses=losses)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)


# --- errors -------------------------------------------------------------------------

def test_errors():
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
