"""gradvac, graddrop, moco, db_mtl, excess_mtl: NumPy references over several steps.

Each method runs 5 consecutive steps (state carried) under jit and without,
in float64, against an independent NumPy implementation of the paper/LibMTL
update written here; plus seeds, state save/restore, heads, properties and
errors.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from tests import properties as P
from tests.references import simplex_projection_ref

M, N, STEPS = 3, 10, 5
PARAMS_SHAPES = {"a": (2, 3), "b": (4,)}


def params64():
  return {k: jnp.zeros(s, jnp.float64) for k, s in PARAMS_SHAPES.items()}


def stack(j):
  """(m, 10) matrix -> stacked pytree {"a": (m, 2, 3), "b": (m, 4)}."""
  j = jnp.asarray(j)
  return {"a": j[:, :6].reshape(j.shape[0], 2, 3), "b": j[:, 6:]}


def flat(u):
  return np.concatenate([np.asarray(u["a"]).ravel(), np.asarray(u["b"]).ravel()])


def sequence(seed=0, m=M, n=N, steps=STEPS):
  """Random Jacobians (with conflicts, varying scales) and positive losses."""
  rng = np.random.default_rng(seed)
  js = [rng.standard_normal((m, n)) * rng.uniform(0.5, 3.0, (m, 1)) for _ in range(steps)]
  ls = [rng.uniform(0.3, 3.0, m) for _ in range(steps)]
  return js, ls


def run(variant, tx, js, ls, params=None, **extra):
  """Runs len(js) steps of tx (through ``variant``); returns flat updates and states."""
  params = params64() if params is None else params
  state = tx.init(params)
  step = variant(lambda g, s, l: tx.update(g, s, params, losses=l, **extra))
  outs, states = [], []
  for j, l in zip(js, ls):
    upd, state = step(stack(j), state, None if l is None else jnp.asarray(l))
    outs.append(flat(upd))
    states.append(state)
  return outs, states


def orders_for(seed, steps, m):
  """The per-step random task orders drawn by gradvac/pcgrad from ``seed``."""
  key = jax.random.PRNGKey(seed)
  out = []
  for _ in range(steps):
    key, sub = jax.random.split(key)
    out.append(np.asarray(jax.vmap(lambda k: jax.random.permutation(k, m))(
        jax.random.split(sub, m))))
  return out


# ---------------------------------------------------------------------------
# Independent NumPy references.
# ---------------------------------------------------------------------------

def gradvac_ref(j, targets, order, beta):
  """One GradVac step on the rows of j (LibMTL's loop, exact norms)."""
  m = j.shape[0]
  pc = j.copy()
  targets = targets.copy()
  for i in range(m):
    for jj in order[i]:
      if jj == i:
        continue
      ni, nj = np.linalg.norm(pc[i]), np.linalg.norm(j[jj])
      phi = pc[i] @ j[jj] / (ni * nj)
      t = targets[i, jj]
      if phi < t:
        w = ni * (t * np.sqrt(1 - phi ** 2) - phi * np.sqrt(1 - t ** 2)) / (nj * np.sqrt(1 - t ** 2))
        pc[i] = pc[i] + w * j[jj]
      targets[i, jj] = (1 - beta) * t + beta * phi
  return pc.sum(0), targets


def graddrop_ref(j, u, leak):
  purity = 0.5 * (1 + j.sum(0) / np.abs(j).sum(0))
  out = np.zeros(j.shape[1])
  for i in range(j.shape[0]):
    mask = ((purity > u) & (j[i] > 0)) | ((purity < u) & (j[i] < 0))
    out += (leak[i] + (1 - leak[i]) * mask) * j[i]
  return out


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def moco_ref(js, ls, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0,
             normalization="loss", lambda_update="softmax"):
  m, n = js[0].shape
  y, lam, outs = np.zeros((m, n)), np.full(m, 1.0 / m), []
  for k, (j, l) in enumerate(zip(js, ls), start=1):
    if normalization == "loss":
      g = j / np.linalg.norm(j, axis=1, keepdims=True) * l[:, None]
    else:
      g = j
    y = y - beta / k ** beta_sigma * (y - g)
    step = lam - gamma / k ** gamma_sigma * (y @ y.T + rho * np.eye(m)) @ lam
    lam = softmax(step) if lambda_update == "softmax" else simplex_projection_ref(step)
    outs.append(y.T @ lam)
  return outs


def db_mtl_ref(js, ls, beta=0.9, beta_sigma=0.0, eps=1e-8):
  m, n = js[0].shape
  buf, outs = np.zeros((m, n)), []
  for k, (j, l) in enumerate(zip(js, ls), start=1):
    g = j / (l + eps)[:, None]            # ∇ log(L + eps)
    buf = g + beta / k ** beta_sigma * (buf - g)
    norms = np.linalg.norm(buf, axis=1)
    alpha = norms.max() / norms
    outs.append(alpha @ buf)
  return outs


def excess_mtl_ref(js, step_size=1e-2, eps=1e-7):
  m, n = js[0].shape
  acc, lw, w0, outs, weights = np.zeros((m, n)), np.ones(m), None, [], []
  for j in js:
    acc = acc + j ** 2
    w = np.array([j[i] / np.sqrt(acc[i] + eps) @ j[i] for i in range(m)])
    if w0 is None:
      w0 = w
    else:
      lw = lw * np.exp(step_size * w / w0)
      lw = lw / lw.sum() * m
    outs.append(lw @ j)
    weights.append(lw.copy())
  return outs, weights


# ---------------------------------------------------------------------------
# Multi-step agreement, jit and no-jit.
# ---------------------------------------------------------------------------

class ReferenceAgreement(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradvac_whole_model(self):
    with jax.enable_x64(True):
      js, ls = sequence(1)
      beta, seed = 0.5, 3
      outs, states = run(self.variant, mo.gradvac(beta, seed=seed, num_tasks=M), js, ls)
      targets = np.zeros((M, M))
      for j, order, out, st in zip(js, orders_for(seed, STEPS, M), outs, states):
        want, targets = gradvac_ref(j, targets, order, beta)
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(st.inner.targets[0], targets, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mo.task_weights(st) @ j, want, rtol=1e-10, atol=1e-10)
      assert np.any(targets != 0)

  @chex.variants(with_jit=True)  # the no-jit path is the whole-model test's
  def test_gradvac_per_leaf(self):
    with jax.enable_x64(True):
      js, ls = sequence(2)
      beta, seed = 0.3, 5
      outs, _ = run(self.variant, mo.gradvac(beta, group="leaf", seed=seed, num_tasks=M), js, ls)
      ta, tb = np.zeros((M, M)), np.zeros((M, M))
      for j, order, out in zip(js, orders_for(seed, STEPS, M), outs):
        wa, ta = gradvac_ref(j[:, :6], ta, order, beta)
        wb, tb = gradvac_ref(j[:, 6:], tb, order, beta)
        np.testing.assert_allclose(out, np.concatenate([wa, wb]), rtol=1e-10, atol=1e-10)

  @chex.variants(with_jit=True, without_jit=True)
  def test_graddrop(self):
    with jax.enable_x64(True):
      js, ls = sequence(3)
      leak = [0.0, 0.2, 0.5]
      seed = 7
      outs, _ = run(self.variant, mo.graddrop(leak, seed=seed), js, ls)
      key = jax.random.PRNGKey(seed)
      for j, out in zip(js, outs):
        key, sub = jax.random.split(key)
        ua = np.asarray(jax.random.uniform(jax.random.fold_in(sub, 0), (2, 3), jnp.float64))
        ub = np.asarray(jax.random.uniform(jax.random.fold_in(sub, 1), (4,), jnp.float64))
        want = graddrop_ref(j, np.concatenate([ua.ravel(), ub]), np.asarray(leak))
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_moco(self):
    with jax.enable_x64(True):
      js, ls = sequence(4)
      outs, states = run(self.variant, mo.moco(num_tasks=M), js, ls)
      for out, want in zip(outs, moco_ref(js, ls)):
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
      assert not np.allclose(mo.diagnostics(states[-1])["lambda"], 1.0 / M)

  @chex.variants(with_jit=True, without_jit=True)
  def test_moco_paper_variant(self):
    with jax.enable_x64(True):
      js, ls = sequence(5)
      tx = mo.moco(beta=0.7, beta_sigma=0.0, gamma=0.05, gamma_sigma=0.0, rho=0.1,
                   normalization="none", lambda_update="projection", num_tasks=M)
      outs, _ = run(self.variant, tx, js, [None] * STEPS)
      want = moco_ref(js, ls, 0.7, 0.0, 0.05, 0.0, 0.1, "none", "projection")
      for out, w in zip(outs, want):
        np.testing.assert_allclose(out, w, rtol=1e-9, atol=1e-11)

  @chex.variants(with_jit=True, without_jit=True)
  def test_db_mtl(self):
    with jax.enable_x64(True):
      js, ls = sequence(6)
      for tx, kw in [(mo.db_mtl(num_tasks=M), {}),
                     (mo.db_mtl(beta=0.6, beta_sigma=0.5, num_tasks=M),
                      {"beta": 0.6, "beta_sigma": 0.5})]:
        outs, states = run(self.variant, tx, js, ls)
        for out, want in zip(outs, db_mtl_ref(js, ls, **kw)):
          np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_excess_mtl(self):
    with jax.enable_x64(True):
      js, ls = sequence(7)
      # A large step size makes the weights move visibly within 5 steps.
      outs, states = run(self.variant, mo.excess_mtl(robust_step_size=0.5, num_tasks=M), js, ls)
      want_outs, want_w = excess_mtl_ref(js, step_size=0.5)
      for out, st, want, w in zip(outs, states, want_outs, want_w):
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mo.task_weights(st), w, rtol=1e-10)
      assert np.ptp(want_w[-1]) > 1e-3


# ---------------------------------------------------------------------------
# Relations to other methods and limiting cases.
# ---------------------------------------------------------------------------

def test_gradvac_first_step_is_pcgrad_and_targets_matter():
  j = P.normal_matrix(4, 6, seed=9)
  tx = mo.gradvac(seed=11, num_tasks=4)
  d, state = P.aggregate(tx, j)
  np.testing.assert_allclose(d, P.aggregate(mo.pcgrad(seed=11), j)[0], rtol=1e-5, atol=1e-6)
  # With a positive target the correction goes beyond PCGrad's cos = 0.
  params = {"w": jnp.zeros(6)}
  s = state._replace(inner=state.inner._replace(targets=jnp.full((1, 4, 4), 0.5)))
  d2, _ = P._jitted(tx)({"w": jnp.asarray(j)}, s, params, {})  # reuses the compiled update
  assert not np.allclose(np.asarray(d2["w"]), d, atol=1e-3)


def test_graddrop_single_task_and_consistent_signs_keep_everything():
  g = np.array([[1.0, -2.0, 0.5, 0.0, 3.0]])
  np.testing.assert_allclose(P.aggregate(mo.graddrop(), g)[0], g[0])
  j = np.abs(P.normal_matrix(3, 5, seed=1)) * np.array([1, -1, 1, -1, 1])  # same signs per column
  np.testing.assert_allclose(P.aggregate(mo.graddrop(), j)[0], j.sum(0), rtol=1e-6)
  # Full leak is the plain sum.
  k = P.normal_matrix(3, 5, seed=2)
  np.testing.assert_allclose(P.aggregate(mo.graddrop(1.0), k)[0], k.sum(0), rtol=1e-6)


def test_graddrop_keeps_one_sign_per_coordinate():
  j = P.normal_matrix(4, 200, seed=3)
  d, _ = P.aggregate(mo.graddrop(seed=1), j)
  pos = np.where(j > 0, j, 0).sum(0)
  neg = np.where(j < 0, j, 0).sum(0)
  assert np.all(np.isclose(d, pos, atol=1e-6) | np.isclose(d, neg, atol=1e-6))
  # Both signs occur, with frequency following the purity: E[d] = P·pos + (1 − P)·neg.
  assert 0 < np.mean(np.isclose(d, pos, atol=1e-6)) < 1


def test_graddrop_batch_marginalisation_with_input_signs():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    rep = rng.standard_normal((3, 5, 4))          # (m, batch, features)
    x = rng.standard_normal((5, 4))               # the layer's inputs
    tx = mo.graddrop(0.1, batch_axis=0, seed=2)
    upd, _ = tx.update({"z": jnp.asarray(rep)}, tx.init({"z": jnp.zeros((5, 4))}),
                       inputs={"z": jnp.asarray(x)})
    key, sub = jax.random.split(jax.random.PRNGKey(2))
    u = np.asarray(jax.random.uniform(jax.random.fold_in(sub, 0), (4,), jnp.float64))
    stat = (rep * np.sign(x)[None]).sum(1)        # (m, features)
    purity = 0.5 * (1 + stat.sum(0) / np.abs(stat).sum(0))
    want = np.zeros((5, 4))
    for i in range(3):
      mask = ((purity > u) & (stat[i] > 0)) | ((purity < u) & (stat[i] < 0))
      want += (0.1 + 0.9 * mask)[None] * rep[i]
    np.testing.assert_allclose(np.asarray(upd["z"]), want, rtol=1e-12)


def test_db_mtl_is_scale_balanced():
  j = P.normal_matrix(3, 6, seed=4)
  losses = np.array([0.5, 1.0, 2.0])
  d1, s1 = P.aggregate(mo.db_mtl(num_tasks=3), j, losses)
  # Rescaling one task's loss (and hence its gradient) leaves the update unchanged.
  c = np.array([1.0, 1e3, 1e-3])
  d2, _ = P.aggregate(mo.db_mtl(num_tasks=3), c[:, None] * j, c * losses)
  np.testing.assert_allclose(d2, d1, rtol=1e-4, atol=1e-6)
  alpha = np.asarray(mo.diagnostics(s1)["alpha"])
  norms = np.asarray(mo.diagnostics(s1)["buffer_norms"])
  np.testing.assert_allclose(alpha * norms, norms.max(), rtol=1e-5)


def test_rescaled_tasks_do_not_overflow_float32():
  """Rows from 1e-30 to 1e30 in float32: finite, and equal to the float64 result."""
  j = P.normal_matrix(3, 6, seed=5) * np.array([1e-30, 1.0, 1e30])[:, None]
  losses = np.array([1e-3, 1.0, 1e3])
  for make in [lambda: mo.db_mtl(num_tasks=3), lambda: mo.moco(num_tasks=3),
               lambda: mo.excess_mtl(num_tasks=3)]:
    tx = make()
    params = {"w": jnp.zeros(6, jnp.float32)}
    state = tx.init(params)
    outs = []
    for _ in range(2):
      upd, state = tx.update({"w": jnp.asarray(j, jnp.float32)}, state, params,
                             losses=jnp.asarray(losses, jnp.float32))
      outs.append(np.asarray(upd["w"], np.float64))
    with jax.enable_x64(True):
      tx64 = make()
      p64 = {"w": jnp.zeros(6, jnp.float64)}
      s64 = tx64.init(p64)
      for out in outs:
        u64, s64 = tx64.update({"w": jnp.asarray(j)}, s64, p64, losses=jnp.asarray(losses))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, np.asarray(u64["w"]), rtol=1e-4)


