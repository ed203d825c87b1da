"""task_perturbation, sharpness_aware_task_grads and the sharpness measure.

References are written here with a Python loop over tasks: per-task ``jax.grad``
of L_i, NumPy norms over the shared / head leaves, per-task perturbed
parameters (Phan et al., Algorithm 1, line by line).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax._src import sharpness as sharpness_lib

M = 3


def make_problem(m=M, seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  params = {
      "trunk": {"w": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)},
      "heads": {f"h{i}": {"w": rng.standard_normal(5), "b": np.array(0.1 * i)} for i in range(m)},
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  x = jnp.asarray(rng.standard_normal((8, 4)), dtype)
  y = jnp.asarray(rng.standard_normal((8, m)), dtype)
  return params, x, y


def loss_fn(p, x, y):
  z = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
  m = len(p["heads"])
  return jnp.stack([jnp.mean((z @ p["heads"][f"h{i}"]["w"] + p["heads"][f"h{i}"]["b"]
                              - y[:, i]) ** 2) for i in range(m)])


def is_head(path, leaf):
  del leaf
  return "heads" in jax.tree_util.keystr(path)


def head_mask(params, partition):
  leaves_paths, _ = jax.tree_util.tree_flatten_with_path(params)
  if not partition:
    return [False] * len(leaves_paths)
  return [is_head(path, leaf) for path, leaf in leaves_paths]


@jax.jit
def task_value_and_grad(p, x, y, i):
  """L_i and ∇L_i for ONE task (a plain per-task jax.grad; jitted once for all i)."""
  return jax.value_and_grad(lambda q: loss_fn(q, x, y)[i])(p)


def algorithm1(params, x, y, rho_sh, rho_ns, adaptive, partition, joint=False, eps=1e-12):
  """Offsets ε_i and SAM gradients by a Python loop over tasks (NumPy norms)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  heads = head_mask(params, partition)
  if joint:
    heads = [False] * len(leaves)
  p_np = [np.asarray(p, np.float64) for p in leaves]
  m = len(params["heads"])
  offsets, sam, perturbed_losses = [], [], []
  for i in range(m):
    _, g = task_value_and_grad(params, x, y, i)
    g = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(g)]
    t = [np.abs(p) if adaptive else np.ones_like(p) for p in p_np]
    eps_i = []
    for group_is_head, rho in ((False, rho_sh), (True, rho_ns)):
      n = np.sqrt(sum(np.sum((tk * gk) ** 2) for tk, gk, h in zip(t, g, heads)
                      if h == group_is_head))
      for k in range(len(leaves)):
        if heads[k] == group_is_head:
          while len(eps_i) <= k:
            eps_i.append(None)
          eps_i[k] = rho * t[k] ** 2 * g[k] / (n + eps)
    point = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(p + e, leaves[k].dtype) for k, (p, e) in enumerate(zip(p_np, eps_i))])
    val, gs = task_value_and_grad(point, x, y, i)
    offsets.append(eps_i)
    sam.append([np.asarray(v) for v in jax.tree_util.tree_leaves(gs)])
    perturbed_losses.append(float(val))
  stack = lambda rows: [np.stack([r[k] for r in rows]) for k in range(len(leaves))]
  return stack(offsets), stack(sam), np.array(perturbed_losses)


def leaves_of(tree):
  return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


# --- task_perturbation -------------------------------------------------------------

@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("partition", [False, True])
@pytest.mark.parametrize("norm", ["separate", "joint"])
def test_offsets_match_algorithm1(adaptive, partition, norm, x64):
  params, x, y = make_problem()
  rho_sh, rho_ns = 0.3, (0.3 if norm == "joint" else 0.7)
  pert = mo.task_perturbation(rho_sh, rho_ns, adaptive=adaptive,
                              task_specific=is_head if partition else None, norm=norm)
  _, grads = mo.task_grads(loss_fn, params, x, y)
  offsets, _ = pert.update(grads, pert.init(params), params)
  want, _, _ = algorithm1(params, x, y, rho_sh, rho_ns, adaptive, partition, joint=norm == "joint")
  for got, ref in zip(leaves_of(offsets), want):
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)
  # Offsets of other tasks' heads are zero: each task perturbs the trunk and its own head.
  for i in range(M):
    for j in range(M):
      if i != j:
        assert not np.any(np.asarray(offsets["heads"][f"h{j}"]["w"][i]))
  if partition and norm == "separate" and not adaptive:
    # Norms over the shared and the head leaves separately: each group has norm ρ.
    trunk = np.concatenate([np.asarray(offsets["trunk"][k]).reshape(M, -1) for k in ("w", "b")], 1)
    np.testing.assert_allclose(np.linalg.norm(trunk, axis=1), rho_sh, rtol=1e-10)
    for i in range(M):
      h = offsets["heads"][f"h{i}"]
      n = np.sqrt(np.sum(np.asarray(h["w"][i]) ** 2) + np.asarray(h["b"][i]) ** 2)
      np.testing.assert_allclose(n, rho_ns, rtol=1e-10)


