"""CDTT: central direction with task tensioners (Nakamura et al., Neurocomputing 2022)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype
from mtl_optax._src.methods.edm import edm_weights

Array = jax.Array


class CDTTState(NamedTuple):
  """Sliding window of per-task gradient norms, its previous sum, and the step count."""
  norm_window: Array  # (m, window): ‖g_i‖ of the last `window` non-skipped steps
  prev_sum: Array     # (m,): window sum at the previous step
  steps: Array        # int32: number of non-skipped steps so far


def tension(parametrization: Array, alpha: float) -> Array:
  """Tension factor t = max(0, α·σ(e·(p − 1)) + 1 − α) (σ the logistic function)."""
  return jnp.maximum(alpha * jax.nn.sigmoid(math.e * (parametrization - 1.0)) + 1.0 - alpha, 0.0)


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@jax.jit
def direction_check(gram: Array, w: Array):
  """Makes v = Jᵀw non-conflicting with each task in turn (CDTT's angle check).

  For i = 1..m in order: if g_iᵀv < 0, v is replaced by the point where the
  segment [g_i, v] crosses the hyperplane g_i⊥,
  v ← c (v − (g_iᵀv/‖g_i‖²) g_i) with c = ‖g_i‖²/(‖g_i‖² − g_iᵀv) ∈ (0, 1);
  this is the reference code's tan(π − ∠(g_i, v − g_i))·‖g_i‖ construction in
  closed form (no trigonometry). Later checks see the corrected v, so earlier
  tasks may conflict again (as in the reference). Invariant to a common
  scaling of G.

  Returns:
    ``(w, corrections)``.
  """
  m = gram.shape[0]
  diag = jnp.diagonal(gram)

  def body(i, carry):
    w, count = carry
    gv = jnp.dot(gram[i], w, precision=jax.lax.Precision.HIGHEST)
    bad = (gv < 0) & (diag[i] > 0)
    c = linalg.safe_div(diag[i], diag[i] - gv, fill=1.0)
    w_new = c * w
    w_new = w_new.at[i].add(-c * linalg.safe_div(gv, diag[i]))
    return jnp.where(bad, w_new, w), count + bad.astype(jnp.int32)

  return jax.lax.fori_loop(0, m, body, (w, jnp.zeros((), jnp.int32)))


def cdtt(alpha: float = 0.2, window: int = 10, *, max_iters: Optional[int] = None,
         tol: float | None = None, task_specific=None, weight_heads: Optional[bool] = None,
         num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """CDTT: the EDM central direction pulled towards each task by a "tension".

  Each step starts from EDM's direction d₀ = Σ_i β_i g_i (:func:`mtl_optax.edm`,
  Σβ = 1). The norms ‖g_i‖ of the last W = ``window`` steps are kept; with
  S_i the current window sum and S_i' the previous step's,

      p_i = S_i / S_i' + log₁₀ L_i,        t_i = max(0, α·σ(e(p_i − 1)) + 1 − α),
      v = d₀ + Σ_i t_i (g_i − d₀)/‖g_i − d₀‖,

  (a task whose gradient norm grows or whose loss is large pulls harder), then
  v is made non-conflicting task by task (:func:`direction_check`) and d = v.
  The tensions are unit vectors scaled by t ∈ [1 − α, 1] (for α ≤ 1): unlike
  d₀ they do not scale with the gradients, as in the reference code.
  The first W steps (window filling) and the (W+1)-th (no previous sum yet)
  use d = d₀. d = Jᵀw; the weights are ``diagnostics["weights"]``.

  If a task gradient is zero, the shared update is 0 and the state is not
  advanced (as the reference code). A task whose gradient equals d₀ exactly
  gets no tension (its direction is undefined; the reference code would
  produce NaN). Losses ≤ 0 are floored at the dtype's smallest normal number
  before the log. The distances ‖g_i − d₀‖ are computed from the gradients
  themselves (not from the Gram matrix, whose cancellation would turn a small
  difference into a spurious unit tension).

  State (:class:`CDTTState`): the (m, W) window of norms, the previous window
  sums, and the step count; requires ``num_tasks``.

  Args:
    alpha: sensitivity α ≥ 0 of the tension (default 0.2, Gama & Grassi's
      default; they tune it in {0.2, 0.4, 0.6, 0.8, 1.0}).
    window: W, the number of steps in the sliding window of norms (default 10).
    max_iters, tol: of the EDM min-norm solver (see :func:`mtl_optax.edm`).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. Needs ``losses=``; heads get their own
      unweighted gradient by default (as in the reference code).

  Diagnostics: ``edm_weights`` (β), ``tensions`` (t; 0 while inactive),
  ``corrections`` (direction-check corrections), ``residual``, ``iterations``
  (of the min-norm solver).

  References:
    Nakamura et al., "Leveraging convergence behavior to balance conflicting
    tasks in multi-task learning", Neurocomputing 2022 (arXiv 2204.06698,
    code: tiemink/MTL_TaskTensioner); as
    implemented by Gama & Grassi, "Uniform Loss vs. Specialized Optimization"
    (arXiv 2505.10347, ``optimizers/task_tensioners.py``).
  """
  name = "cdtt"
  if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
          and 0 <= alpha < math.inf):
    raise ValueError(f"{name}: alpha must be a finite non-negative number, got {alpha!r}.")
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(f"{name}: window must be a positive int, got {window!r}.")
  if tol is not None:
    base.check_positive(name, tol=tol)
  if max_iters is not None:
    base.check_positive(name, max_iters=max_iters)
  m_fixed = require_num_tasks(name, num_tasks, "a sliding window of per-task gradient norms")
  # No scale_degree: d₀ (EDM) has degree 1 but the unit tension vectors degree 0,
  # and which one dominates depends on the step and on the scale.
  info = base.AggregatorInfo(name=name, needs_losses=True, reads_rows=True)

  def init_inner(params, _):
    dtype = state_dtype(params)
    return CDTTState(norm_window=jnp.zeros((m_fixed, window), dtype),
                     prev_sum=jnp.zeros((m_fixed,), dtype),
                     steps=jnp.zeros((), jnp.int32))

  def rule(view, st):
    m = view.num_tasks
    dtype = view.row_gram.dtype
    r_norms = linalg.safe_norms(view.row_gram)
    all_ok = jnp.all(r_norms > 0)
    edm = edm_weights(view.row_gram, view.row_scales, max_iters=max_iters, tol=tol)
    beta = edm.weights

    # Sliding window of the true norms ‖g_i‖ = row_scales_i·√R_ii.
    norms = (view.row_scales * r_norms).astype(st.norm_window.dtype)
    window_new = st.norm_window.at[:, st.steps % window].set(norms)
    steps_new = st.steps + 1
    sums = jnp.sum(window_new, axis=1)
    active = steps_new >= window + 1

    losses = view.losses.astype(dtype)
    floor = jnp.finfo(dtype).tiny
    param = linalg.safe_div(sums, st.prev_sum, fill=1.0).astype(dtype) \
        + jnp.log10(jnp.maximum(losses, floor))
    t = tension(param, alpha)

    # ‖g_i − d₀‖ from the gradients, in units of view.scale (a power of two).
    scale = view.scale
    sq = jnp.zeros((m,), dtype)
    for leaf in view.shared:
      acc = linalg.accumulation_dtype(leaf.dtype)
      rows = leaf.astype(acc).reshape(m, -1) / scale.astype(acc)
      d0 = linalg.combine(beta.astype(acc), rows)
      sq = sq + jnp.sum(jnp.square(rows - d0[None, :]), axis=1).astype(dtype)
    dist = jnp.sqrt(sq) * scale
    tau = jnp.where(dist > 0, linalg.safe_div(t, dist), 0.0)
    w_tension = beta + tau - beta * jnp.sum(tau)
    w_tension, corrections = direction_check(view.gram, w_tension)

    w = jnp.where(active, w_tension, beta)
    w = jnp.where(all_ok, w, 0.0)
    corrections = jnp.where(active & all_ok, corrections, 0)
    new_state = CDTTState(norm_window=window_new, prev_sum=sums.astype(st.prev_sum.dtype),
                          steps=steps_new)
    new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(all_ok, n, o), new_state, st)
    return base.RuleOutput(state=new_state, weights=w, diagnostics={
        "edm_weights": beta, "tensions": jnp.where(active & all_ok, t, 0.0),
        "corrections": corrections, "residual": edm.solver.residual,
        "iterations": edm.solver.iterations})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=False if weight_heads is None else weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
