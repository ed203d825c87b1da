"""Loss-based weightings: UW, DWA, RLW, SI, GLS, STCH, GradNorm (FAMO: test_famo.py).

Every method is checked step by step (≥ 5 consecutive updates, inner state
included) against an independent NumPy implementation of the paper / reference
code, jitted and not (chex.variants), plus reproducibility (same seed → same
bits, different seed → different draws, state save/restore), the shared
properties of tests/properties.py and clear errors.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import mtl_optax as mo
from tests import properties as P
from tests.registry import ENTRIES

M, N = 3, 5


@contextlib.contextmanager
def x64():
  with jax.enable_x64(True):
    yield


def problem(steps, m=M, n=N, seed=0):
  """A sequence of (J_t, L_t): Gaussian Jacobians and positive, drifting losses."""
  rng = np.random.default_rng(seed)
  js = [rng.standard_normal((m, n)) * rng.uniform(0.5, 3.0, (m, 1)) for _ in range(steps)]
  ls = [rng.uniform(0.2, 3.0, m) * 0.9 ** t for t in range(steps)]
  return js, ls


def run(tx, js, ls, extras=None, variant=None, dtype=jnp.float64):
  """Applies tx to the sequence; returns [(d, w, state)] after each step."""
  params = {"w": jnp.zeros(js[0].shape[1:], dtype)}
  state = tx.init(params)
  fn = lambda g, s, l, kw: tx.update({"w": g}, s, params, losses=l, **kw)
  fn = variant(fn) if variant is not None else fn
  out = []
  for t, (j, l) in enumerate(zip(js, ls)):
    kw = {} if extras is None else extras[t]
    upd, state = fn(jnp.asarray(j, dtype), state, jnp.asarray(l, dtype), kw)
    out.append((np.asarray(upd["w"]), np.asarray(mo.task_weights(state)), state))
  return out


class NpAdam:
  """Adam as torch.optim.Adam (L2 weight decay added to the gradient)."""

  def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
    self.t, self.m, self.v = 0, 0.0, 0.0

  def step(self, p, g):
    g = g + self.wd * p
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    m_hat = self.m / (1 - self.b1 ** self.t)
    v_hat = self.v / (1 - self.b2 ** self.t)
    return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def np_softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def assert_steps(got, want_w, js, rtol=1e-9, atol=1e-12):
  assert len(got) == len(want_w) >= 5
  for t, ((d, w, _), w_ref) in enumerate(zip(got, want_w)):
    np.testing.assert_allclose(w, w_ref, rtol=rtol, atol=atol, err_msg=f"weights, step {t}")
    np.testing.assert_allclose(d, np.asarray(w_ref) @ js[t], rtol=rtol, atol=atol,
                               err_msg=f"update, step {t}")


# ---------------------------------------------------------------------------
# NumPy references (written from the papers / reference code, not from ours).
# ---------------------------------------------------------------------------

def ref_uw(ls, lr, s0=-0.5):
  """Kendall et al. as in LibMTL: loss Σ L/(2e^s) + s/2, s trained by Adam."""
  s, opt, ws, ss = np.full(len(ls[0]), s0), NpAdam(lr), [], []
  for l in ls:
    w = 1.0 / (2.0 * np.exp(s))
    ws.append(w)
    ss.append(s.copy())
    grad = -l / (2.0 * np.exp(s)) + 0.5
    s = opt.step(s, grad)
  return ws, ss, s


def ref_dwa(ls, epochs, temperature):
  """MTAN / LibMTL: w = m softmax((L̄(e-1)/L̄(e-2))/T) from epoch-mean losses, 1 in epochs 0, 1."""
  m = len(ls[0])
  order = list(dict.fromkeys(epochs))  # epochs in order of appearance
  means = {e: np.mean([l for l, ee in zip(ls, epochs) if ee == e], axis=0) for e in order}
  ws = []
  for e in epochs:
    k = order.index(e)
    if k < 2:
      ws.append(np.ones(m))
    else:
      r = means[order[k - 1]] / means[order[k - 2]]
      ws.append(m * np_softmax(r / temperature))
  return ws


def ref_stch(ls, epochs, mu, warmup):
  """Xi-L/STCH: log-loss warm-up; nadir = mean losses of epoch `warmup`; then m μ LSE(log(L/z)/μ)."""
  m = len(ls[0])
  order = list(dict.fromkeys(epochs))
  ws, nadir = [], None
  for l, e in zip(ls, epochs):
    k = order.index(e)
    if k <= warmup:
      ws.append(1.0 / l)
    else:
      if nadir is None:
        nadir = np.mean([ll for ll, ee in zip(ls, epochs) if ee == order[warmup]], axis=0)
      # d/dL_i of m μ log Σ exp(log(L_j/z_j)/μ) = m p_i / L_i.
      p = np_softmax(np.log(l / nadir) / mu)
      ws.append(m * p / l)
  return ws, nadir


def ref_gradnorm(js, ls, alpha, lr, l0_mode="first_step", epochs=None):
  """Chen et al. with LibMTL's w = m softmax(s) and L1 target loss, s trained by Adam."""
  m = len(ls[0])
  s, opt, ws = np.zeros(m), NpAdam(lr), []
  l0 = None
  order = list(dict.fromkeys(epochs)) if epochs is not None else None
  for t, (j, l) in enumerate(zip(js, ls)):
    if l0_mode == "first_step":
      l0 = l if l0 is None else l0
    elif order.index(epochs[t]) >= 1 and l0 is None:
      l0 = np.mean([ll for ll, ee in zip(ls, epochs) if ee == order[0]], axis=0)
    if l0 is None:  # LibMTL: equal weights, s untouched during epoch 0
      ws.append(np.ones(m))
      continue
    z = np_softmax(s)
    w = m * z
    ws.append(w)
    norms = np.linalg.norm(j, axis=1)
    g = w * norms
    ratio = (l / l0) / np.mean(l / l0)
    target = np.mean(g) * ratio ** alpha               # a constant for the gradient
    dloss_dw = np.sign(g - target) * norms
    jac = m * (np.diag(z) - np.outer(z, z))            # ∂w/∂s
    s = opt.step(s, jac.T @ dloss_dw)
  return ws, s