def test_zero_gradients_give_zero_offsets():
  params = {"a": jnp.ones((3,)), "b": jnp.zeros((2, 2))}
  grads = {"a": jnp.zeros((2, 3)).at[1].set(jnp.array([3.0, 0.0, 4.0])), "b": jnp.zeros((2, 2, 2))}
  for adaptive in (False, True):
    pert = mo.task_perturbation(0.5, 0.5, adaptive=adaptive)
    out, _ = pert.update(grads, pert.init(params), params)
    np.testing.assert_array_equal(out["a"][0], 0.0)
    np.testing.assert_array_equal(out["b"], 0.0)  # adaptive: |θ| = 0 there
    np.testing.assert_allclose(out["a"][1], [0.3, 0.0, 0.4], rtol=1e-6)
  # eps = 0 keeps zero rows at zero (no 0/0).
  pert = mo.task_perturbation(0.5, 0.5, eps=0.0)
  out, _ = pert.update(grads, pert.init(params), params)
  assert np.all(np.isfinite(out["a"])) and not np.any(out["a"][0])


def test_huge_and_tiny_gradients_do_not_overflow():
  params = {"a": jnp.ones((4,), jnp.float32)}
  grads = {"a": jnp.array([[1e30, -1e30, 2e30, 0.0], [1e-30, 0.0, 0.0, 0.0]], jnp.float32)}
  pert = mo.task_perturbation(2.0, 2.0, eps=0.0)
  out, _ = pert.update(grads, pert.init(params), params)
  assert np.all(np.isfinite(out["a"]))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out["a"], np.float64), axis=1), [2.0, 2.0],
                             rtol=1e-5)


def test_perturbation_errors():
  for bad in (-0.1, float("nan"), float("inf"), True, "0.1", None):
    with pytest.raises(ValueError, match="rho_shared"):
      mo.task_perturbation(rho_shared=bad)
    with pytest.raises(ValueError, match="rho_task"):
      mo.task_perturbation(rho_task=bad)
  with pytest.raises(ValueError, match="norm"):
    mo.task_perturbation(norm="layer")
  with pytest.raises(ValueError, match="joint"):
    mo.task_perturbation(0.1, 0.2, norm="joint")
  with pytest.raises(ValueError, match="eps"):
    mo.task_perturbation(eps=-1.0)
  with pytest.raises(ValueError, match="adaptive"):
    mo.task_perturbation(adaptive="yes")
  pert = mo.task_perturbation(adaptive=True)
  grads = {"a": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="needs the parameters"):
    pert.update(grads, pert.init(None))
  with pytest.raises(ValueError, match="does not match"):
    pert.update(grads, pert.init(None), {"a": jnp.ones((4,))})
  with pytest.raises(ValueError, match="scalar"):
    mo.task_perturbation().update({"a": jnp.ones(())}, None, None)


# --- sharpness_aware_task_grads ----------------------------------------------------

