"""SAMO: samo_perturbation and samo_task_grads.

The reference is written here in NumPy from the paper and the authors'
``trainer_samo.py``: a NumPy model, central finite differences for every
gradient (the global gradient, the head gradients, the SAM gradients at the
perturbed points), the two-point zeroth-order estimate, the layer-wise mix and
the normalisation, task by task. Only the random directions z_i are taken from
JAX, following the recipe documented in ``samo_task_grads``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo

M = 3


def make_problem(dtype=jnp.float64, seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "trunk": {"w": 0.7 * rng.standard_normal((4, 5)), "b": 0.3 * rng.standard_normal(5)},
      "heads": {f"h{i}": {"w": rng.standard_normal(5), "b": np.array(0.1 * i)} for i in range(M)},
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  x = jnp.asarray(rng.standard_normal((6, 4)), dtype)
  y = jnp.asarray(rng.standard_normal((6, M)), dtype)
  return params, x, y


def loss_fn(p, x, y):
  z = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
  return jnp.stack([jnp.mean((z @ p["heads"][f"h{i}"]["w"] + p["heads"][f"h{i}"]["b"]
                              - y[:, i]) ** 2) for i in range(M)])


def is_head(path, leaf):
  del leaf
  return "heads" in jax.tree_util.keystr(path)


# --- the NumPy reference -------------------------------------------------------------

class NumpyModel:
  """The same model in NumPy, on the flat list of leaves (jax.tree_util order)."""

  def __init__(self, params, x, y):
    leaves_paths, _ = jax.tree_util.tree_flatten_with_path(params)
    self.names = [jax.tree_util.keystr(p) for p, _ in leaves_paths]
    self.shapes = [np.shape(l) for _, l in leaves_paths]
    self.x, self.y = np.asarray(x, np.float64), np.asarray(y, np.float64)

  def losses(self, leaves):
    v = dict(zip(self.names, leaves))
    z = np.tanh(self.x @ v["['trunk']['w']"] + v["['trunk']['b']"])
    return np.array([np.mean((z @ v[f"['heads']['h{i}']['w']"] + v[f"['heads']['h{i}']['b']"]
                              - self.y[:, i]) ** 2) for i in range(M)])

  def grad(self, fn, leaves, h=1e-6):
    """Central finite differences of a scalar function of the leaves."""
    out = []
    for k, leaf in enumerate(leaves):
      g = np.zeros(np.shape(leaf))
      for idx in np.ndindex(g.shape):
        plus = [np.array(l, np.float64) for l in leaves]
        minus = [np.array(l, np.float64) for l in leaves]
        plus[k][idx] += h
        minus[k][idx] -= h
        g[idx] = (fn(plus) - fn(minus)) / (2 * h)
      out.append(g)
    return out


def directions(key, params, heads):
  """z_i per the documented recipe of samo_task_grads."""
  leaves = jax.tree_util.tree_leaves(params)
  shared = [p for p, h in zip(leaves, heads) if not h]
  n = sum(np.size(p) for p in shared)
  _, sub = jax.random.split(key)
  keys = jax.random.split(sub, M)
  out = []
  for i in range(M):
    flat = np.asarray(jax.random.normal(keys[i], (n,), jnp.result_type(*shared)), np.float64)
    row, start = [], 0
    for p, h in zip(leaves, heads):
      if h:
        row.append(None)
        continue
      row.append(flat[start:start + np.size(p)].reshape(np.shape(p)))
      start += np.size(p)
    out.append(row)
  return out


def reference(params, x, y, *, rho, rho_task, alpha, layerwise, adaptive, partition, mu=1e-2,
              key=None, eps=1e-12, z_params=None):
  """Offsets and SAM gradients of SAMO, task by task (paper / trainer_samo.py).

  ``z_params``: the parameters whose dtypes the directions are drawn in
  (default ``params``).
  """
  model = NumpyModel(params, x, y)
  theta = [np.asarray(l, np.float64) for l in jax.tree_util.tree_leaves(params)]
  heads = [partition and "heads" in n for n in model.names]
  g0 = model.grad(lambda t: np.mean(model.losses(t)), theta)
  key = jax.random.PRNGKey(0) if key is None else key
  z = directions(key, params if z_params is None else z_params, heads)
  t = [np.abs(p) if adaptive else np.ones_like(p) for p in theta]
  offsets, sam = [], []
  for i in range(M):
    head_g = model.grad(lambda q, i=i: model.losses(q)[i], theta)
    d = []
    for k, p in enumerate(theta):
      if heads[k]:
        d.append(head_g[k])
        continue
      shift = lambda s, k=k: [q + s * mu * z[i][j] if not heads[j] else q
                              for j, q in enumerate(theta)]
      coef = (model.losses(shift(1.0))[i] - model.losses(shift(-1.0))[i]) / (2 * mu)
      local = coef * z[i][k]
      if layerwise:
        local = np.linalg.norm(g0[k]) * local / np.linalg.norm(local)
      d.append(alpha * g0[k] + (1 - alpha) * local)
    eps_i = [None] * len(theta)
    for group, r in ((False, rho), (True, rho_task)):
      norm = np.sqrt(sum(np.sum((t[k] * d[k]) ** 2) for k in range(len(theta))
                         if heads[k] == group))
      for k in range(len(theta)):
        if heads[k] == group:
          eps_i[k] = r * t[k] ** 2 * d[k] / (norm + eps)
    point = [p + e for p, e in zip(theta, eps_i)]
    offsets.append(eps_i)
    sam.append(model.grad(lambda q, i=i: model.losses(q)[i], point))
  stack = lambda rows: [np.stack([r[k] for r in rows]) for k in range(len(theta))]
  return stack(offsets), stack(sam), model.losses(theta)


def leaves_of(tree):
  return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def samo_grads(params, x, y, pert, state=None, **kw):
  state = pert.init(params) if state is None else state
  return mo.samo_task_grads(loss_fn, params, x, y, perturbation=pert,
                            perturbation_state=state, chunk_size=None, **kw)


jit_samo_grads = jax.jit(samo_grads, static_argnums=3)


# --- agreement with the reference ----------------------------------------------------

@pytest.mark.parametrize("layerwise,adaptive", [(True, False), (False, True)])
def test_sam_grads_match_the_numpy_reference(layerwise, adaptive, x64):
  partition = True  # the one-leaf problem below covers every leaf shared
  params, x, y = make_problem()
  pert = mo.samo_perturbation(0.2, 0.4, rho_task=0.5 if partition else None, layerwise=layerwise,
                              adaptive=adaptive, task_specific=is_head if partition else None)
  losses, sam, state = jit_samo_grads(params, x, y, pert)
  _, want, want_losses = reference(params, x, y, rho=0.2, rho_task=0.5 if partition else 0.2,
                                   alpha=0.4, layerwise=layerwise, adaptive=adaptive,
                                   partition=partition)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
  for got, ref in zip(leaves_of(sam), want):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
  # The key advanced: the next call draws new directions.
  assert not np.array_equal(state.key, pert.init(params).key)


def test_offsets_and_layerwise_norms(x64):
  """update() alone: the formula, and the norms the layer-wise normalisation fixes."""
  params, x, y = make_problem()
  _, local = mo.task_grads(loss_fn, params, x, y)
  local = jax.tree.map(lambda g: g * jnp.arange(1.0, M + 1.0).reshape((M,) + (1,) * (g.ndim - 1))
                       ** 3, local)  # very different scales per task
  g0 = jax.tree.map(lambda g: jnp.mean(g, 0) + 0.1, local)
  trunk = lambda tree, i: [np.asarray(tree["trunk"][k][i]) for k in ("b", "w")]
  g0_trunk = [np.asarray(g0["trunk"][k]) for k in ("b", "w")]
  g0_norm = np.sqrt(sum(np.sum(g ** 2) for g in g0_trunk))
  # alpha = 0: each layer of ε_i has norm ρ ‖g_0^ℓ‖ / ‖g_0‖ whatever the task's scale,
  # and points along the task's own local estimate.
  offsets = jax.jit(lambda pert: pert.update(local, pert.init(params), params,
                                             global_grads=g0)[0], static_argnums=0)
  off = offsets(mo.samo_perturbation(0.3, 0.0, rho_task=0.7, task_specific=is_head))
  for i in range(M):
    for e, g, l in zip(trunk(off, i), g0_trunk, trunk(local, i)):
      np.testing.assert_allclose(np.linalg.norm(e), 0.3 * np.linalg.norm(g) / g0_norm, rtol=1e-12)
      np.testing.assert_allclose(e / np.linalg.norm(e), l / np.linalg.norm(l), rtol=1e-10)
    np.testing.assert_allclose(np.sqrt(sum(np.sum(e ** 2) for e in trunk(off, i))), 0.3,
                               rtol=1e-12)
    h = off["heads"][f"h{i}"]
    np.testing.assert_allclose(np.sqrt(np.sum(np.asarray(h["w"][i]) ** 2) + h["b"][i] ** 2), 0.7,
                               rtol=1e-12)
    for j in range(M):  # other tasks' heads are not perturbed by task i
      if j != i:
        assert not np.any(np.asarray(off["heads"][f"h{j}"]["w"][i]))
  # alpha = 1: SAM on the mean loss, the same shared offset ρ g_0 / ‖g_0‖ for every task.
  off = offsets(mo.samo_perturbation(0.3, 1.0, task_specific=is_head))
  for i in range(M):
    for e, g in zip(trunk(off, i), g0_trunk):
      np.testing.assert_allclose(e, 0.3 * g / g0_norm, rtol=1e-12)
  # general alpha, not layer-wise: the plain mix, normalised.
  off = offsets(mo.samo_perturbation(0.3, 0.25, layerwise=False, task_specific=is_head))
  for i in range(M):
    d = [0.25 * g + 0.75 * l for g, l in zip(g0_trunk, trunk(local, i))]
    n = np.sqrt(sum(np.sum(v ** 2) for v in d))
    for e, v in zip(trunk(off, i), d):
      np.testing.assert_allclose(e, 0.3 * v / n, rtol=1e-12)


def small_problem(dtype=jnp.float64):
  """One shared leaf, L_i(w) = (a_i·w)² + sin(a_i·w): cheap to compile, analytic gradients."""
  rng = np.random.default_rng(3)
  a = rng.standard_normal((M, 3))
  params = {"w": jnp.asarray(rng.standard_normal(3), dtype)}
  f = lambda p: jnp.sum(jnp.asarray(a, dtype) * p["w"], axis=1) ** 2 + jnp.sin(
      jnp.asarray(a, dtype) @ p["w"])
  f_np = lambda w: (a @ w) ** 2 + np.sin(a @ w)
  grad_np = lambda w, i: (2 * a[i] @ w + np.cos(a[i] @ w)) * a[i]
  return params, f, f_np, grad_np


def small_reference(params, f_np, grad_np, key, *, rho, alpha, layerwise, mu):
  """SAM gradients of SAMO on the one-leaf problem (NumPy)."""
  w = np.asarray(params["w"], np.float64)
  z = directions(key, params, [False])
  g0 = np.mean([grad_np(w, i) for i in range(M)], axis=0)
  out = []
  for i in range(M):
    zi = z[i][0]
    local = (f_np(w + mu * zi)[i] - f_np(w - mu * zi)[i]) / (2 * mu) * zi
    if layerwise:
      local = np.linalg.norm(g0) * local / np.linalg.norm(local)
    d = alpha * g0 + (1 - alpha) * local
    out.append(grad_np(w + rho * d / np.linalg.norm(d), i))
  return np.stack(out)


def small_samo(f, pert, chunk_size=None):
  return jax.jit(lambda p, s: mo.samo_task_grads(f, p, perturbation=pert, perturbation_state=s,
                                                 chunk_size=chunk_size))


def test_zeroth_order_estimate_tends_to_the_directional_derivative(x64):
  """layerwise=False, alpha=0, small μ: ε_i = ρ ĝ_i/‖ĝ_i‖ → ρ sign(∇L_i·z_i) z_i/‖z_i‖."""
  params, f, f_np, grad_np = small_problem()
  pert = mo.samo_perturbation(0.1, 0.0, layerwise=False, zo_eps=1e-5)
  state = pert.init(params)
  _, sam, _ = small_samo(f, pert)(params, state)
  z = directions(state.key, params, [False])
  w = np.asarray(params["w"])
  for i in range(M):
    zi = z[i][0]
    eps_i = 0.1 * np.sign(np.dot(grad_np(w, i), zi)) * zi / np.linalg.norm(zi)
    np.testing.assert_allclose(sam["w"][i], grad_np(w + eps_i, i), rtol=1e-10)


# --- properties ----------------------------------------------------------------------

def test_rho_zero_gives_the_plain_gradients_exactly():
  params, x, y = make_problem(jnp.float32)
  pert = mo.samo_perturbation(0.0, 0.5, task_specific=is_head)
  state = pert.init(params)
  losses, sam, new_state = jax.jit(lambda p, s: mo.samo_task_grads(
      loss_fn, p, x, y, perturbation=pert, perturbation_state=s))(params, state)
  want_losses, want = jax.jit(lambda p: mo.task_grads(loss_fn, p, x, y))(params)
  np.testing.assert_array_equal(losses, want_losses)
  for a, b in zip(leaves_of(sam), leaves_of(want)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(new_state.key, state.key)


def test_small_rho_tends_to_the_plain_gradients(x64):
  params, f, _, grad_np = small_problem()
  want = np.stack([grad_np(np.asarray(params["w"]), i) for i in range(M)])
  errs = []
  for rho in (1e-2, 1e-4):
    pert = mo.samo_perturbation(rho, 0.5)
    _, sam, _ = small_samo(f, pert)(params, pert.init(params))
    errs.append(np.max(np.abs(np.asarray(sam["w"]) - want)))
  assert 0 < errs[1] < 2e-2 * errs[0]  # O(ρ)


def test_chunking_and_determinism(x64):
  params, f, f_np, grad_np = small_problem()
  pert = mo.samo_perturbation(0.2, 0.5)
  state = pert.init(params)
  run = small_samo(f, pert)
  _, a, s1 = run(params, state)
  _, b, _ = small_samo(f, pert, chunk_size=2)(params, state)
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-12)
  _, c, _ = run(params, s1)  # new directions, new local parts
  assert not np.allclose(c["w"], a["w"])
  np.testing.assert_allclose(
      c["w"], small_reference(params, f_np, grad_np, s1.key, rho=0.2, alpha=0.5,
                              layerwise=True, mu=1e-2), rtol=1e-9)


def test_nonfinite_and_degenerate_inputs_give_finite_offsets():
  params = {"s": jnp.ones((2, 2)), "t": jnp.ones((3,))}
  pert = mo.samo_perturbation(0.5, 0.5)
  local = {"s": jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[jnp.inf, 0.0], [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 0.0]]]),
           "t": jnp.array([[1.0, 2.0, 2.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])}
  g0 = {"s": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "t": jnp.zeros((3,))}
  update = jax.jit(lambda l, g: pert.update(l, pert.init(params), params, global_grads=g)[0])
  off = update(local, g0)
  for leaf in jax.tree.leaves(off):
    assert np.all(np.isfinite(leaf))
  np.testing.assert_array_equal(off["s"][1], 0.0)   # non-finite local estimate: no offset
  np.testing.assert_array_equal(off["t"][1], 0.0)
  np.testing.assert_array_equal(off["t"], 0.0)      # ‖g_0^ℓ‖ = 0: no local part on that layer
  np.testing.assert_allclose(off["s"][2], 0.5 * np.asarray(g0["s"]) / 5.0, rtol=1e-6)  # ĝ = 0
  bad_g0 = {"s": jnp.full((2, 2), jnp.nan), "t": jnp.ones((3,))}
  off = update(local, bad_g0)
  for leaf in jax.tree.leaves(off):
    assert np.all(np.isfinite(leaf))
  huge = jax.tree.map(lambda g: g * 1e30, {"s": local["s"][jnp.array([0, 2])],
                                           "t": local["t"][jnp.array([0, 2])]})
  off = update(huge, jax.tree.map(lambda g: g * 1e30, g0))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(off["s"][0])), 0.5, rtol=1e-5)


def test_a_task_with_an_overflowing_loss_keeps_the_others_finite():
  params, x, y = make_problem(jnp.float32)
  def f(p, x, y):
    losses = loss_fn(p, x, y)
    return losses.at[0].set(jnp.exp(200.0 * jnp.sum(p["trunk"]["w"])))  # inf in float32
  pert = mo.samo_perturbation(0.1, 0.5, task_specific=is_head)
  tx = mo.mean(task_specific=is_head)

  @jax.jit
  def run(params):
    losses, sam, _ = mo.samo_task_grads(f, params, x, y, perturbation=pert,
                                        perturbation_state=pert.init(params), chunk_size=None)
    return sam, tx.update(sam, tx.init(params), params, losses=losses)[0]

  sam, update = run(params)
  for leaf in jax.tree.leaves(sam):
    assert np.all(np.isfinite(leaf[1:]))
  for leaf in jax.tree.leaves(update):
    assert np.all(np.isfinite(leaf))


# --- model state, aux and the training step ------------------------------------------

def bn_loss_fn(p, state, x, y):
  """A BatchNorm-like layer: batch statistics in training, running mean in the state."""
  h = x @ p["trunk"]["w"] + p["trunk"]["b"]
  mean = jnp.mean(h, axis=0)
  z = jnp.tanh(h - mean)
  losses = jnp.stack([jnp.mean((z @ p["heads"][f"h{i}"]["w"] + p["heads"][f"h{i}"]["b"]
                                - y[:, i]) ** 2) for i in range(M)])
  new_state = {"mean": 0.9 * state["mean"] + 0.1 * mean}
  return losses, (new_state, jnp.sum(mean))


def test_model_state_moves_once_at_theta_and_make_train_step(x64):
  params, x, y = make_problem()
  state = {"mean": jnp.zeros(5)}
  pert = mo.samo_perturbation(0.1, 0.5, task_specific=is_head)
  tx = optax.chain(mo.mean(task_specific=is_head), optax.sgd(0.1))
  step = mo.make_train_step(bn_loss_fn, tx, perturbation=pert, has_state=True, has_aux=True,
                            chunk_size=None)
  opt_state = (tx.init(params), pert.init(params))
  p1, (_, ps1), ms1, losses, aux = step(params, opt_state, state, x, y)
  # Losses, aux and the new model state are those of the one forward pass at θ: the
  # zeroth-order and SAM passes at perturbed weights never move the running statistics.
  want_losses, (want_state, want_aux) = jax.jit(bn_loss_fn)(params, state, x, y)
  for a, b in zip((losses, aux, ms1["mean"]), (want_losses, want_aux, want_state["mean"])):
    np.testing.assert_allclose(a, b, rtol=1e-14)
  np.testing.assert_array_equal(ps1.key, jax.random.split(opt_state[1].key)[0])
  # The SAM gradients are those of the stateless function with the same input state, and
  # the step applies mean (every leaf: the mean over tasks, heads weighted like the loss)
  # and SGD to them.
  plain = lambda p, x, y: bn_loss_fn(p, state, x, y)[0]
  _, want_sam, _ = jax.jit(lambda p: mo.samo_task_grads(
      plain, p, x, y, perturbation=pert, perturbation_state=pert.init(p), chunk_size=None))(params)
  want_p1 = jax.tree.map(lambda p, g: p - 0.1 * jnp.mean(g, axis=0), params, want_sam)
  for a, b in zip(leaves_of(p1), leaves_of(want_p1)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  with pytest.raises(ValueError, match="pair"):
    step(params, opt_state[0], state, x, y)
  with pytest.raises(ValueError, match="perturbation_groups"):
    mo.make_train_step(bn_loss_fn, tx, perturbation=pert, perturbation_groups=2)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_samo_task_grads(self):
    params, f, f_np, grad_np = small_problem(jnp.float32)
    pert = mo.samo_perturbation(0.05, 0.5)
    fn = self.variant(lambda p, s: mo.samo_task_grads(f, p, perturbation=pert,
                                                      perturbation_state=s, chunk_size=None))
    state = pert.init(params)
    losses, sam, _ = fn(params, state)
    np.testing.assert_allclose(losses, f_np(np.asarray(params["w"], np.float64)), rtol=1e-5)
    want = small_reference(params, f_np, grad_np, state.key, rho=0.05, alpha=0.5,
                           layerwise=True, mu=1e-2)
    np.testing.assert_allclose(sam["w"], want, rtol=1e-3, atol=1e-4)


# --- errors ----------------------------------------------------------------------------

def test_errors():
  for bad in (-0.1, float("nan"), float("inf"), True, None):
    with pytest.raises(ValueError, match="rho"):
      mo.samo_perturbation(rho=bad)
    with pytest.raises(ValueError, match="rho_task"):
      mo.samo_perturbation(rho_task=bad if bad is not None else -1.0)
  for bad in (-0.1, 1.5, True, "0.5"):
    with pytest.raises(ValueError, match="alpha"):
      mo.samo_perturbation(alpha=bad)
  with pytest.raises(ValueError, match="zo_eps"):
    mo.samo_perturbation(zo_eps=0.0)
  with pytest.raises(ValueError, match="layerwise"):
    mo.samo_perturbation(layerwise=1)
  with pytest.raises(ValueError, match="seed"):
    mo.samo_perturbation(seed=1.0)
  params, x, y = make_problem(jnp.float32)
  pert = mo.samo_perturbation()
  grads = jax.tree.map(lambda p: jnp.zeros((M,) + p.shape), params)
  with pytest.raises(ValueError, match="global_grads"):
    pert.update(grads, pert.init(params), params)
  with pytest.raises(ValueError, match="does not match"):
    pert.update(grads, pert.init(params), params,
                global_grads=jax.tree.map(lambda p: jnp.zeros((7,)), params))
  with pytest.raises(ValueError, match="samo_perturbation"):
    mo.samo_task_grads(loss_fn, params, x, y, perturbation=mo.task_perturbation(),
                       perturbation_state=pert.init(params))
  with pytest.raises(ValueError, match="perturbation_state"):
    mo.samo_task_grads(loss_fn, params, x, y, perturbation=pert, perturbation_state=None)
  with pytest.raises(ValueError, match="task-specific"):
    every = mo.samo_perturbation(task_specific=lambda path, leaf: True)
    mo.samo_task_grads(loss_fn, params, x, y, perturbation=every,
                       perturbation_state=every.init(params))
  with pytest.raises(ValueError, match="model state"):
    mo.samo_task_grads(loss_fn, params, perturbation=pert, perturbation_state=pert.init(params),
                       has_state=True)
