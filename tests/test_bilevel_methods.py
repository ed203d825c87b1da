"""MOML and FORUM (validation-batch bilevel weightings), linalg.dense_qp, step kwargs.

What is checked against the independent NumPy references (quadratic task
losses L_i(θ) = ½‖A_i θ − b_i‖² with a shared block and one head per task, so
every gradient is exact in closed form):

* MOML, over several steps: the virtual SGD step, the per-task validation
  gradients at the look-ahead point, the (m × m) hypergradient matrix through
  the softmax Jacobian, its l2 row normalisation, the min-norm (MGDA) weights
  (brute force over the simplex's faces in NumPy), Adam on the logits, and the
  update d = Σ softmax(α) g with the new logits (heads weighted).
* FORUM, over several steps: the T inner SGD steps, ∇q, π, the QP (solved in
  NumPy by enumerating active sets of the KKT system, the same problem LibMTL
  hands to cvxpy), the (k+1)^(−3/4) averaging of λ, ν, Adam on α with ν ∂q/∂α,
  and the update Σ λ̄ ĝ^val + ν Σ s g on every parameter.
* ``make_train_step`` forwards keyword arguments to ``tx.update`` (auto_lambda,
  moml, forum), rejects unused and reserved ones at trace time.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src.methods.forum import forum_qp

M, N_SH, N_HEAD, STEPS = 3, 4, 2, 3
N = N_SH + M * N_HEAD


def _problem(seed):
  rng = np.random.default_rng(seed)
  a = np.zeros((M, 5, N))
  for i in range(M):
    a[i, :, :N_SH] = rng.standard_normal((5, N_SH))
    a[i, :, N_SH + i * N_HEAD:N_SH + (i + 1) * N_HEAD] = rng.standard_normal((5, N_HEAD))
  batches = [rng.standard_normal((M, 5)) for _ in range(2 * STEPS)]
  return a, batches[:STEPS], batches[STEPS:]


def _to_vec(p):
  return jnp.concatenate([p["shared"], p["head"].ravel()])


def _loss_fn_for(a):
  def loss_fn(p, b):
    theta = _to_vec(p)
    return 0.5 * jnp.sum((jnp.einsum("imn,n->im", jnp.asarray(a), theta) - b) ** 2, axis=1)
  return loss_fn


def _np_losses(a, theta, b):
  return 0.5 * np.sum((np.einsum("imn,n->im", a, theta) - b) ** 2, axis=1)


def _np_grads(a, theta, b):
  return np.stack([a[i].T @ (a[i] @ theta - b[i]) for i in range(M)])


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _adam(state, grad, lr, k):
  mom, vel = state
  mom = 0.9 * mom + 0.1 * grad
  vel = 0.999 * vel + 0.001 * grad ** 2
  step = lr * (mom / (1 - 0.9 ** (k + 1))) / (np.sqrt(vel / (1 - 0.999 ** (k + 1))) + 1e-8)
  return (mom, vel), step


def _brute_qp(q, c, g, h, a_eq, b_eq):
  """min ½xᵀQx + cᵀx s.t. Gx ≤ h, Ax = b: best feasible KKT point over all active sets."""
  n, best = q.shape[0], None
  for r in range(len(h) + 1):
    for act in itertools.combinations(range(len(h)), r):
      e = np.vstack([a_eq] + ([g[list(act)]] if act else []))
      rhs = np.concatenate([b_eq, h[list(act)]])
      kkt = np.block([[q, e.T], [e, np.zeros((len(rhs), len(rhs)))]])
      full = np.concatenate([-c, rhs])
      sol = np.linalg.lstsq(kkt, full, rcond=None)[0]
      x = sol[:n]
      if (np.all(g @ x <= h + 1e-10) and np.allclose(kkt @ sol, full, atol=1e-9)
          and np.all(sol[n + len(b_eq):] >= -1e-10)):
        f = 0.5 * x @ q @ x + c @ x
        if best is None or f < best[0] - 1e-13:
          best = (f, x)
  return best[1]


def _min_norm_ref(gram):
  """argmin_{w∈Δ} wᵀGw by the same brute-force active-set enumeration."""
  m = gram.shape[0]
  return _brute_qp(2 * gram, np.zeros(m), -np.eye(m), np.zeros(m), np.ones((1, m)),
                   np.ones(1))


def _forum_qp_ref(unit_f, gq, phi):
  """LibMTL's cvxpy problem: min ‖Aᵀw‖² − φ(‖gq‖²+1e-8) w_m, Σλ = 1, w ≥ 0, w_m ≥ πᵀλ."""
  q_sq = gq @ gq
  pi = phi - unit_f @ gq / (q_sq + 1e-8)
  a = np.vstack([unit_f, gq])
  c = np.zeros(M + 1)
  c[-1] = -phi * (q_sq + 1e-8)
  g = np.vstack([-np.eye(M + 1), np.concatenate([pi, [-1.0]])[None]])
  x = _brute_qp(2 * a @ a.T, c, g, np.zeros(M + 2), np.concatenate([np.ones(M), [0.0]])[None],
                np.ones(1))
  return x[:M], pi