@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("partition", [False, True])
def test_sam_grads_match_algorithm1(adaptive, partition, x64):
  params, x, y = make_problem()
  pert = mo.task_perturbation(0.2, 0.4, adaptive=adaptive,
                              task_specific=is_head if partition else None)
  losses, loss_grads, sam = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert)
  _, want_sam, _ = algorithm1(params, x, y, 0.2, 0.4, adaptive, partition)
  np.testing.assert_allclose(losses, loss_fn(params, x, y), rtol=1e-12)
  want_losses, want_grads = mo.task_grads(loss_fn, params, x, y)
  for got, ref in zip(leaves_of(loss_grads), leaves_of(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
  for got, ref in zip(leaves_of(sam), want_sam):
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


def test_chunking_modes_and_task_loss_fn_agree(x64):
  params, x, y = make_problem()
  pert = mo.task_perturbation(0.2, 0.4, adaptive=True, task_specific=is_head)
  _, _, ref = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert)

  def task_loss_fn(p, i, x, y):  # only head i is evaluated (lax.switch)
    z = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
    branches = [lambda z, k=k: jnp.mean((z @ p["heads"][f"h{k}"]["w"] + p["heads"][f"h{k}"]["b"]
                                         - y[:, k]) ** 2) for k in range(M)]
    return jax.lax.switch(i, branches, z)

  for kw in (dict(chunk_size=1), dict(chunk_size=2), dict(mode="vmap"),
             dict(task_loss_fn=task_loss_fn), dict(task_loss_fn=task_loss_fn, chunk_size=1)):
    _, _, got = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert, **kw)
    for a, b in zip(leaves_of(got), leaves_of(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=str(kw))
  with pytest.raises(ValueError, match="scalar"):
    mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert,
                                  task_loss_fn=lambda p, i, x, y: loss_fn(p, x, y))
  with pytest.raises(ValueError, match="chunk_size"):
    mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert, chunk_size=0)
  with pytest.raises(ValueError, match="perturbation"):
    mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=None)


@pytest.mark.parametrize("groups", [2, 4])
def test_perturbation_groups_average_per_group_algorithm1(groups, x64):
  """Per-replica SAM: each batch group perturbs with its own gradients (reference:
  Algorithm 1 run on each group's slice), results averaged over the groups."""
  params, x, y = make_problem()
  pert = mo.task_perturbation(0.2, 0.4, adaptive=True, task_specific=is_head)
  losses, loss_grads, sam = mo.sharpness_aware_task_grads(
      loss_fn, params, x, y, perturbation=pert, perturbation_groups=groups)
  per = x.shape[0] // groups
  slices = [(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]) for r in range(groups)]
  per_group = [algorithm1(params, xs, ys, 0.2, 0.4, True, True)[1] for xs, ys in slices]
  want_sam = [np.mean([g[k] for g in per_group], axis=0) for k in range(len(per_group[0]))]
  for got, ref in zip(leaves_of(sam), want_sam):
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)
  # Losses and loss gradients are means of batch means: the whole-batch values.
  want_losses, want_grads = mo.task_grads(loss_fn, params, x, y)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
  for got, ref in zip(leaves_of(loss_grads), leaves_of(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
  # ... but the SAM gradients are not the global-perturbation ones.
  _, _, global_sam = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert)
  diff = max(np.max(np.abs(a - b)) for a, b in zip(leaves_of(sam), leaves_of(global_sam)))
  assert diff > 1e-6


def test_one_perturbation_group_is_the_global_perturbation(x64):
  params, x, y = make_problem()
  pert = mo.task_perturbation(0.2, 0.4, task_specific=is_head)
  ref = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert)
  got = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert,
                                      perturbation_groups=1)
  for a, b in zip(leaves_of(got), leaves_of(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_perturbation_groups_aux_and_errors(x64):
  params, x, y = make_problem()
  pert = mo.task_perturbation(0.2, 0.4, task_specific=is_head)
  with_aux = lambda p, x, y: (loss_fn(p, x, y), {"n": jnp.sum(x[:, 0])})
  (losses, aux), _, _ = mo.sharpness_aware_task_grads(
      with_aux, params, x, y, perturbation=pert, has_aux=True, perturbation_groups=4)
  assert losses.shape == (M,)
  np.testing.assert_allclose(aux["n"], np.asarray(x[:, 0]).reshape(4, 2).sum(1), rtol=1e-12)
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="perturbation_groups must be a positive int"):
      mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert,
                                    perturbation_groups=bad)
  with pytest.raises(ValueError, match="must divide the batch axis"):
    mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert, perturbation_groups=3)
  with pytest.raises(ValueError, match="no positional array"):
    mo.sharpness_aware_task_grads(lambda p: loss_fn(p, x, y), params, perturbation=pert,
                                  perturbation_groups=2)
  with pytest.raises(ValueError, match="needs perturbation"):
    mo.make_train_step(loss_fn, mo.mean(), perturbation_groups=2)