# ---------------------------------------------------------------------------
# Heads.
# ---------------------------------------------------------------------------

def stacked_with_heads(m=3, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  return {"trunk": jax.random.normal(k[0], (m, 5)),
          "heads": jax.vmap(lambda i, g: jnp.zeros((m, 2)).at[i].set(g))(
              jnp.arange(m), jax.random.normal(k[1], (m, 2)))}


HEADS = {"trunk": False, "heads": True}


@pytest.mark.parametrize("name", ["gradvac", "graddrop", "moco", "db_mtl", "excess_mtl"])
def test_heads(name):
  g = stacked_with_heads()
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
  losses = jnp.array([0.5, 1.0, 2.0])
  tx = getattr(mo, name)(task_specific=HEADS, num_tasks=3)
  upd, state = tx.update(g, tx.init(params), params, losses=losses)
  heads = np.asarray(g["heads"])
  if name == "db_mtl":  # ∇ log L_i
    want = np.tensordot(1.0 / (np.asarray(losses) + 1e-8), heads, 1)
  elif name == "excess_mtl":  # weighted like the losses
    want = np.tensordot(np.asarray(mo.task_weights(state)), heads, 1)
  else:  # gradient methods: each head its own gradient
    want = heads.sum(0)
  np.testing.assert_allclose(np.asarray(upd["heads"]), want, rtol=1e-6)
  if name == "db_mtl":
    tx = mo.db_mtl(task_specific=HEADS, weight_heads=False, num_tasks=3)
    upd, _ = tx.update(g, tx.init(params), params, losses=losses)
    np.testing.assert_allclose(np.asarray(upd["heads"]), heads.sum(0), rtol=1e-6)


# ---------------------------------------------------------------------------
# Seeds and state round trips.
# ---------------------------------------------------------------------------

STATEFUL = {
    "gradvac": lambda seed: mo.gradvac(seed=seed, num_tasks=4),
    "graddrop": lambda seed: mo.graddrop(seed=seed, num_tasks=4),
    "moco": lambda seed: mo.moco(num_tasks=4),
    "db_mtl": lambda seed: mo.db_mtl(num_tasks=4),
    "excess_mtl": lambda seed: mo.excess_mtl(num_tasks=4),
}


def _trajectory(tx, js, ls, restore_at=None):
  params = {"w": jnp.zeros(js[0].shape[1])}
  state = tx.init(params)
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  outs = []
  for k, (j, l) in enumerate(zip(js, ls)):
    if k == restore_at:  # save to host arrays and restore
      leaves, treedef = jax.tree_util.tree_flatten(state)
      saved = [np.array(x) for x in leaves]
      state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in saved])
    upd, state = step({"w": jnp.asarray(j, jnp.float32)}, state, jnp.asarray(l, jnp.float32))
    outs.append(np.asarray(upd["w"]))
  return outs, step


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_seeds_and_save_restore(name):
  js, ls = sequence(8, m=4, n=12, steps=5)
  a, step = _trajectory(STATEFUL[name](0), js, ls)
  b, _ = _trajectory(STATEFUL[name](0), js, ls, restore_at=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)  # bit-identical, also across the round trip
  assert step._cache_size() == 1
  if name in ("gradvac", "graddrop"):
    c, _ = _trajectory(STATEFUL[name](1), js, ls)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))  # other draws


