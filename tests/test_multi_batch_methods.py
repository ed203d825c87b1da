"""sdmgrad, modo, auto_lambda, rotograd: NumPy references over several steps.

The multi-batch methods take extra gradients (``weight_grads=``) or a
validation batch (``val_batch=``); RotoGrad acts on shared-representation
gradients and trains rotations (:func:`mo.rotograd_update`, the Flax module).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import linalg as sla

import mtl_optax as mo
from mtl_optax._src.methods import rotograd as rotograd_lib
from tests.references import simplex_projection_ref

M, N, STEPS = 3, 6, 5


def triples(seed=0, m=M, n=N, steps=STEPS):
  """Per step: main J and two noisy independent samples J_a, J_b around a common mean."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    mean = rng.standard_normal((m, n)) * rng.uniform(0.5, 2.0, (m, 1))
    out.append(tuple(mean + 0.3 * rng.standard_normal((m, n)) for _ in range(3)))
  return out


def run_double_sampling(variant, tx, seq):
  params = {"w": jnp.zeros(N, jnp.float64)}
  state = tx.init(params)
  step = variant(lambda g, s, ga, gb: tx.update(g, s, params, weight_grads=(ga, gb)))
  outs, states = [], []
  for j, ja, jb in seq:
    upd, state = step({"w": jnp.asarray(j)}, state, {"w": jnp.asarray(ja)}, {"w": jnp.asarray(jb)})
    outs.append(np.asarray(upd["w"]))
    states.append(state)
  return outs, states


def sdmgrad_ref(seq, lamda=0.3, niter=20, lr=5.0, momentum=0.5):
  m = seq[0][0].shape[0]
  w, outs = np.full(m, 1.0 / m), []
  for j, ja, jb in seq:
    gg = ja @ jb.T
    scale = np.mean(np.sqrt(np.maximum(np.diag(gg), 0)))
    gg = gg / scale ** 2
    gbar = gg.mean(axis=1)
    buf = None
    for _ in range(niter):
      grad = gg @ w + lamda * gbar
      buf = grad if buf is None else momentum * buf + grad
      w = simplex_projection_ref(w - lr * buf)
    outs.append((j.T @ w + lamda * j.mean(0)) / (1 + lamda))
  return outs


def modo_ref(seq, gamma, rho):
  m = seq[0][0].shape[0]
  lam, outs = np.full(m, 1.0 / m), []
  for j, ja, jb in seq:
    lam = simplex_projection_ref(lam - gamma * (ja @ (jb.T @ lam) + rho * lam))
    outs.append(j.T @ lam)
  return outs


def rotograd_ref(grads_seq, burn_in):
  """RotoGrad's scaling of representation gradients (reference code's _rep_grad)."""
  outs, n0 = [], None
  for k, o in enumerate(grads_seq):
    norms = np.linalg.norm(o.reshape(o.shape[0], -1), axis=1)
    if k == 0 or k == burn_in:
      n0 = norms
    ratio = norms / n0
    alpha = ratio / ratio.sum()
    s = alpha @ norms
    outs.append(sum(o[i] / norms[i] * s for i in range(o.shape[0])))
  return outs