# ---------------------------------------------------------------------------
# Step-by-step agreement, jit and no-jit.
# ---------------------------------------------------------------------------

class AgreesWithNumPy(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_uncertainty_weighting(self):
    with x64():
      js, ls = problem(7)
      tx = mo.uncertainty_weighting(learning_rate=0.05, num_tasks=M)
      got = run(tx, js, ls, variant=self.variant)
      ws, ss, s_final = ref_uw(ls, 0.05)
      assert_steps(got, ws, js)
      for (_, _, st), s in zip(got, ss):
        np.testing.assert_allclose(mo.diagnostics(st)["log_variances"], s, rtol=1e-9)
      np.testing.assert_allclose(got[-1][2].inner.log_vars, s_final, rtol=1e-9)
      assert not np.allclose(ws[-1], ws[0])  # s really moved

  @chex.variants(with_jit=True, without_jit=True)
  def test_dwa_with_epoch_argument(self):
    with x64():
      epochs = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4]
      js, ls = problem(len(epochs))
      ls = [l * np.array([1.0, 0.7, 1.3]) ** e for l, e in zip(ls, epochs)]  # uneven rates
      tx = mo.dwa(temperature=2.0, num_tasks=M)
      got = run(tx, js, ls, [{"epoch": e} for e in epochs], variant=self.variant)
      ws = ref_dwa(ls, epochs, 2.0)
      assert_steps(got, ws, js)
      assert not np.allclose(ws[-1], 1.0)
      st = got[-1][2].inner
      assert int(st.completed) == 4 and int(st.epoch) == 4
      np.testing.assert_allclose(st.last_mean, np.mean(ls[8:10], axis=0), rtol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_stch(self):
    with x64():
      epochs = [0, 0, 1, 1, 1, 2, 2, 3, 3, 4]
      js, ls = problem(len(epochs), seed=3)
      tx = mo.stch(mu=0.5, warmup_epochs=1, num_tasks=M)
      got = run(tx, js, ls, [{"epoch": e} for e in epochs], variant=self.variant)
      ws, nadir = ref_stch(ls, epochs, 0.5, warmup=1)
      assert_steps(got, ws, js)
      np.testing.assert_allclose(mo.diagnostics(got[-1][2])["nadir"], nadir, rtol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradnorm(self):
    with x64():
      js, ls = problem(8, seed=5)
      tx = mo.gradnorm(alpha=1.5, learning_rate=0.1, num_tasks=M)
      got = run(tx, js, ls, variant=self.variant)
      ws, s = ref_gradnorm(js, ls, 1.5, 0.1)
      assert_steps(got, ws, js)
      np.testing.assert_allclose(got[-1][2].inner.logits, s, rtol=1e-9, atol=1e-12)
      assert np.ptp(ws[-1]) > 0.1  # the weights really moved

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradnorm_first_epoch(self):
    with x64():
      epochs = [0, 0, 0, 1, 1, 1, 2, 2]
      js, ls = problem(len(epochs), seed=6)
      tx = mo.gradnorm(alpha=0.5, learning_rate=0.1, initial_loss="first_epoch", num_tasks=M)
      got = run(tx, js, ls, [{"epoch": e} for e in epochs], variant=self.variant)
      ws, s = ref_gradnorm(js, ls, 0.5, 0.1, "first_epoch", epochs)
      assert_steps(got, ws, js)
      np.testing.assert_allclose(got[-1][2].inner.logits, s, rtol=1e-9, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_scale_invariant_and_geometric(self):
    with x64():
      js, ls = problem(5, seed=7)
      got = run(mo.scale_invariant(num_tasks=M), js, ls, variant=self.variant)
      assert_steps(got, [1.0 / l for l in ls], js)
      got = run(mo.geometric_loss(num_tasks=M), js, ls, variant=self.variant)
      assert_steps(got, [np.prod(l) ** (1 / M) / (M * l) for l in ls], js)

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_loss_weighting_draws(self):
    # The draws follow the documented key schedule: key, sub = split(key); draw(sub).
    # (The other distributions are checked statistically below.)
    with x64():
      js, ls = problem(6)
      tx = mo.random_loss_weighting("normal", seed=42, num_tasks=M)
      got = run(tx, js, ls, variant=self.variant)
      key, ws = jax.random.PRNGKey(42), []
      for _ in ls:
        key, sub = jax.random.split(key)
        ws.append(np_softmax(np.asarray(jax.random.normal(sub, (M,), jnp.float64))))
      assert_steps(got, ws, js, rtol=1e-12)


# ---------------------------------------------------------------------------
# Epoch API.
# ---------------------------------------------------------------------------

def test_steps_per_epoch_equals_epoch_argument(x64):
  js, ls = problem(9, seed=2)
  ls = [l * np.array([1.0, 0.5, 1.5]) ** (t // 2) for t, l in enumerate(ls)]
  a = run(mo.dwa(num_tasks=M, steps_per_epoch=2), js, ls)
  b = run(mo.dwa(num_tasks=M), js, ls, [{"epoch": t // 2} for t in range(9)])
  for (da, wa, _), (db, wb, _) in zip(a, b):
    np.testing.assert_array_equal(wa, wb)
    np.testing.assert_array_equal(da, db)
  assert not np.allclose(a[-1][1], 1.0)


def test_epoch_boundary_survives_a_skipped_step(x64):
  """A non-finite step is skipped; the epoch change is still seen at the next applied step."""
  js, ls = problem(8, seed=4)
  epochs = [0, 0, 1, 1, 2, 2, 3, 3]
  ls_bad = [l.copy() for l in ls]
  ls_bad[4] = np.array([np.nan, 1.0, 1.0])   # first step of epoch 2 is skipped
  got = run(mo.dwa(num_tasks=M), js, ls_bad, [{"epoch": e} for e in epochs])
  keep = [t for t in range(8) if t != 4]
  ws = ref_dwa([ls[t] for t in keep], [epochs[t] for t in keep], 2.0)
  assert np.all(got[4][0] == 0.0)
  for t, w in zip(keep, ws):
    np.testing.assert_allclose(got[t][1], w, rtol=1e-12)


def test_without_epochs_dwa_keeps_unit_weights(x64):
  js, ls = problem(5)
  for d, w, _ in run(mo.dwa(num_tasks=M), js, ls):
    np.testing.assert_array_equal(w, np.ones(M))


def test_epoch_argument_validation():
  tx = mo.dwa(num_tasks=2)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="epoch= must be an integer scalar"):
    tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params, losses=jnp.ones(2),
              epoch=jnp.ones(2, jnp.int32))


# ---------------------------------------------------------------------------
# RLW distributions and randomness.
# ---------------------------------------------------------------------------

def _draws(tx, steps, m):
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.ones((m, 2))}
  l = jnp.ones(m)

  def body(state, _):
    _, state = tx.update(g, state, params, losses=l)
    return state, mo.task_weights(state)

  _, ws = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(tx.init(params))
  return np.asarray(ws, np.float64)


@pytest.mark.parametrize("dist", ["normal", "uniform", "dirichlet", "bernoulli",
                                  "constrained_bernoulli"])
def test_rlw_distributions(dist):
  m = 4
  ws = _draws(mo.random_loss_weighting(dist, seed=1, num_tasks=m), 2000, m)
  np.testing.assert_allclose(ws.sum(axis=1), 1.0, rtol=1e-5)
  assert np.all(ws >= 0)
  np.testing.assert_allclose(ws.mean(axis=0), 1.0 / m, atol=0.02)  # exchangeable tasks
  assert len(np.unique(ws[:, 0])) > 2 if dist not in ("constrained_bernoulli",) else True
  if dist == "dirichlet":  # Dirichlet(1): each marginal is Beta(1, m − 1)
    assert stats.kstest(ws[:, 0], stats.beta(1, m - 1).cdf).pvalue > 1e-3
  if dist == "normal":  # w_0 = softmax(z)_0 with z ~ N(0, I)
    z = np.random.default_rng(0).standard_normal((20000, m))
    ref = np.exp(z[:, 0]) / np.exp(z).sum(1)
    assert stats.ks_2samp(ws[:, 0], ref).pvalue > 1e-3
  if dist == "constrained_bernoulli":
    assert set(np.unique(ws)) == {0.0, 1.0}
  if dist == "bernoulli":
    nonzero = (ws > 0).sum(1)
    assert nonzero.min() >= 1
    # b ~ Bernoulli(1/2)^m conditioned on b ≠ 0: P(k nonzero) = C(m, k) / (2^m − 1).
    freq = np.bincount(nonzero, minlength=m + 1)[1:] / len(ws)
    expected = np.array([stats.binom.pmf(k, m, 0.5) for k in range(1, m + 1)]) / (1 - 0.5 ** m)
    np.testing.assert_allclose(freq, expected, atol=0.04)


def test_rlw_seeds_and_sum_to():
  m = 3
  a = _draws(mo.random_loss_weighting(seed=0, num_tasks=m), 20, m)
  b = _draws(mo.random_loss_weighting(seed=0, num_tasks=m), 20, m)
  c = _draws(mo.random_loss_weighting(seed=1, num_tasks=m), 20, m)
  np.testing.assert_array_equal(a, b)                 # same seed: bit-identical
  assert not np.any(np.all(np.isclose(a, c), axis=1))  # different seed: different draws
  assert len({tuple(r) for r in a}) == 20               # a fresh draw at every step
  d = _draws(mo.random_loss_weighting(seed=0, sum_to="num_tasks", num_tasks=m), 20, m)
  np.testing.assert_allclose(d, m * a, rtol=1e-6)


# ---------------------------------------------------------------------------
# Reproducibility: save / restore of the state in the middle of a run.
# ---------------------------------------------------------------------------

STATEFUL = {
    "uncertainty_weighting": lambda: mo.uncertainty_weighting(learning_rate=0.05, num_tasks=M),
    "dwa": lambda: mo.dwa(steps_per_epoch=1, num_tasks=M),
    "random_loss_weighting": lambda: mo.random_loss_weighting("dirichlet", seed=3, num_tasks=M),
    "stch": lambda: mo.stch(warmup_epochs=0, steps_per_epoch=1, num_tasks=M),
    "gradnorm": lambda: mo.gradnorm(learning_rate=0.1, num_tasks=M),
    "famo": lambda: mo.famo(num_tasks=M),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_round_trip_is_bit_identical(name):
  tx = STATEFUL[name]()
  js, ls = problem(8, seed=9)
  params = {"w": jnp.zeros(N)}
  step = jax.jit(lambda g, s, l: tx.update({"w": g}, s, params, losses=l))
  state, straight = tx.init(params), []
  for j, l in zip(js, ls):
    upd, state = step(jnp.asarray(j, jnp.float32), state, jnp.asarray(l, jnp.float32))
    straight.append(np.asarray(upd["w"]))
  state, resumed = tx.init(params), []
  for t, (j, l) in enumerate(zip(js, ls)):
    if t == 4:  # "checkpoint": to host NumPy arrays and back
      leaves, treedef = jax.tree_util.tree_flatten(state)
      state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(np.array(x)) for x in leaves])
    upd, state = step(jnp.asarray(j, jnp.float32), state, jnp.asarray(l, jnp.float32))
    resumed.append(np.asarray(upd["w"]))
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a, b)
  assert step._cache_size() == 1  # restored state has the same structure and dtypes



@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_stateful_update_with_donated_state(name):
  """``jax.jit(tx.update, donate_argnums=(1,))`` works and changes nothing.

  Every leaf of a state must own its buffer: leaves sharing one array (e.g. a
  zeros vector reused for several fields) cannot be donated. The chain that
  donates its state is compared with one that only donates fresh copies.
  """
  entry = ENTRIES[name]
  m = max(M, entry.min_tasks)
  tx = entry.build(m)
  params = {"w": jnp.zeros(N)}
  state = tx.init(params)
  if not jax.tree_util.tree_leaves(state.inner):
    pytest.skip("stateless method")
  extra = entry.extra(m) if entry.extra is not None else {}
  step = jax.jit(lambda g, s, l, e: tx.update({"w": g}, s, params, losses=l, epoch=e, **extra),
                 donate_argnums=(1,))
  js, ls = problem(4, m=m, seed=5)
  donated, copied = state, jax.tree_util.tree_map(jnp.copy, state)
  for t, (j, l) in enumerate(zip(js, ls)):
    args = (jnp.asarray(j, jnp.float32), jnp.asarray(l, jnp.float32), jnp.int32(t))
    a, donated = step(args[0], donated, *args[1:])
    b, copied = step(args[0], jax.tree_util.tree_map(jnp.copy, copied), *args[1:])
    np.testing.assert_array_equal(a["w"], b["w"])
  chex.assert_trees_all_equal(donated, copied)

def test_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = optax.chain(mo.gradnorm(learning_rate=0.1, num_tasks=M), optax.adam(1e-2))
  js, ls = problem(4, seed=1)
  params = {"w": jnp.zeros(N)}
  step = jax.jit(lambda g, s, l: tx.update({"w": g}, s, params, losses=l))
  state = tx.init(params)
  for j, l in zip(js[:2], ls[:2]):
    _, state = step(jnp.asarray(j, jnp.float32), state, jnp.asarray(l, jnp.float32))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "state", state)
  for j, l in zip(js[2:], ls[2:]):
    a, state = step(jnp.asarray(j, jnp.float32), state, jnp.asarray(l, jnp.float32))
    b, restored = step(jnp.asarray(j, jnp.float32), restored, jnp.asarray(l, jnp.float32))
    np.testing.assert_array_equal(a["w"], b["w"])


# ---------------------------------------------------------------------------
# Properties (tests/properties.py) and conventions.
# ---------------------------------------------------------------------------

ALL = {
    **STATEFUL,
    "scale_invariant": lambda: mo.scale_invariant(num_tasks=M),
    "geometric_loss": lambda: mo.geometric_loss(num_tasks=M),
}
DETERMINISTIC = sorted(set(ALL) - {"random_loss_weighting"})


@pytest.mark.parametrize("name", sorted(ALL))
def test_structure_weighted_permutation(name, x64):
  tx = ALL[name]()
  base_j = P.normal_matrix(M, 6, seed=11)
  losses = P.losses_for(M, seed=1)
  for _, matrix in P.scaled_matrices(base_j):
    P.assert_structure(tx, matrix, losses)
  # Zero, negative and tiny losses are floored: finite weights and diagnostics.
  for bad in ([0.0, 1.0, 2.0], [-1.0, 0.0, 1e-30], [1e-30, 1e30, 1.0]):
    P.assert_structure(tx, base_j, np.asarray(bad))
  for _, matrix in [("normal", base_j), ("rank1", P.normal_matrix(M, 6, rank=1, seed=2)),
                    ("zero", np.zeros((M, 6))), ("stationary", P.strong_stationary_matrix(M, 6))]:
    P.assert_weighted(tx, matrix, losses)
    if name in DETERMINISTIC:
      P.assert_permutation_invariant(tx, matrix, losses, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(ALL))
def test_loss_based_conventions(name):
  tx = ALL[name]()
  info = mo.aggregator_info(tx)
  assert info.needs_losses and info.weight_heads and info.weighted
  params = {"w": jnp.zeros(N)}
  state = tx.init(params)
  with pytest.raises(ValueError, match="loss-based method.*losses="):
    tx.update({"w": jnp.ones((M, N))}, state, params)
  with pytest.raises(ValueError, match=r"losses must have shape \(m,\)"):
    tx.update({"w": jnp.ones((M, N))}, state, params, losses=jnp.ones(M + 1))


def test_heads_follow_the_weighted_loss():
  """A head leaf gets w_i·(its task's gradient), as when differentiating Σ w_i L_i."""
  tx = mo.scale_invariant(task_specific={"trunk": False, "heads": True})
  params = {"trunk": jnp.zeros(4), "heads": jnp.zeros((M, 2))}
  rng = np.random.default_rng(0)
  g = {"trunk": jnp.asarray(rng.standard_normal((M, 4)), jnp.float32),
       "heads": jnp.zeros((M, M, 2)).at[jnp.arange(M), jnp.arange(M)].set(1.0)}
  losses = jnp.array([0.5, 1.0, 4.0])
  upd, _ = tx.update(g, tx.init(params), params, losses=losses)
  np.testing.assert_allclose(upd["heads"], (1.0 / losses)[:, None] * np.ones((M, 2)), rtol=1e-6)
  tx2 = mo.scale_invariant(task_specific={"trunk": False, "heads": True}, weight_heads=False)
  upd2, _ = tx2.update(g, tx2.init(params), params, losses=losses)
  np.testing.assert_allclose(upd2["heads"], np.ones((M, 2)), rtol=1e-6)


def test_chain_under_jit_with_optax():
  tx = optax.chain(mo.famo(num_tasks=M), optax.adam(1e-2))
  params = {"w": jnp.zeros(N)}
  state = tx.init(params)
  js, ls = problem(3)
  step = jax.jit(lambda g, s, l: tx.update({"w": g}, s, params, losses=l))
  for j, l in zip(js, ls):
    upd, state = step(jnp.asarray(j, jnp.float32), state, jnp.asarray(l, jnp.float32))
  assert upd["w"].shape == (N,) and mo.task_weights(state).shape == (M,)


# ---------------------------------------------------------------------------
# Hyper-parameter errors.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: mo.uncertainty_weighting(), "num_tasks"),
    (lambda: mo.dwa(), "num_tasks"),
    (lambda: mo.famo(), "num_tasks"),
    (lambda: mo.stch(), "num_tasks"),
    (lambda: mo.gradnorm(), "num_tasks"),
    (lambda: mo.uncertainty_weighting(learning_rate=0.0, num_tasks=2), "learning_rate"),
    (lambda: mo.uncertainty_weighting(init_log_var=float("nan"), num_tasks=2), "init_log_var"),
    (lambda: mo.uncertainty_weighting(optimizer="rmsprop", num_tasks=2), "optimizer"),
    (lambda: mo.dwa(temperature=-1.0, num_tasks=2), "temperature"),
    (lambda: mo.dwa(steps_per_epoch=0, num_tasks=2), "steps_per_epoch"),
    (lambda: mo.random_loss_weighting("cauchy"), "distribution"),
    (lambda: mo.random_loss_weighting(sum_to="two"), "sum_to"),
    (lambda: mo.random_loss_weighting("dirichlet", concentration=0.0), "concentration"),
    (lambda: mo.scale_invariant(eps=0.0), "eps"),
    (lambda: mo.geometric_loss(eps=-1.0), "eps"),
    (lambda: mo.famo(weight_decay=-1.0, num_tasks=2), "weight_decay"),
    (lambda: mo.famo(min_losses=[0.0], num_tasks=2), "min_losses"),
    (lambda: mo.stch(mu=0.0, num_tasks=2), "mu"),
    (lambda: mo.stch(warmup_epochs=-1, num_tasks=2), "warmup_epochs"),
    (lambda: mo.gradnorm(alpha=0.0, num_tasks=2), "alpha"),
    (lambda: mo.gradnorm(initial_loss="zero", num_tasks=2), "initial_loss"),
])
def test_bad_hyperparameters(make, match):
  with pytest.raises(ValueError, match=match):
    make()
