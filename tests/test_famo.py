"""FAMO against the paper's update on quadratic problems, symmetric case, invariances.

The paper (Liu et al., NeurIPS 2023, Alg. 1; code Cranial-XIX/FAMO) updates the
logits right after each step from an *extra forward pass* on the same batch.
mo.famo instead uses the losses passed at the next call (documented one-call
delay of the ξ update). On a full-batch problem the next call's losses are
exactly the extra forward's, so the two must agree step by step; with
mini-batches, passing ``previous_batch_losses=`` reproduces the paper exactly.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mo
from tests import properties as P
from tests.test_loss_weightings import NpAdam, np_softmax

M, N, K = 3, 4, 6


@contextlib.contextmanager
def x64():
  with jax.enable_x64(True):
    yield


class Quadratic:
  """L_i(θ; t) = ½‖A_i θ − b_i − noise_{t,i}‖² + c_i  (c_i > 0, so L_i > 0)."""

  def __init__(self, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    self.a = rng.standard_normal((M, K, N)) * np.array([1.0, 3.0, 0.3])[:, None, None]
    self.b = rng.standard_normal((M, K))
    self.c = np.array([0.1, 0.5, 0.05])
    self.noise = noise
    self.rng = np.random.default_rng(seed + 1)
    self.batches = {}

  def batch(self, t):
    if t not in self.batches:
      self.batches[t] = self.noise * self.rng.standard_normal((M, K))
    return self.batches[t]

  def residual(self, theta, t):
    return np.einsum("ikn,n->ik", self.a, theta) - self.b - self.batch(t)

  def losses(self, theta, t):
    return 0.5 * np.sum(self.residual(theta, t) ** 2, axis=1) + self.c

  def grads(self, theta, t):
    return np.einsum("ikn,ik->in", self.a, self.residual(theta, t))


def paper_famo(prob, steps, eta, beta, gamma, adam=False, delayed=False):
  """Alg. 1 of the paper: weights from ξ, a step of θ, an extra forward, then ξ's update.

  With ``delayed=True``, the log-loss decrease is measured across batches
  (L_{t−1}(θ_{t−1}) vs L_t(θ_t)) and applied at the next step instead.
  """
  theta, xi = np.zeros(N), np.zeros(M)
  opt = NpAdam(beta, weight_decay=gamma) if adam else None
  record, prev = [], None
  for t in range(steps):
    l, g = prob.losses(theta, t), prob.grads(theta, t)
    if delayed and prev is not None:
      xi = _logit_step(xi, prev - np.log(l), beta, gamma, opt)
    z = np_softmax(xi)
    w = (z / l) / np.sum(z / l)
    record.append((theta.copy(), xi.copy(), w))
    theta = theta - eta * (w @ g)                 # the model's step (SGD)
    if delayed:
      prev = np.log(l)
    else:
      l_after = prob.losses(theta, t)             # the extra forward pass, same batch
      xi = _logit_step(xi, np.log(l) - np.log(l_after), beta, gamma, opt)
  return record


def _logit_step(xi, decrease, beta, gamma, opt):
  z = np_softmax(xi)
  delta = (np.diag(z) - np.outer(z, z)).T @ decrease   # J_softmax(ξ)ᵀ (log L_prev − log L_now)
  if opt is None:
    return xi - beta * (delta + gamma * xi)            # ξ ← ξ − β(δ + γξ)
  return opt.step(xi, delta)


def ours(prob, steps, tx_famo, eta, variant, exact=False):
  tx = optax.chain(tx_famo, optax.sgd(eta))
  params = jnp.zeros(N, jnp.float64)
  state = tx.init(params)

  def step(g, s, p, l, kw):
    upd, s = tx.update(g, s, p, losses=l, **kw)
    return optax.apply_updates(p, upd), s

  step = variant(step)
  record = []
  for t in range(steps):
    theta = np.asarray(params)
    kw = {}
    if exact and t > 0:
      kw["previous_batch_losses"] = jnp.asarray(prob.losses(theta, t - 1))
    new_params, state = step(jnp.asarray(prob.grads(theta, t)), state, params,
                             jnp.asarray(prob.losses(theta, t)), kw)
    diag = mo.diagnostics(state)
    record.append((theta, np.asarray(diag["logits"]), np.asarray(diag["weights"])))
    params = new_params
  return record


def assert_same(a, b, rtol=1e-9, atol=1e-12):
  assert len(a) == len(b) >= 5
  for t, ((th_a, xi_a, w_a), (th_b, xi_b, w_b)) in enumerate(zip(a, b)):
    np.testing.assert_allclose(th_a, th_b, rtol=rtol, atol=atol, err_msg=f"theta, step {t}")
    np.testing.assert_allclose(xi_a, xi_b, rtol=rtol, atol=atol, err_msg=f"logits, step {t}")
    np.testing.assert_allclose(w_a, w_b, rtol=rtol, atol=atol, err_msg=f"weights, step {t}")


class PaperUpdate(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_full_batch_sgd_logits_equal_paper(self):
    """ξ ← ξ − β(δ + γξ) literally (optimizer="sgd"): identical trajectories."""
    with x64():
      prob = Quadratic(seed=0)
      beta, gamma, eta, steps = 0.5, 1e-2, 0.02, 12
      ref = paper_famo(prob, steps, eta, beta, gamma)
      got = ours(prob, steps, mo.famo(beta, gamma, optimizer="sgd", num_tasks=M), eta,
                 self.variant)
      assert_same(got, ref)
      assert np.ptp(ref[-1][1]) > 1e-2  # the logits really moved

  @chex.variants(with_jit=True, without_jit=True)
  def test_full_batch_adam_equals_reference_code(self):
    """Default inner optimizer = torch.optim.Adam(lr=β, weight_decay=γ) of the reference code."""
    with x64():
      prob = Quadratic(seed=1)
      steps, eta = 10, 0.02
      ref = paper_famo(prob, steps, eta, 0.025, 1e-3, adam=True)
      got = ours(prob, steps, mo.famo(num_tasks=M), eta, self.variant)
      assert_same(got, ref)

  @chex.variants(with_jit=True, without_jit=True)
  def test_minibatch_exact_with_previous_batch_losses(self):
    with x64():
      prob = Quadratic(seed=2, noise=0.3)
      ref = paper_famo(prob, 10, 0.02, 0.5, 1e-2)
      got = ours(prob, 10, mo.famo(0.5, 1e-2, optimizer="sgd", num_tasks=M), 0.02,
                 self.variant, exact=True)
      assert_same(got, ref)

  @chex.variants(with_jit=True, without_jit=True)
  def test_minibatch_default_is_the_documented_delay(self):
    with x64():
      prob = Quadratic(seed=3, noise=0.3)
      ref_delayed = paper_famo(prob, 10, 0.02, 0.5, 1e-2, delayed=True)
      ref_paper = paper_famo(Quadratic(seed=3, noise=0.3), 10, 0.02, 0.5, 1e-2)
      got = ours(prob, 10, mo.famo(0.5, 1e-2, optimizer="sgd", num_tasks=M), 0.02, self.variant)
      assert_same(got, ref_delayed)
      # ...which differs from the paper's only through the batch change in δ.
      assert not np.allclose(ref_delayed[-1][1], ref_paper[-1][1])


def test_first_call_does_not_move_the_logits():
  tx = mo.famo(num_tasks=M)
  params = {"w": jnp.zeros(N)}
  j = jnp.asarray(P.normal_matrix(M, N, seed=0), jnp.float32)
  losses = jnp.array([0.5, 1.0, 2.0])
  _, state = tx.update({"w": j}, tx.init(params), params, losses=losses)
  diag = mo.diagnostics(state)
  np.testing.assert_array_equal(diag["logits"], np.zeros(M))
  np.testing.assert_array_equal(diag["loss_decrease"], np.zeros(M))
  w = 1.0 / np.asarray(losses)
  np.testing.assert_allclose(diag["weights"], w / w.sum(), rtol=1e-6)
  assert bool(state.inner.has_prev)


def test_symmetric_two_task_case_gives_equal_weights():
  """Gama & Grassi (App. A.4): L_1 = L_2 and ‖g_1‖ = ‖g_2‖ ⇒ equal weights, at every step."""
  rng = np.random.default_rng(0)
  tx = mo.famo(num_tasks=2)
  params = {"w": jnp.zeros(N)}
  state = tx.init(params)
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  for _ in range(8):
    g1 = rng.standard_normal(N)
    g2 = rng.permutation(g1) * rng.choice([-1.0, 1.0], N)  # same norm, different direction
    loss = rng.uniform(0.1, 5.0)
    j = np.stack([g1, g2])
    upd, state = step({"w": jnp.asarray(j, jnp.float32)}, state, jnp.full((2,), loss, jnp.float32))
    np.testing.assert_allclose(mo.task_weights(state), [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(upd["w"], 0.5 * (g1 + g2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mo.diagnostics(state)["logits"], [0.0, 0.0], atol=1e-7)


def test_invariant_to_loss_scales(x64):
  """Rescaling task i's loss by s_i (and its gradient) changes neither ξ nor the direction of d.

  Each term z_i g_i / L_i is invariant; only the common factor c = (Σ z_j/L_j)⁻¹
  changes. The log-loss decreases, hence the logits, are invariant.
  """
  prob = Quadratic(seed=4)
  scales = np.array([1e-3, 1.0, 250.0])
  tx = mo.famo(0.5, 1e-2, optimizer="sgd", num_tasks=M)
  params = {"w": jnp.zeros(N, jnp.float64)}
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  s_a, s_b = tx.init(params), tx.init(params)
  theta = np.zeros(N)
  for t in range(6):
    l, g = prob.losses(theta, t), prob.grads(theta, t)
    u_a, s_a = step({"w": jnp.asarray(g)}, s_a, jnp.asarray(l))
    u_b, s_b = step({"w": jnp.asarray(scales[:, None] * g)}, s_b, jnp.asarray(scales * l))
    a, b = np.asarray(u_a["w"]), np.asarray(u_b["w"])
    np.testing.assert_allclose(b * (a @ a) / (a @ b), a, rtol=1e-9)   # b = κ a, κ > 0
    assert a @ b > 0
    np.testing.assert_allclose(mo.diagnostics(s_b)["logits"], mo.diagnostics(s_a)["logits"],
                               rtol=1e-9, atol=1e-12)
    theta = theta - 0.05 * np.asarray(u_a["w"])
  assert np.ptp(np.asarray(mo.diagnostics(s_a)["logits"])) > 1e-3


def test_min_losses_shift():
  """D = L − L_min: with min_losses the weights use the shifted losses."""
  tx = mo.famo(min_losses=[0.5, 0.0, 1.0], num_tasks=M)
  params = {"w": jnp.zeros(N)}
  losses = jnp.array([1.0, 1.0, 3.0])
  _, state = tx.update({"w": jnp.ones((M, N))}, tx.init(params), params, losses=losses)
  inv = 1.0 / np.array([0.5, 1.0, 2.0])
  np.testing.assert_allclose(mo.task_weights(state), inv / inv.sum(), rtol=1e-6)