class ReferenceAgreement(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_moml(self):
    with jax.enable_x64(True):
      a, b_train, b_val = _problem(0)
      loss_fn = _loss_fn_for(a)
      eta, meta_lr = 0.3, 0.05
      tx = mo.moml(loss_fn, eta, meta_lr=meta_lr, num_tasks=M,
                   task_specific={"shared": False, "head": True})
      params = {"shared": jnp.zeros(N_SH), "head": jnp.zeros((M, N_HEAD))}
      state = tx.init(params)
      step = self.variant(lambda g, s, p, vb: tx.update(g, s, p, val_batch=vb))
      theta, alpha, adam = np.zeros(N), np.zeros(M), (np.zeros(M), np.zeros(M))
      for k in range(STEPS):
        _, grads = mo.task_grads(loss_fn, params, jnp.asarray(b_train[k]))
        upd, state = step(grads, state, params, jnp.asarray(b_val[k]))
        g = _np_grads(a, theta, b_train[k])
        s = _softmax(alpha)
        theta_v = theta - eta * s @ g
        g_val = _np_grads(a, theta_v, b_val[k])
        hyper = np.stack([-eta * (g @ g_val[i]) @ (np.diag(s) - np.outer(s, s))
                          for i in range(M)])
        unit = hyper / np.linalg.norm(hyper, axis=1, keepdims=True)
        gamma = _min_norm_ref(unit @ unit.T)
        meta = gamma @ unit
        adam, delta = _adam(adam, meta, meta_lr, k)
        alpha = alpha - delta
        d = _softmax(alpha) @ g
        np.testing.assert_allclose(mo.diagnostics(state)["meta_grad"], meta, rtol=1e-8,
                                   atol=1e-12)
        np.testing.assert_allclose(mo.task_weights(state), _softmax(alpha), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(_to_vec(upd)), d, rtol=1e-9, atol=1e-12)
        theta = theta - 0.1 * d
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, upd))
      assert np.ptp(_softmax(alpha)) > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_forum(self):
    with jax.enable_x64(True):
      a, b_train, b_val = _problem(1)
      loss_fn = _loss_fn_for(a)
      inner_lr, steps, phi, meta_lr = 0.05, 3, 0.2, 0.05
      tx = mo.forum(loss_fn, inner_lr, steps, phi, meta_lr=meta_lr, num_tasks=M)
      params = {"shared": jnp.zeros(N_SH), "head": jnp.zeros((M, N_HEAD))}
      state = tx.init(params)
      step = self.variant(lambda g, s, p, l, tb, vb: tx.update(
          g, s, p, losses=l, train_batch=(tb,), val_batch=(vb,)))
      theta, alpha, adam = np.zeros(N), np.zeros(M), (np.zeros(M), np.zeros(M))
      lam_bar, nus = np.zeros(M), []
      for k in range(STEPS):
        losses, grads = mo.task_grads(loss_fn, params, jnp.asarray(b_train[k]))
        upd, state = step(grads, state, params, losses, jnp.asarray(b_train[k]),
                          jnp.asarray(b_val[k]))
        # Reference: inner SGD on Σ s_i L_i, ∇q, unit validation gradients, QP, EMA.
        s = _softmax(alpha)
        g = _np_grads(a, theta, b_train[k])
        w = theta.copy()
        for _ in range(steps):
          w = w - inner_lr * s @ _np_grads(a, w, b_train[k])
        gap = _np_losses(a, theta, b_train[k]) - _np_losses(a, w, b_train[k])
        jac = np.diag(s) - np.outer(s, s)
        gq = np.concatenate([jac @ gap, s @ g])
        gv = _np_grads(a, theta, b_val[k])
        unit = gv / np.linalg.norm(gv, axis=1, keepdims=True)
        unit_f = np.hstack([np.zeros((M, M)), unit])
        lam_qp, pi = _forum_qp_ref(unit_f, gq, phi)
        lam_bar = lam_bar + (k + 1.0) ** -0.75 * (lam_qp - lam_bar)
        nu = max(lam_bar @ pi, 0.0)
        nus.append(nu)
        d = lam_bar @ unit + nu * s @ g
        adam, delta = _adam(adam, nu * gq[:M], meta_lr, k)
        alpha = alpha - delta
        diag = mo.diagnostics(state)
        np.testing.assert_allclose(diag["pi"], pi, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(diag["lambda"], lam_bar, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(diag["nu"], nu, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(diag["value_gap"], gap, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(_to_vec(upd)), d, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(state.inner.logits, alpha, rtol=1e-6, atol=1e-9)
        assert diag["qp_residual"] < 1e-9
        theta = theta - 0.1 * d
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, upd))
      assert max(nus) > 0  # the value-function constraint was active at least once
      assert np.ptp(alpha) > 1e-4


def test_dense_qp_matches_active_set_enumeration():
  """Random FORUM-shaped problems (m = 3): exact in float64, ~1e-6 in float32."""
  rng = np.random.default_rng(2)
  fs, gqs, wants = [], [], []
  for _ in range(8):
    f = rng.standard_normal((M, 6))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    gq = rng.standard_normal(6) * rng.uniform(0.1, 3.0)
    fs.append(f)
    gqs.append(gq)
    wants.append(_forum_qp_ref(f, gq, 0.1)[0])
  grams = np.stack([f @ f.T for f in fs])
  unit_q = np.stack([f @ gq for f, gq in zip(fs, gqs)])
  q_sq = np.stack([gq @ gq for gq in gqs])
  solve = jax.jit(jax.vmap(lambda g, u, q: forum_qp(g, u, q, 0.1)))
  with jax.enable_x64(True):
    lam, _, res = solve(jnp.asarray(grams), jnp.asarray(unit_q), jnp.asarray(q_sq))
    np.testing.assert_allclose(lam, np.stack(wants), atol=1e-10)
    assert np.all(np.asarray(res) < 1e-10)
  lam32, _, _ = solve(*(jnp.asarray(x, jnp.float32) for x in (grams, unit_q, q_sq)))
  np.testing.assert_allclose(lam32, np.stack(wants), atol=1e-4)
  # ∇q = 0: the ν term is void, λ is the min-norm point of the unit gradients.
  f = np.eye(3)[:, :3] + 0.2
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  lam, _, _ = forum_qp(jnp.asarray(f @ f.T), jnp.zeros(3), jnp.zeros(()), 0.1)
  np.testing.assert_allclose(lam, _min_norm_ref(f @ f.T), atol=1e-5)


# ---------------------------------------------------------------------------
# make_train_step keyword arguments, robustness, errors.
# ---------------------------------------------------------------------------

def _small():
  a, b_train, b_val = _problem(3)
  loss_fn = _loss_fn_for(a)
  params = {"shared": jnp.zeros(N_SH), "head": jnp.zeros((M, N_HEAD))}
  return loss_fn, params, jnp.asarray(b_train[0], jnp.float32), jnp.asarray(b_val[0], jnp.float32)


@pytest.mark.parametrize("name", ["auto_lambda", "moml", "forum"])
def test_train_step_forwards_keyword_arguments(name):
  """step(params, state, *batch, val_batch=...) == the manual task_grads → update pipeline."""
  loss_fn, params, xb, xv = _small()
  method = getattr(mo, name)(loss_fn, num_tasks=M)
  tx = optax.chain(method, optax.sgd(0.1))
  kw = {"val_batch": (xv,)}
  if name == "forum":
    kw["train_batch"] = (xb,)
  step = mo.make_train_step(loss_fn, tx)
  state = tx.init(params)
  new_params, new_state, losses, _ = step(params, state, xb, **kw)
  l_ref, grads = mo.task_grads(loss_fn, params, xb)
  upd, ref_state = jax.jit(lambda g, s, l, kw: tx.update(g, s, params, losses=l, **kw))(
      grads, state, l_ref, kw)
  chex.assert_trees_all_close(new_params, optax.apply_updates(params, upd), rtol=1e-5,
                              atol=1e-6)
  np.testing.assert_allclose(mo.task_weights(new_state), mo.task_weights(ref_state),
                             rtol=1e-5)
  # A second call with new arrays reuses the compiled step.
  step(new_params, new_state, xb + 1.0, **kw)
  assert step._cache_size() == 1


def test_train_step_keyword_errors():
  loss_fn, params, xb, xv = _small()
  tx = optax.chain(mo.mean(num_tasks=M), optax.sgd(0.1))
  step = mo.make_train_step(loss_fn, tx)
  with pytest.raises(ValueError, match="does not use it"):
    step(params, tx.init(params), xb, val_batch=(xv,))
  with pytest.raises(ValueError, match="computed by the step"):
    step(params, tx.init(params), xb, losses=jnp.ones(M))
  tx = optax.chain(mo.auto_lambda(loss_fn, num_tasks=M), optax.sgd(0.1))
  step = mo.make_train_step(loss_fn, tx)
  with pytest.raises(ValueError, match="val_batch"):  # misspelt: ignored, and needed
    step(params, tx.init(params), xb, val_batc=(xv,))


def test_train_step_keyword_arguments_nnx():
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((M, 4)))

    def __call__(self, x):
      return jnp.sum((self.w[...] - x) ** 2, axis=1)

  model = Net()
  graphdef = nnx.graphdef(model)
  val_loss = lambda params, x: nnx.merge(graphdef, params)(x)
  tx = optax.chain(mo.moml(val_loss, num_tasks=M), optax.sgd(0.1))
  opt_state = tx.init(nnx.state(model, nnx.Param))
  step = mo.make_nnx_train_step(lambda mdl, x: mdl(x), tx)
  x, xv = jnp.ones((M, 4)), jnp.full((M, 4), 2.0)
  opt_state, losses, _ = step(model, opt_state, x, val_batch=(xv,))
  np.testing.assert_allclose(losses, 4.0)
  assert np.all(np.asarray(model.w[...]) > 0)


def test_nonfinite_validation_batch_skips_the_step():
  loss_fn, params, xb, xv = _small()
  bad = xv.at[0, 0].set(jnp.nan)
  losses, grads = mo.task_grads(loss_fn, params, xb)
  for tx, kw in [(mo.moml(loss_fn, num_tasks=M), {}),
                 (mo.forum(loss_fn, num_tasks=M), {"train_batch": (xb,)})]:
    state = tx.init(params)
    upd, new = jax.jit(lambda g, s, l, v, kw: tx.update(g, s, params, losses=l, val_batch=(v,),
                                                         **kw))(grads, state, losses, bad, kw)
    for leaf in jax.tree.leaves(upd):
      assert np.all(np.isfinite(leaf))
    chex.assert_trees_all_close(new.inner[:2], state.inner[:2])


def test_errors():
  loss_fn, params, xb, xv = _small()
  _, grads = mo.task_grads(loss_fn, params, xb)
  losses = jnp.ones(M)
  for make in (mo.moml, mo.forum):
    with pytest.raises(ValueError, match="num_tasks"):
      make(loss_fn)
    with pytest.raises(ValueError, match="callable"):
      make(3.0, num_tasks=M)
  tx = mo.moml(loss_fn, num_tasks=M)
  st = tx.init(params)
  with pytest.raises(ValueError, match="val_batch"):
    tx.update(grads, st, params)
  with pytest.raises(ValueError, match="parameters"):
    tx.update(grads, st, None, val_batch=(xv,))
  bad = mo.moml(lambda p, b: jnp.sum(_to_vec(p)) * jnp.ones(2), num_tasks=M)
  with pytest.raises(ValueError, match=r"\(3,\) task losses"):
    bad.update(grads, bad.init(params), params, val_batch=(xv,))
  tx = mo.forum(loss_fn, num_tasks=M)
  st = tx.init(params)
  with pytest.raises(ValueError, match="train_batch"):
    tx.update(grads, st, params, losses=losses, val_batch=(xv,))
  with pytest.raises(ValueError, match="losses"):
    tx.update(grads, st, params, train_batch=(xb,), val_batch=(xv,))
  with pytest.raises(ValueError, match="inner_steps"):
    mo.forum(loss_fn, inner_steps=0, num_tasks=M)
  with pytest.raises(ValueError, match="phi"):
    mo.forum(loss_fn, phi=0.0, num_tasks=M)
  with pytest.raises(ValueError, match="inner_lr"):
    mo.moml(loss_fn, inner_lr=-1.0, num_tasks=M)