def test_aux_comes_from_the_unperturbed_pass(x64):
  params, x, y = make_problem()
  calls = []

  def with_aux(p, x, y):
    calls.append(1)
    # A "batch statistic" that depends on the parameters (like BatchNorm's).
    return loss_fn(p, x, y), {"stat": jnp.mean(x @ p["trunk"]["w"], axis=0)}

  pert = mo.task_perturbation(0.5, 0.5, task_specific=is_head)
  (losses, aux), grads, sam = mo.sharpness_aware_task_grads(
      with_aux, params, x, y, perturbation=pert, has_aux=True)
  np.testing.assert_allclose(aux["stat"], jnp.mean(x @ params["trunk"]["w"], axis=0), rtol=1e-12)
  _, _, sam_ref = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert)
  for a, b in zip(leaves_of(sam), leaves_of(sam_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@functools.lru_cache(maxsize=None)
def _rho_zero_grads():
  with jax.enable_x64(True):
    params, x, y = make_problem()
    pert = mo.task_perturbation(0.0, 0.0, adaptive=True, task_specific=is_head)
    return (params, x, y) + tuple(mo.sharpness_aware_task_grads(loss_fn, params, x, y,
                                                                perturbation=pert))


def test_rho_zero_returns_the_loss_gradients(x64):
  params, x, y, _, grads, sam = _rho_zero_grads()
  for a, b in zip(leaves_of(grads), leaves_of(sam)):
    np.testing.assert_array_equal(a, b)
  # A custom (non-task_perturbation) zero perturbation goes through the perturbed pass.
  _, grads, sam2 = mo.sharpness_aware_task_grads(
      loss_fn, params, x, y, perturbation=mo.task_perturbation(0.0, 0.0)._replace(
          update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), s)))
  for a, b in zip(leaves_of(grads), leaves_of(sam2)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


VANILLA = {
    "mean": lambda ts: mo.mean(task_specific=ts),
    "mgda": lambda ts: mo.mgda(task_specific=ts),
    "pcgrad": lambda ts: mo.pcgrad(seed=3, task_specific=ts),
    "cagrad": lambda ts: mo.cagrad(c=0.4, task_specific=ts),
    "imtl": lambda ts: mo.imtl(task_specific=ts),
    "nash_mtl": lambda ts: mo.nash_mtl(num_tasks=M, task_specific=ts),
}


@pytest.mark.parametrize("name", [n for n in VANILLA if hasattr(mo, n)])
def test_rho_zero_flat_reproduces_the_vanilla_aggregator_exactly(name, x64):
  """mo.flat(A) at ρ = 0 is bit-identical to A (same partition, same state history)."""
  params, _, _, losses, grads, sam = _rho_zero_grads()
  flat_tx = mo.flat(VANILLA[name](None), task_specific=is_head)
  van = VANILLA[name](is_head)
  fs, vs = flat_tx.init(params), van.init(params)
  for _ in range(2 if name == "pcgrad" else 1):  # PCGrad's key stays in sync
    uf, fs = flat_tx.update(grads, fs, params, losses=losses, sam_grads=sam)
    uv, vs = van.update(grads, vs, params, losses=losses)
    for a, b in zip(leaves_of(uf), leaves_of(uv)):
      np.testing.assert_array_equal(a, b)
  for k, v in mo.diagnostics(vs).items():
    np.testing.assert_array_equal(mo.diagnostics(fs)[k], v, err_msg=k)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sam_grads_and_offsets(self):
    params, x, y = make_problem(dtype=jnp.float32)
    pert = mo.task_perturbation(0.1, 0.3, adaptive=True, task_specific=is_head)
    fn = self.variant(lambda p, x, y: mo.sharpness_aware_task_grads(
        loss_fn, p, x, y, perturbation=pert))
    _, _, got = fn(params, x, y)
    with jax.enable_x64(True):
      p64, x64_, y64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, x, y))
      _, want, _ = algorithm1(p64, x64_, y64, 0.1, 0.3, True, True)
    for a, b in zip(leaves_of(got), want):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --- the sharpness measure ---------------------------------------------------------

