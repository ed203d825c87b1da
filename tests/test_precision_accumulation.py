"""Mixed precision (bfloat16 gradients, float32 arithmetic), loss scaling, accumulation.

* bfloat16 per-task gradients: the Gram matrix, the solver and the weights are
  float32; the update keeps the gradients' dtype. Checked against a float64
  NumPy Gram of the same bfloat16 values, and against the same method run on
  those values upcast to float32.
* Loss scaling contract: unscale the stacked gradients (and the losses) before
  aggregating; a non-finite (overflowed) scaled gradient is skipped by the
  aggregator and reported in ``diagnostics["nonfinite_tasks"]``.
* Gradient accumulation with ``optax.MultiSteps``, both modes, against explicit
  references: "accumulate, then aggregate" (``mo.distributed.accumulate_task_grads``)
  equals one step on the mean stacked gradients (= the full batch); "aggregate
  every micro-batch" (``optax.chain(aggregator, optax.MultiSteps(opt, k))``)
  equals averaging per-micro-batch aggregates — for a deterministic solver
  (mgda), a random method (pcgrad) and a stateful loss-based one (famo).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# ---------------------------------------------------------------------------
# bfloat16 gradients.
# ---------------------------------------------------------------------------

BF16_METHODS = ("mean", "mgda", "cagrad", "pcgrad", "upgrad", "nash_mtl", "famo")
M_BF16, N_BF16 = 3, 4096


def _bf16_problem():
  rng = np.random.default_rng(0)
  base = rng.standard_normal((1, N_BF16))
  # Partly aligned rows with different norms, like real task gradients.
  j = np.concatenate([base + 0.8 * rng.standard_normal((1, N_BF16)),
                      -0.3 * base + rng.standard_normal((1, N_BF16)),
                      3.0 * (0.5 * base + rng.standard_normal((1, N_BF16)))])
  j_bf16 = jnp.asarray(j, jnp.bfloat16)
  # A parameter tree with two shared leaves (the split is irrelevant for the Gram).
  grads = {"a": j_bf16[:, :1024].reshape(M_BF16, 32, 32), "b": j_bf16[:, 1024:]}
  losses = jnp.asarray([0.7, 1.3, 2.1], jnp.float32)
  return grads, losses


@pytest.mark.parametrize("name", BF16_METHODS)
def test_bfloat16_gradients_float32_arithmetic(name):
  if not hasattr(mo, name):
    pytest.skip(f"mo.{name} is not in mtl_optax yet")
  grads, losses = _bf16_problem()
  params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:], jnp.bfloat16), grads)
  tx = getattr(mo, name)(num_tasks=M_BF16)
  run = jax.jit(lambda g, s, p, l: tx.update(g, s, p, losses=l), compiler_options=FAST)
  update, state = run(grads, tx.init(params), params, losses)
  diag = mo.diagnostics(state)

  # dtypes: float32 diagnostics and weights, the update in the gradients' dtype.
  assert diag["gram"].dtype == jnp.float32
  if "weights" in diag:
    assert diag["weights"].dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(update):
    assert leaf.dtype == jnp.bfloat16

  # The Gram matrix is accumulated in float32: it matches float64 on the same
  # bfloat16 values to float32 round-off; bfloat16 accumulation would not.
  rows = np.concatenate([np.asarray(g, np.float64).reshape(M_BF16, -1)
                         for g in jax.tree_util.tree_leaves(grads)], axis=1)
  gram64 = rows @ rows.T
  np.testing.assert_allclose(np.asarray(diag["gram"], np.float64), gram64, rtol=1e-5,
                             atol=1e-5 * np.abs(gram64).max())
  flat_bf16 = jnp.concatenate([g.reshape(M_BF16, -1) for g in jax.tree_util.tree_leaves(grads)],
                              axis=1)
  gram_in_bf16 = np.asarray(jnp.dot(flat_bf16, flat_bf16.T, preferred_element_type=jnp.bfloat16),
                            np.float64)
  assert np.abs(gram_in_bf16 - gram64).max() > 1e-3 * np.abs(gram64).max()  # the control

  # Same method on the same values in float32: identical weights, update within
  # the bfloat16 rounding of the float32 update.
  grads32 = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
  params32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
  update32, state32 = run(grads32, tx.init(params32), params32, losses)
  if "weights" in diag:
    np.testing.assert_allclose(diag["weights"], mo.diagnostics(state32)["weights"],
                               rtol=1e-5, atol=1e-7)
  for u16, u32 in zip(jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(update32)):
    u32 = np.asarray(u32)
    np.testing.assert_allclose(np.asarray(u16, np.float32), u32, rtol=2.0 ** -8,
                               atol=1e-6 * np.abs(u32).max())


# ---------------------------------------------------------------------------
# Loss scaling.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ("mgda", "cagrad", "uncertainty_weighting"))
def test_loss_scaling_contract_unscale_before_aggregating(name):
  """Scaled float16 gradients of S·L, unscaled by S (a power of two, exact) before
  the aggregator, give exactly the unscaled float16 result; an overflowed step is
  skipped (zero update, state kept) and reported, so the scaler can back off."""
  if not hasattr(mo, name):
    pytest.skip(f"mo.{name} is not in mtl_optax yet")
  rng = np.random.default_rng(1)
  g = jnp.asarray(rng.standard_normal((3, 64)), jnp.float16)
  losses = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
  params = {"w": jnp.zeros((64,), jnp.float16)}
  tx = getattr(mo, name)(num_tasks=3)
  state = tx.init(params)
  scale = jnp.float16(2.0 ** 8)

  update = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l), compiler_options=FAST)
  ref, ref_state = update({"w": g}, state, losses)
  scaled = {"w": g * scale}                                   # what backprop of S·L gives
  unscaled = jax.tree_util.tree_map(lambda x: x / scale, scaled)
  out, out_state = update(unscaled, state, (losses * 256.0) / 256.0)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(ref["w"]))
  for a, b in zip(jax.tree_util.tree_leaves(out_state), jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Overflow: the scale was too large for one task, its scaled gradient is inf.
  overflow = {"w": g.at[1, 3].set(jnp.inf)}
  out, bad_state = update(overflow, state, losses)
  assert not np.any(np.asarray(out["w"])), "the overflowed step must be skipped"
  assert int(mo.diagnostics(bad_state)["nonfinite_tasks"]) == 1
  for a, b in zip(jax.tree_util.tree_leaves(bad_state.inner), jax.tree_util.tree_leaves(state.inner)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# Gradient accumulation.
# ---------------------------------------------------------------------------

M, K, MICRO, STEPS = 3, 3, 4, 2   # tasks, micro-batches per step, micro-batch size, steps
ACC_METHODS = ("mgda", "pcgrad", "famo")


def _acc_loss(p, x, y):
  h = jnp.tanh(x @ p["trunk"])
  return jnp.mean((h @ p["heads"].T - y) ** 2, axis=0) + 0.05


def _acc_data():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((STEPS, K, MICRO, 5)).astype(np.float32)
  y = np.stack([np.sin(x[..., 0]), x[..., 1] - np.sin(x[..., 0]), np.cos(x[..., 2])], -1)
  params = {"trunk": (0.5 * rng.standard_normal((5, 8))).astype(np.float32),
            "heads": (0.5 * rng.standard_normal((M, 8))).astype(np.float32)}
  return (jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(x),
          jnp.asarray(y.astype(np.float32)))


def _agg(name):
  is_head = lambda path, leaf: "heads" in jax.tree_util.keystr(path)
  return getattr(mo, name)(task_specific=is_head, num_tasks=M)


def _tree_close(a, b, rtol=2e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * max(np.abs(y).max(), 1e-6))


@pytest.mark.parametrize("name", ACC_METHODS)
def test_accumulate_then_aggregate(name):
  """Mode 1: mean of the stacked per-task gradients (and losses) over K micro-batches,
  one aggregation per step; equals the explicit mean and the full-batch step."""
  if not hasattr(mo, name):
    pytest.skip(f"mo.{name} is not in mtl_optax yet")
  params0, x, y = _acc_data()
  outer = optax.chain(_agg(name), optax.adam(1e-2))
  tx = mo.distributed.accumulate_task_grads(outer, K, num_tasks=M)

  @functools.partial(jax.jit, compiler_options=FAST)
  def micro(p, s, xb, yb):
    losses, grads = mo.task_grads(_acc_loss, p, xb, yb)
    u, s = tx.update(grads, s, p, losses=losses)
    return optax.apply_updates(p, u), s, u

  @functools.partial(jax.jit, compiler_options=FAST)
  def reference(p, s, xs, ys):  # explicit: average K stacked gradients, aggregate once
    per = [mo.task_grads(_acc_loss, p, xs[b], ys[b]) for b in range(K)]
    losses = sum(l for l, _ in per) / K
    grads = jax.tree_util.tree_map(lambda *g: sum(g) / K, *[g for _, g in per])
    u, s = outer.update(grads, s, p, losses=losses)
    return optax.apply_updates(p, u), s, losses, grads

  p, s = params0, tx.init(params0)
  p_ref, s_ref = params0, outer.init(params0)
  for t in range(STEPS):
    for b in range(K):
      p_new, s, u = micro(p, s, x[t, b], y[t, b])
      if b < K - 1:  # no update before the K-th micro-batch
        assert all(not np.any(np.asarray(l)) for l in jax.tree_util.tree_leaves(u))
        _tree_close(p_new, p, rtol=0)
      p = p_new
    p_prev = p_ref
    p_ref, s_ref, losses_ref, grads_ref = reference(p_ref, s_ref, x[t], y[t])
    _tree_close(p, p_ref)
    _tree_close(mo.task_weights(s), mo.task_weights(s_ref))
    _tree_close(s.inner_opt_state[0].inner, s_ref[0].inner)  # key / logits / ...
    # The mean over equal-sized micro-batches is the full batch's losses and gradients.
    full_losses, full_grads = mo.task_grads(_acc_loss, p_prev, x[t].reshape(K * MICRO, -1),
                                            y[t].reshape(K * MICRO, -1))
    _tree_close(losses_ref, full_losses)
    _tree_close(grads_ref, full_grads)
  # The aggregator's state advanced once per optimizer step, not once per micro-batch.
  assert int(s.inner_opt_state[0].count) == STEPS
  assert int(s.gradient_step) == STEPS


@pytest.mark.parametrize("name", ACC_METHODS)
def test_aggregate_every_micro_batch(name):
  """Mode 2: chain(aggregator, MultiSteps(adam, K)) aggregates each micro-batch (the
  aggregator's state advances K times per step) and Adam sees the mean aggregate."""
  if not hasattr(mo, name):
    pytest.skip(f"mo.{name} is not in mtl_optax yet")
  params0, x, y = _acc_data()
  agg = _agg(name)
  tx = optax.chain(agg, optax.MultiSteps(optax.adam(1e-2), K))

  @functools.partial(jax.jit, compiler_options=FAST)
  def micro(p, s, xb, yb):
    losses, grads = mo.task_grads(_acc_loss, p, xb, yb)
    u, s = tx.update(grads, s, p, losses=losses)
    return optax.apply_updates(p, u), s

  adam = optax.adam(1e-2)

  @functools.partial(jax.jit, compiler_options=FAST)
  def reference(p, agg_state, adam_state, xs, ys):  # explicit loop over micro-batches
    ds = []
    for b in range(K):
      losses, grads = mo.task_grads(_acc_loss, p, xs[b], ys[b])
      d, agg_state = agg.update(grads, agg_state, p, losses=losses)
      ds.append(d)
    mean_d = jax.tree_util.tree_map(lambda *a: sum(a) / K, *ds)
    u, adam_state = adam.update(mean_d, adam_state, p)
    return optax.apply_updates(p, u), agg_state, adam_state

  p, s = params0, tx.init(params0)
  p_ref, a_ref, o_ref = params0, agg.init(params0), adam.init(params0)
  for t in range(STEPS):
    for b in range(K):
      p, s = micro(p, s, x[t, b], y[t, b])
    p_ref, a_ref, o_ref = reference(p_ref, a_ref, o_ref, x[t], y[t])
    _tree_close(p, p_ref)
    _tree_close(mo.task_weights(s), mo.task_weights(a_ref))
    _tree_close(s[0].inner, a_ref.inner)
  assert int(s[0].count) == STEPS * K


def test_accumulate_task_grads_errors():
  outer = optax.chain(mo.mean(num_tasks=M), optax.sgd(0.1))
  with pytest.raises(ValueError, match="num_tasks"):
    mo.distributed.accumulate_task_grads(outer, K, num_tasks=0)
  with pytest.raises(ValueError, match="losses are always accumulated"):
    mo.distributed.accumulate_task_grads(outer, K, num_tasks=M, stacked_args=("losses",))
  tx = mo.distributed.accumulate_task_grads(outer, K, num_tasks=M, stacked_args=("sam_grads",))
  params = {"w": jnp.zeros((4,))}
  with pytest.raises(ValueError, match="sam_grads"):
    tx.update({"w": jnp.zeros((M, 4))}, tx.init(params), params)