class ReferenceAgreement(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sdmgrad(self):
    with jax.enable_x64(True):
      seq = triples(1)
      outs, states = run_double_sampling(self.variant, mo.sdmgrad(num_tasks=M), seq)
      for (j, _, _), out, want, st in zip(seq, outs, sdmgrad_ref(seq), states):
        np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(mo.task_weights(st) @ j, out, rtol=1e-10, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_modo(self):
    with jax.enable_x64(True):
      seq = triples(2)
      outs, states = run_double_sampling(self.variant, mo.modo(gamma=0.05, rho=0.1, num_tasks=M),
                                         seq)
      for out, want in zip(outs, modo_ref(seq, 0.05, 0.1)):
        np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
      assert np.ptp(np.asarray(mo.task_weights(states[-1]))) > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_auto_lambda(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(3)
      m, n_sh, n_head = 3, 4, 2
      n = n_sh + m * n_head
      # L_i(θ) = ½‖A_i θ − b_i‖², θ = [shared (4), heads (3×2)]; A_i only sees head i.
      a = np.zeros((m, 5, n))
      for i in range(m):
        a[i, :, :n_sh] = rng.standard_normal((5, n_sh))
        a[i, :, n_sh + i * n_head:n_sh + (i + 1) * n_head] = rng.standard_normal((5, n_head))
      b_train = [rng.standard_normal((m, 5)) for _ in range(STEPS)]
      b_val = [rng.standard_normal((m, 5)) for _ in range(STEPS)]
      primary = np.array([1.0, 0.0, 1.0])
      schedule = lambda k: 0.2 / (1.0 + k)

      def to_vec(p):
        return jnp.concatenate([p["shared"], p["head"].ravel()])

      def loss_fn(p, b):
        theta = to_vec(p)
        return 0.5 * jnp.sum((jnp.einsum("imn,n->im", jnp.asarray(a), theta) - b) ** 2, axis=1)

      tx = mo.auto_lambda(loss_fn, schedule, meta_lr=0.05, primary=primary, num_tasks=m,
                          task_specific={"shared": False, "head": True})
      params = {"shared": jnp.zeros(n_sh), "head": jnp.zeros((m, n_head))}
      state = tx.init(params)
      step = self.variant(lambda g, s, p, vb: tx.update(g, s, p, val_batch=(vb,)))

      theta = np.zeros(n)
      lam, mom, vel = np.full(m, 0.1), np.zeros(m), np.zeros(m)
      for k in range(STEPS):
        losses, grads = mo.task_grads(loss_fn, params, jnp.asarray(b_train[k]))
        upd, state = step(grads, state, params, jnp.asarray(b_val[k]))
        # Reference: gradients, virtual step, meta-gradient, Adam on λ, weighted update.
        g = np.stack([a[i].T @ (a[i] @ theta - b_train[k][i]) for i in range(m)])
        alpha = schedule(k)
        theta_v = theta - alpha * lam @ g
        g_val = sum(primary[i] * a[i].T @ (a[i] @ theta_v - b_val[k][i]) for i in range(m))
        meta = -alpha * g @ g_val
        mom = 0.9 * mom + 0.1 * meta
        vel = 0.999 * vel + 0.001 * meta ** 2
        lam = lam - 0.05 * (mom / (1 - 0.9 ** (k + 1))) / (np.sqrt(vel / (1 - 0.999 ** (k + 1))) + 1e-8)
        d = lam @ g
        np.testing.assert_allclose(np.asarray(to_vec(upd)), d, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mo.task_weights(state), lam, rtol=1e-10)
        np.testing.assert_allclose(mo.diagnostics(state)["meta_grad"], meta, rtol=1e-10,
                                   atol=1e-14)
        theta = theta - 0.1 * d
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, upd))
      assert np.ptp(lam) > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_rotograd_scaling(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(4)
      seq = [rng.standard_normal((M, 5, 4)) * rng.uniform(0.1, 3.0, (M, 1, 1))
             for _ in range(STEPS)]
      tx = mo.rotograd(burn_in_period=3, num_tasks=M)
      state = tx.init(jnp.zeros((5, 4)))
      step = self.variant(lambda g, s: tx.update(g, s))
      for o, want in zip(seq, rotograd_ref(seq, burn_in=3)):
        upd, state = step(jnp.asarray(o), state)
        np.testing.assert_allclose(np.asarray(upd), want, rtol=1e-10, atol=1e-12)
        w = np.asarray(mo.task_weights(state))
        np.testing.assert_allclose(np.tensordot(w, o, 1), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# RotoGrad: the full step and the Flax module.
# ---------------------------------------------------------------------------

def _rotograd_problem(seed=0, m=M, batch=6, d_in=3, d=4):
  rng = np.random.default_rng(seed)
  return dict(x=rng.standard_normal((batch, d_in)), y=rng.standard_normal((m, batch)),
              w=rng.standard_normal((d_in, d)), h=rng.standard_normal((m, d)),
              gen=0.3 * rng.standard_normal((m, d, d)))


def _rotation_loss_np(gen, o, r):
  m = gen.shape[0]
  rots = [sla.expm(gen[i] - gen[i].T) for i in range(m)]
  norms = np.linalg.norm(o.reshape(m, -1), axis=1)
  mean_norm = np.linalg.norm(o.mean(0))
  v = np.mean([o[i] * mean_norm / norms[i] for i in range(m)], axis=0)
  return sum(np.mean(np.sum((v @ rots[i].T - r[i]) ** 2, axis=-1)) for i in range(m))


def test_rotograd_update_matches_numpy():
  with jax.enable_x64(True):
    pb = _rotograd_problem()
    m, batch = pb["y"].shape
    trunk_fn = lambda w, x: x @ w
    heads_loss_fn = lambda h, zs, y: 0.5 * jnp.mean((jnp.einsum("ibd,id->ib", zs, h) - y) ** 2,
                                                    axis=1)
    tx = mo.rotograd(num_tasks=m)
    state = tx.init(jnp.zeros((batch, 4)))
    losses, (g_trunk, g_heads, g_rot), state = jax.jit(
        lambda s, w, h, g: mo.rotograd_update(tx, s, trunk_fn, heads_loss_fn, w, h, g,
                                              trunk_args=(pb["x"],), head_args=(pb["y"],)))(
        state, jnp.asarray(pb["w"]), jnp.asarray(pb["h"]), jnp.asarray(pb["gen"]))

    # NumPy: z_i = R_i z, task gradients w.r.t. z_i (r_i) and z (o_i = R_iᵀ r_i).
    rots = [sla.expm(pb["gen"][i] - pb["gen"][i].T) for i in range(m)]
    z = pb["x"] @ pb["w"]
    zs = np.stack([z @ rots[i].T for i in range(m)])
    res = np.einsum("ibd,id->ib", zs, pb["h"]) - pb["y"]
    np.testing.assert_allclose(losses, 0.5 * np.mean(res ** 2, axis=1), rtol=1e-12)
    r = res[:, :, None] * pb["h"][:, None, :] / batch
    o = np.stack([r[i] @ rots[i] for i in range(m)])
    np.testing.assert_allclose(g_heads, np.einsum("ib,ibd->id", res, zs) / batch, rtol=1e-10)
    cot = rotograd_ref([o], burn_in=20)[0]
    np.testing.assert_allclose(g_trunk, pb["x"].T @ cot, rtol=1e-10, atol=1e-12)
    # Rotation gradient: central finite differences of the NumPy rotation loss.
    fd = np.zeros_like(pb["gen"])
    h = 1e-6
    for idx in np.ndindex(*pb["gen"].shape):
      e = np.zeros_like(pb["gen"])
      e[idx] = h
      fd[idx] = (_rotation_loss_np(pb["gen"] + e, o, r) - _rotation_loss_np(pb["gen"] - e, o, r)) / (2 * h)
    np.testing.assert_allclose(g_rot, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_array_equal(state.inner.step, 1)


def test_rotograd_flax_module():
  pytest.importorskip("flax")
  with jax.enable_x64(True):
    pb = _rotograd_problem(seed=1)
    module = mo.rotograd_rotations(M, 4, param_dtype=jnp.float64)
    z = jnp.asarray(pb["x"] @ pb["w"])
    variables = module.init(jax.random.PRNGKey(0), z)
    np.testing.assert_array_equal(variables["params"]["generators"], 0.0)
    np.testing.assert_allclose(module.apply(variables, z), jnp.broadcast_to(z, (M,) + z.shape))
    variables = {"params": {"generators": jnp.asarray(pb["gen"])}}
    out = module.apply(variables, z)
    for i in range(M):
      rot = sla.expm(pb["gen"][i] - pb["gen"][i].T)
      np.testing.assert_allclose(out[i], np.asarray(z) @ rot.T, rtol=1e-10)
      np.testing.assert_allclose(rot @ rot.T, np.eye(4), atol=1e-12)
    # The task path does not train the rotations ...
    g = jax.grad(lambda v: jnp.sum(module.apply(v, z) ** 2))(variables)
    np.testing.assert_array_equal(g["params"]["generators"], 0.0)
    # ... the rotation loss does, and accepts the module's params pytree.
    o = jnp.asarray(np.random.default_rng(2).standard_normal((M,) + z.shape))
    g1 = jax.grad(mo.rotograd_rotation_loss)(variables["params"], o)
    g2 = jax.grad(mo.rotograd_rotation_loss)(jnp.asarray(pb["gen"]), o)
    np.testing.assert_allclose(g1["generators"], g2, rtol=1e-12)
    mats = module.apply(variables, method=lambda mod: mod.matrices())
    np.testing.assert_allclose(mats[0], sla.expm(pb["gen"][0] - pb["gen"][0].T), rtol=1e-10)


def test_rotograd_rotations_align_gradients():
  """When the task gradients are rotations of each other, training the rotations on
  the rotation loss aligns them: the loss goes to ~0 (R_i v = r_i for all i)."""
  rng = np.random.default_rng(5)
  m, d = 2, 3
  u = rng.standard_normal((8, d))
  q = [sla.expm(s - s.T) for s in rng.standard_normal((m, d, d))]
  r = jnp.asarray(np.stack([u @ qi.T for qi in q]), jnp.float32)   # r_i = Q_i u (rows)
  gen = jnp.zeros((m, d, d))
  opt = optax.adam(0.02)
  opt_state = opt.init(gen)

  @jax.jit
  def step(gen, opt_state):
    mats = jax.vmap(jax.scipy.linalg.expm)(gen - jnp.swapaxes(gen, 1, 2))
    o = jnp.einsum("ijk,ibj->ibk", mats, r)  # o_i = R_iᵀ r_i (rows)
    loss, g = jax.value_and_grad(mo.rotograd_rotation_loss)(gen, o, r)
    upd, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(gen, upd), opt_state, loss

  losses = []
  for _ in range(300):
    gen, opt_state, loss = step(gen, opt_state)
    losses.append(float(loss))
  assert losses[0] > 1.0
  assert losses[-1] < 1e-2 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------------------
# Calling convention helpers, heads, reproducibility, errors.
# ---------------------------------------------------------------------------

def test_multi_batch_task_grads():
  loss_fn = lambda p, x, y: jnp.stack([jnp.sum((p["w"] * x - y) ** 2), jnp.sum(p["w"] * x)])
  params = {"w": jnp.arange(3.0)}
  rng = np.random.default_rng(0)
  batches = [tuple(jnp.asarray(rng.standard_normal(3)) for _ in range(2)) for _ in range(3)]
  losses, grads, (ga, gb) = mo.multi_batch_task_grads(loss_fn, params, batches)
  for got, batch in zip([grads, ga, gb], batches):
    l, want = mo.task_grads(loss_fn, params, *batch)
    np.testing.assert_allclose(got["w"], want["w"])
  np.testing.assert_allclose(losses, mo.task_grads(loss_fn, params, *batches[0])[0])
  with pytest.raises(ValueError, match="exactly three"):
    mo.multi_batch_task_grads(loss_fn, params, batches[:2])


@pytest.mark.parametrize("heads", ["mean", "main"])
def test_double_sampling_heads(heads):
  rng = np.random.default_rng(1)

  def sample():
    heads_g = np.zeros((2, 2, 3))
    heads_g[0, 0], heads_g[1, 1] = rng.standard_normal(3), rng.standard_normal(3)
    return {"trunk": jnp.asarray(rng.standard_normal((2, 4))), "heads": jnp.asarray(heads_g)}

  g, ga, gb = sample(), sample(), sample()
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
  tx = mo.modo(heads=heads, task_specific={"trunk": False, "heads": True}, num_tasks=2)
  upd, state = tx.update(g, tx.init(params), params, weight_grads=(ga, gb))
  samples = [g, ga, gb] if heads == "mean" else [g]
  want = np.mean([np.asarray(s["heads"]).sum(0) for s in samples], axis=0)
  np.testing.assert_allclose(upd["heads"], want, rtol=1e-6)
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(upd["trunk"], w @ np.asarray(g["trunk"]), rtol=1e-6)


def _loss_fn(p, x):
  return jnp.stack([jnp.sum((p["w"] - x[i]) ** 2) for i in range(M)])


def _trajectory(name, restore_at=None):
  rng = np.random.default_rng(6)
  params = {"w": jnp.zeros(N)}
  if name == "auto_lambda":
    tx = mo.auto_lambda(_loss_fn, 0.1, meta_lr=0.01, num_tasks=M)
  else:
    tx = getattr(mo, name)(num_tasks=M)
  state = tx.init(params)
  if name == "auto_lambda":
    step = jax.jit(lambda g, s, p, ga, gb: tx.update(g, s, p, val_batch=(ga["w"],)))
  elif name == "rotograd":
    step = jax.jit(lambda g, s, p, ga, gb: tx.update(g, s, p))
  else:
    step = jax.jit(lambda g, s, p, ga, gb: tx.update(g, s, p, weight_grads=(ga, gb)))
  outs = []
  for k in range(5):
    if k == restore_at:
      leaves, treedef = jax.tree_util.tree_flatten(state)
      state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(np.array(x)) for x in leaves])
    g, ga, gb = ({"w": jnp.asarray(rng.standard_normal((M, N)), jnp.float32)} for _ in range(3))
    upd, state = step(g, state, params, ga, gb)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, upd))
    outs.append(np.asarray(upd["w"]))
  return outs, step