@pytest.mark.parametrize("adaptive,norm", [(False, "separate"), (True, "joint")])
def test_sharpness_matches_reference(adaptive, norm, x64):
  params, x, y = make_problem()
  rhos = [0.0, 0.05, 0.5]
  got = sharpness_lib.sharpness(loss_fn, params, x, y, rhos=rhos, adaptive=adaptive,
                                task_specific=is_head, norm=norm)
  assert got.shape == (len(rhos), M)
  base_losses = np.asarray(loss_fn(params, x, y))
  for r, rho in enumerate(rhos):
    _, _, perturbed = algorithm1(params, x, y, rho, rho, adaptive, True, joint=norm == "joint")
    np.testing.assert_allclose(got[r], perturbed - base_losses, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(got[0], 0.0, atol=1e-15)
  assert np.all(got[1] > 0)  # first-order worst case increases the loss for small ρ
  jitted = jax.jit(lambda r: sharpness_lib.sharpness(loss_fn, params, x, y, rhos=r,
                                                     adaptive=adaptive, task_specific=is_head,
                                                     norm=norm))
  np.testing.assert_allclose(jitted(jnp.asarray(rhos)), got, rtol=1e-12, atol=1e-15)
  with pytest.raises(ValueError, match="radius"):
    sharpness_lib.sharpness(loss_fn, params, x, y, rhos=[0.1, -0.1])
  with pytest.raises(ValueError, match="rhos"):
    sharpness_lib.sharpness(loss_fn, params, x, y, rhos=[])


@pytest.mark.parametrize("adaptive,partition", [(False, False), (True, True)])
def test_metrics_sharpness_at_one_perturbation_matches_algorithm1(adaptive, partition, x64):
  """mo.metrics.sharpness(rho_shared=, rho_task=): L_i(θ + ε_i) − L_i(θ), ε_i as in training."""
  params, x, y = make_problem()
  ts = is_head if partition else None
  got = mo.metrics.sharpness(loss_fn, params, x, y, rho_shared=0.1, rho_task=0.3,
                             adaptive=adaptive, task_specific=ts)
  assert got.shape == (M,)
  _, _, perturbed = algorithm1(params, x, y, 0.1, 0.3, adaptive, partition)
  want = perturbed - np.asarray(loss_fn(params, x, y))
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)
  # Zero radii: zero. Exactly when the perturbed losses are evaluated by the same
  # (vmapped, op-by-op) path as L_i(θ); with tasks in sequence (the CPU default) they
  # come from a compiled loop body, equal up to the rounding of that other program.
  zero = mo.metrics.sharpness(loss_fn, params, x, y, rho_shared=0.0, rho_task=0.0,
                              adaptive=adaptive, task_specific=ts, chunk_size=None)
  np.testing.assert_array_equal(zero, np.zeros(M))
  zero = mo.metrics.sharpness(loss_fn, params, x, y, rho_shared=0.0, rho_task=0.0,
                              adaptive=adaptive, task_specific=ts, chunk_size=1)
  np.testing.assert_allclose(zero, np.zeros(M), rtol=0,
                             atol=8 * np.finfo(np.float64).eps * float(np.max(loss_fn(params, x, y))))
  if partition:
    # rho_task defaults to rho_shared, and then agrees with the rhos= form.
    same = mo.metrics.sharpness(loss_fn, params, x, y, rho_shared=0.2, adaptive=adaptive,
                                task_specific=ts)
    listed = mo.metrics.sharpness(loss_fn, params, x, y, rhos=[0.2], adaptive=adaptive,
                                  task_specific=ts)
    np.testing.assert_allclose(same, listed[0], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="exactly one"):
      mo.metrics.sharpness(loss_fn, params, x, y)
    with pytest.raises(ValueError, match="exactly one"):
      mo.metrics.sharpness(loss_fn, params, x, y, rhos=[0.1], rho_shared=0.1)
    with pytest.raises(ValueError, match="rho_task"):
      mo.metrics.sharpness(loss_fn, params, x, y, rhos=[0.1], rho_task=0.1)
    with pytest.raises(ValueError, match="rho_task"):
      mo.metrics.sharpness(loss_fn, params, x, y, rho_shared=0.1, rho_task=-1.0)