# ---------------------------------------------------------------------------
# Shared properties (tests/properties.py).
# ---------------------------------------------------------------------------

CASES = [P.normal_matrix(3, 7, seed=2), np.zeros((3, 7)), P.strong_stationary_matrix(3, 7, seed=7),
         P.weak_stationary_matrix(3, 7, seed=8), P.normal_matrix(3, 7, rank=1, seed=4)]


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_properties(name, x64):
  tx = getattr(mo, name)(num_tasks=3)
  losses = P.losses_for(3)
  for j in CASES + [m for _, m in P.scaled_matrices(P.normal_matrix(3, 7, seed=11))]:
    P.assert_structure(tx, j, losses)
    if name in ("gradvac", "excess_mtl"):
      P.assert_weighted(tx, j, losses)
    if name in ("moco", "db_mtl", "excess_mtl"):  # deterministic
      P.assert_permutation_invariant(tx, j, losses)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------

def test_clear_errors():
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.ones((3, 3))}
  for name in ["gradvac", "moco", "db_mtl", "excess_mtl"]:
    with pytest.raises(ValueError, match="num_tasks"):
      getattr(mo, name)()
  for tx in [mo.db_mtl(num_tasks=3), mo.moco(num_tasks=3)]:
    with pytest.raises(ValueError, match="losses="):
      tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match="beta"):
    mo.gradvac(beta=0.0, num_tasks=3)
  with pytest.raises(ValueError, match="group"):
    mo.gradvac(group="layer", num_tasks=3)
  with pytest.raises(ValueError, match="leak"):
    mo.graddrop(leak=1.5)
  with pytest.raises(ValueError, match="leak values"):
    tx = mo.graddrop(leak=[0.1, 0.2])
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match="batch_axis"):
    tx = mo.graddrop(batch_axis=1)
    tx.update(g, tx.init(params), params)
  with pytest.raises(ValueError, match="inputs="):
    tx = mo.graddrop(batch_axis=0)
    tx.update(g, tx.init(params), params, inputs={"w": jnp.ones(4)})
  with pytest.raises(ValueError, match="normalization"):
    mo.moco(normalization="max", num_tasks=3)
  with pytest.raises(ValueError, match="lambda_update"):
    mo.moco(lambda_update="adam", num_tasks=3)
  with pytest.raises(ValueError, match="beta"):
    mo.db_mtl(beta=1.0, num_tasks=3)
  with pytest.raises(ValueError, match="robust_step_size"):
    mo.excess_mtl(robust_step_size=-1.0, num_tasks=3)
  with pytest.raises(ValueError, match="num_tasks=3"):
    tx = mo.moco(num_tasks=3)
    tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params, losses=jnp.ones(2))


def test_gradvac_callable_groups():
  j = sequence(9, steps=1)[0][0]
  params = {k: jnp.zeros(s) for k, s in PARAMS_SHAPES.items()}
  by_key = mo.gradvac(group=lambda path, leaf: jax.tree_util.keystr(path), seed=2, num_tasks=M)
  one = mo.gradvac(group=lambda path, leaf: "all", seed=2, num_tasks=M)
  for tx, ref in [(by_key, mo.gradvac(group="leaf", seed=2, num_tasks=M)),
                  (one, mo.gradvac(seed=2, num_tasks=M))]:
    state = tx.init(params)
    assert state.inner.targets.shape[0] == (2 if tx is by_key else 1)
    got, _ = tx.update(stack(j.astype(np.float32)), state, params)
    want, _ = ref.update(stack(j.astype(np.float32)), ref.init(params), params)
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="needs the parameters"):
    by_key.update(stack(j.astype(np.float32)), by_key.init(params))