@pytest.mark.parametrize("name", ["sdmgrad", "modo", "auto_lambda", "rotograd"])
def test_reproducible_and_save_restore(name):
  a, step = _trajectory(name)
  b, _ = _trajectory(name, restore_at=3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert step._cache_size() == 1


def test_clear_errors():
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.ones((3, 3))}
  for make in [mo.sdmgrad, mo.modo, mo.rotograd, lambda: mo.auto_lambda(_loss_fn)]:
    with pytest.raises(ValueError, match="num_tasks"):
      make()
  for tx in [mo.sdmgrad(num_tasks=3), mo.modo(num_tasks=3)]:
    s = tx.init(params)
    with pytest.raises(ValueError, match="weight_grads=\\(grads_a, grads_b\\)"):
      tx.update(g, s, params)
    with pytest.raises(ValueError, match="pair"):
      tx.update(g, s, params, weight_grads=(g,))
    with pytest.raises(ValueError, match="structure and shapes"):
      tx.update(g, s, params, weight_grads=(g, {"w": jnp.ones((3, 4))}))
  with pytest.raises(ValueError, match="niter"):
    mo.sdmgrad(niter=0, num_tasks=3)
  with pytest.raises(ValueError, match="heads"):
    mo.sdmgrad(heads="sum", num_tasks=3)
  with pytest.raises(ValueError, match="gamma"):
    mo.modo(gamma=0.0, num_tasks=3)
  tx = mo.auto_lambda(_loss_fn, num_tasks=3)
  s = tx.init(params)
  with pytest.raises(ValueError, match="val_batch"):
    tx.update(g, s, params)
  with pytest.raises(ValueError, match="parameters"):
    tx.update(g, s, None, val_batch=(jnp.ones((3, 3)),))
  bad = mo.auto_lambda(lambda p, x: jnp.sum(p["w"] * x), num_tasks=3)
  with pytest.raises(ValueError, match="\\(3,\\) task losses"):
    bad.update(g, bad.init(params), params, val_batch=(jnp.ones(3),))
  with pytest.raises(ValueError, match="primary"):
    mo.auto_lambda(_loss_fn, primary=[1.0, 0.0], num_tasks=3)
  with pytest.raises(ValueError, match="virtual_lr"):
    mo.auto_lambda(_loss_fn, virtual_lr=0.0, num_tasks=3)
  with pytest.raises(ValueError, match="burn_in_period"):
    mo.rotograd(burn_in_period=0, num_tasks=3)
  with pytest.raises(ValueError, match="size"):
    mo.rotograd_rotations(3, 0)
  with pytest.raises(ValueError, match="last axis"):
    rotograd_lib.rotate(jnp.zeros((2, 3, 3)), jnp.ones((5, 4)))
  with pytest.raises(ValueError, match="exactly that one"):
    mo.rotograd_rotation_loss({"a": jnp.zeros((2, 3, 3)), "b": jnp.zeros(2)},
                              jnp.ones((2, 5, 3)))
