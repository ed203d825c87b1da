"""mo.flat: the sharpness-aware wrapper (F-MGDA, F-PCGrad, F-CAGrad, F-IMTL, ...).

The reference follows the paper's Algorithm 1 line by line with a Python loop
over tasks (per-task ``jax.grad`` at θ and at the task's own perturbed point,
NumPy norms), then aggregates the matrices of loss and flat gradients of the
shared parameters with two fresh instances of the vanilla aggregator.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests.test_sharpness import (M, algorithm1, is_head, leaves_of, loss_fn, make_problem,
                                  task_value_and_grad)

RHO_SH, RHO_NS = 0.2, 0.4

AGGREGATORS = {
    "mean": lambda: mo.mean(),
    "mgda": lambda: mo.mgda(),
    "pcgrad": lambda: mo.pcgrad(seed=3),
    "cagrad": lambda: mo.cagrad(c=0.4),
    "imtl": lambda: mo.imtl(),
    "nash_mtl": lambda: mo.nash_mtl(num_tasks=M),
}
HEADS_WEIGHTED = {"mean"}


# (adaptive, partition) cases: all four for the cheap closed-form methods; the two
# "diagonal" ones for the solver-based methods (each still sees adaptive on and off,
# with and without a partition); Nash-MTL only the full case. This keeps the file
# short (each case traces and compiles its own flat step). The offsets and
# SAM gradients themselves are checked against Algorithm 1 for all four cases in
# test_sharpness.py.
ALL_CASES = [(False, False), (False, True), (True, False), (True, True)]
DIAGONAL = [(False, False), (True, True)]


def _agg_cases():
  out = []
  for name in AGGREGATORS:
    marks = ()
    if not hasattr(mo, name):
      marks = pytest.mark.skip(reason=f"mo.{name} does not exist yet")
    cases = ALL_CASES if name in ("mean", "imtl") else DIAGONAL
    if name == "nash_mtl":  # its solver is the slowest to compile: the full case only
      cases = [(True, True)]
    for adaptive, partition in cases:
      out.append(pytest.param(name, adaptive, partition, marks=marks,
                              id=f"{name}-adaptive={adaptive}-partition={partition}"))
  return out


@functools.lru_cache(maxsize=None)
def reference_grads(adaptive, partition):
  """(params, x, y, loss grads, SAM grads) from Algorithm 1, float64 NumPy leaves."""
  with jax.enable_x64(True):
    params, x, y = make_problem()
    _, sam, _ = algorithm1(params, x, y, RHO_SH, RHO_NS, adaptive, partition)
    loss = []
    for i in range(M):
      _, g = task_value_and_grad(params, x, y, i)
      loss.append([np.asarray(v) for v in jax.tree_util.tree_leaves(g)])
    loss = [np.stack([r[k] for r in loss]) for k in range(len(loss[0]))]
    return params, x, y, loss, sam


def rows(leaves, mask):
  """Flattened shared rows J (m × n) of the selected leaves."""
  return np.concatenate([l.reshape(l.shape[0], -1) for l, s in zip(leaves, mask) if s], axis=1)


def unflatten_rows(vec, leaves, mask):
  out, k = [], 0
  for l, s in zip(leaves, mask):
    if s:
      n = int(np.prod(l.shape[1:]))
      out.append(vec[k:k + n].reshape(l.shape[1:]))
      k += n
    else:
      out.append(None)
  return out


def vanilla(tx, j, state=None, losses=None):
  state = tx.init({"w": jnp.zeros(j.shape[1])}) if state is None else state
  d, state = tx.update({"w": jnp.asarray(j)}, state, None, losses=losses)
  return np.asarray(d["w"]), state


def reference_update(name, variant, adaptive, partition):
  params, x, y, loss, sam = reference_grads(adaptive, partition)
  leaves = jax.tree_util.tree_leaves(params)
  heads = [is_head(p, l) for p, l in jax.tree_util.tree_flatten_with_path(params)[0]]
  if not partition:
    heads = [False] * len(heads)
  shared = [not h for h in heads]
  losses = np.asarray(loss_fn(params, x, y))
  g, s = rows(loss, shared), rows(sam, shared)
  h = s - g
  make = AGGREGATORS[name]
  a = make()

  def flat_term():
    if mo.aggregator_info(a).scale_degree == 1:
      return vanilla(make(), h, losses=losses)[0]
    # Not linear in the scale (Nash-MTL): r · A(h / r), r = ‖h‖/‖g‖.
    r = np.linalg.norm(h) / np.linalg.norm(g)
    return r * vanilla(make(), h / r, losses=losses)[0]

  if variant == "decomposed":
    d_loss, st = vanilla(a, g, losses=losses)
    d = d_loss + flat_term()
  elif variant == "direct":
    d, st = vanilla(a, s, losses=losses)
  elif variant == "second":
    d_loss, st = vanilla(a, g, losses=losses)
    d, _ = vanilla(make(), np.stack([d_loss, flat_term()]))
  else:  # each: per task [g_i, h_i] with one state threaded through the tasks
    pair_tx, pair_state, v = make(), None, []
    for i in range(M):
      v_i, pair_state = vanilla(pair_tx, np.stack([g[i], h[i]]), pair_state)
      v.append(v_i)
    d, st = vanilla(a, np.stack(v), losses=losses)
  weights = np.asarray(mo.task_weights(st)) if name in HEADS_WEIGHTED else np.ones(M)
  out = unflatten_rows(d, loss, shared)
  for k, is_h in enumerate(heads):
    if is_h:
      out[k] = np.tensordot(weights, sam[k], axes=1)
  return params, x, y, losses, out, weights


@functools.lru_cache(maxsize=None)
def library_grads(adaptive, partition, rho_sh=RHO_SH, rho_ns=RHO_NS):
  """Losses, loss and SAM gradients from the library pipeline (float64)."""
  with jax.enable_x64(True):
    params, x, y = make_problem()
    ts = is_head if partition else None
    pert = mo.task_perturbation(rho_sh, rho_ns, adaptive=adaptive, task_specific=ts)
    losses, grads, sam = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert)
    return params, losses, grads, sam


def flat_update(name, variant, adaptive, partition):
  params, losses, grads, sam = library_grads(adaptive, partition)
  tx = mo.flat(AGGREGATORS[name](), variant, task_specific=is_head if partition else None)
  upd, state = tx.update(grads, tx.init(params), params, losses=losses, sam_grads=sam)
  return leaves_of(upd), state


@pytest.mark.parametrize("name,adaptive,partition", _agg_cases())
def test_decomposed_matches_algorithm1(name, adaptive, partition, x64):
  got, state = flat_update(name, "decomposed", adaptive, partition)
  *_, want, weights = reference_update(name, "decomposed", adaptive, partition)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)
  # mo.task_weights reads the loss aggregation's state.
  if name in HEADS_WEIGHTED:
    np.testing.assert_allclose(mo.task_weights(state), weights, rtol=1e-12)


@pytest.mark.parametrize("variant,name", [("direct", "pcgrad"),
                                          ("each", "imtl"), ("second", "mean"),
                                          ("second", "pcgrad")])
def test_ablation_variants_match_reference(variant, name, x64):
  got, _ = flat_update(name, variant, adaptive=True, partition=True)
  *_, want, _ = reference_update(name, variant, True, True)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)


def test_flat_mean_is_sam_on_each_task_separately(partition=True):
  """Two tasks: flat(mean) = (1/2) Σ_i ∇L_i(θ + ρ ∇L_i/‖∇L_i‖), plain SAM per task."""
  with jax.enable_x64(True):
    params, x, y = make_problem(m=2, seed=5)
    rho = 0.3
    want = None
    for i in range(2):
      _, g = task_value_and_grad(params, x, y, i)
      n = np.sqrt(sum(np.sum(np.asarray(v) ** 2) for v in jax.tree_util.tree_leaves(g)))
      point = jax.tree.map(lambda p, gi: p + rho * gi / (n + 1e-12), params, g)
      gs = jax.tree.map(lambda v: 0.5 * np.asarray(v), task_value_and_grad(point, x, y, i)[1])
      want = gs if want is None else jax.tree.map(np.add, want, gs)
    ts = is_head if partition else None
    pert = mo.task_perturbation(rho, rho, norm="joint", task_specific=ts)
    tx = mo.flat(mo.mean(), task_specific=ts)
    losses, grads, sam = mo.sharpness_aware_task_grads(loss_fn, params, x, y, perturbation=pert)
    got, _ = tx.update(grads, tx.init(params), params, losses=losses, sam_grads=sam)
    for a, b in zip(leaves_of(got), leaves_of(want)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_flat_update(self):
    with jax.enable_x64(True):
      params, losses, grads, sam = library_grads(True, True)
      # The most involved variant: lax.scan over tasks, two inner states.
      tx = mo.flat(mo.imtl(), "each", task_specific=is_head)
      state = tx.init(params)
      fn = self.variant(lambda g, s, st, l: tx.update(g, st, params, losses=l, sam_grads=s))
      got, got_state = fn(grads, sam, state, losses)
      want, want_state = tx.update(grads, state, params, losses=losses, sam_grads=sam)
      for a, b in zip(leaves_of(got), leaves_of(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
      chex.assert_trees_all_close(got_state, want_state, rtol=1e-12, atol=1e-14)


def test_state_structure_is_constant_with_num_tasks(x64):
  params, losses, grads, sam = library_grads(False, True)
  for variant in ("decomposed", "direct", "each", "second"):
    if variant == "decomposed":  # stateful: PCGrad's PRNG key
      tx = mo.flat(mo.pcgrad(num_tasks=M), variant, task_specific=is_head)
    else:
      inner = mo.imtl(num_tasks=M) if variant == "direct" else mo.imtl()
      tx = mo.flat(inner, variant, task_specific=is_head)
    state = tx.init(params)
    _, new = tx.update(grads, state, params, losses=losses, sam_grads=sam)
    if variant in ("decomposed", "direct"):
      assert jax.tree.structure(new) == jax.tree.structure(state), variant
    else:  # the pair state is built complete at init
      assert jax.tree.structure(new.pair) == jax.tree.structure(state.pair), variant
    # Independent states: the loss and flat aggregations each advanced their own key.
    if variant in ("decomposed", "second"):
      assert new.loss.count == 1 and new.flat.count == 1
    if variant == "decomposed":
      assert not np.array_equal(new.loss.inner, state.loss.inner)
      np.testing.assert_array_equal(new.loss.inner, new.flat.inner)  # same seed, same history
    if variant == "each":
      assert new.pair.count == M  # one 2-row aggregation per task, in sequence


def test_nonfinite_inputs_skip_the_step(x64):
  params, losses, grads, sam = library_grads(False, True)
  sam = jax.tree.map(lambda a: a, sam)
  sam["heads"]["h1"]["w"] = sam["heads"]["h1"]["w"].at[1, 0].set(jnp.nan)
  tx = mo.flat(mo.pcgrad(num_tasks=M), task_specific=is_head)
  state = tx.init(params)
  upd, new = tx.update(grads, state, params, losses=losses, sam_grads=sam)
  for leaf in leaves_of(upd):
    np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_array_equal(new.loss.inner, state.loss.inner)
  np.testing.assert_array_equal(new.flat.inner, state.flat.inner)
  assert int(mo.diagnostics(new)["nonfinite_tasks"]) == 1


def test_errors(x64):
  params, losses, grads, sam = library_grads(False, True)
  tx = mo.flat(mo.cagrad(), task_specific=is_head)
  state = tx.init(params)
  with pytest.raises(ValueError, match="sam_grads"):
    tx.update(grads, state, params, losses=losses)
  with pytest.raises(ValueError, match="structure"):
    tx.update(grads, state, params, losses=losses, sam_grads={"trunk": sam["trunk"]})
  with pytest.raises(ValueError, match="variant"):
    mo.flat(mo.cagrad(), "both")
  with pytest.raises(TypeError):
    mo.flat(optax.adam(1e-3))
  with pytest.raises(ValueError, match="losses"):
    mo.flat(mo.mgda("loss"), "each")
  with pytest.raises(TypeError, match="state"):
    tx.update(grads, mo.cagrad().init(params), params, sam_grads=sam)
  # A mask on the inner aggregator no longer matches the shared sub-tree: clear error.
  mask = jax.tree.map(lambda _: False, params)
  mask["heads"] = jax.tree.map(lambda _: True, mask["heads"])
  bad = mo.flat(mo.cagrad(task_specific=mask), task_specific=mask)
  with pytest.raises(ValueError, match="without task_specific"):
    bad.update(grads, bad.init(params), params, sam_grads=sam)
  with pytest.raises(ValueError, match="task-specific"):
    mo.flat(mo.mean(), task_specific=lambda p, l: True).init(params)
  with pytest.raises(ValueError, match="2-row"):
    mo.flat(mo.pcgrad(num_tasks=3), "second").init(params)
  with pytest.raises(ValueError, match="loss-based"):
    mo.flat(mo.mgda("loss")).update(grads, mo.flat(mo.mgda("loss")).init(params), params,
                                    sam_grads=sam)


def test_train_step_helper_runs_flat_imtl():
  params, x, y = make_problem(dtype=jnp.float32)
  pert = mo.task_perturbation(0.05, 0.05, adaptive=True, task_specific=is_head)
  tx = optax.chain(mo.flat(mo.imtl(num_tasks=M), task_specific=is_head), optax.adam(1e-2))
  step = mo.make_train_step(loss_fn, tx, perturbation=pert)
  state = tx.init(params)
  first = None
  for _ in range(5):
    params, state, losses, _ = step(params, state, x, y)
    first = losses if first is None else first
  assert np.all(np.isfinite(losses)) and np.sum(losses) < np.sum(first)
  assert mo.task_weights(state).shape == (M,)
