"""NGDiff: normalised gradient difference for unlearning (Jin, Bu et al., NAACL 2025)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import jacobian as jacobian_lib
from mtl_optax._src import linalg
from mtl_optax._src.methods._common import state_dtype


class NGDiffState(NamedTuple):
  """Automatic learning rate bookkeeping (all zeros / unused when ``auto_lr=False``).

  Attributes:
    learning_rate: η of the next step.
    prev_objective: F(θ_{t−1}) = w_{t−1}ᵀ L_{t−1}.
    prev_weights: w_{t−1} (F is evaluated with these frozen weights).
    prev_sq_norm: ‖d_{t−1}‖² = ∇F(θ_{t−1})ᵀ d_{t−1}.
    has_prev: whether a previous step exists.
  """
  learning_rate: jax.Array
  prev_objective: jax.Array
  prev_weights: jax.Array
  prev_sq_norm: jax.Array
  has_prev: jax.Array


def ngdiff(*, ascend_forget: bool = True, auto_lr: bool = False, learning_rate: float = 1e-5,
           lr_smoothing: float = 0.9, task_specific=None, weight_heads: Optional[bool] = None,
           nonfinite: str = "skip"):
  """NGDiff: the normalised gradient difference of a retain and a forget objective.

  Two tasks, in this order: task 0 the retain loss L_R (minimised), task 1 the
  forget loss L_F (the language-model loss on the forget set, maximised when
  ``ascend_forget=True``). The update direction (subtracted by the outer
  optimizer, like every aggregator here) is

      d = g_R / ‖g_R‖ − g_F / ‖g_F‖,   i.e.  w = (1/‖g_R‖, −1/‖g_F‖),

  the gradient of the dynamically scalarised F = L_R/‖g_R‖ − L_F/‖g_F‖, so
  each objective moves the parameters equally no matter how their gradient
  scales differ (GDiff, d = g_R − g_F, is dominated by the larger one). With
  ``ascend_forget=False`` task 1 is already an objective to minimise (e.g.
  −L_F) and d = g_R/‖g_R‖ + g_1/‖g_1‖. A zero gradient contributes nothing.
  Exactly two tasks: any other m raises a ValueError at trace time.

  Automatic learning rate (``auto_lr=True``). The paper picks the step size η
  of each update with GeN (Bu & Xu, generalised Newton): fit the quadratic
  F(θ − η d) ≈ F − η ∇Fᵀd + ½η² dᵀHd and take its minimiser
  η* = ∇Fᵀd / dᵀHd, where dᵀHd comes from extra forward passes at θ ± η d.
  An optax transformation has no forward passes, so here the curvature comes
  from the step just taken (a secant along the previous direction, Hessian
  free): with F frozen at the previous weights, θ_t = θ_{t−1} − η d_{t−1}
  and ∇F(θ_{t−1})ᵀd_{t−1} = ‖d_{t−1}‖²,

      q = 2 (F(θ_t) − F(θ_{t−1}) + η ‖d_{t−1}‖²) / η²,   η* = ‖d_{t−1}‖² / q,

  smoothed as η ← β η + (1 − β) η* (β = ``lr_smoothing``); η is kept when
  q ≤ 0 or is not finite (no curvature information). The returned update is
  then η d: chain with ``optax.scale(-1.0)`` (or ``optax.sgd(1.0)``), not
  with a second learning rate, since the estimate assumes the step taken
  was exactly η d. What is not reproduced: GeN's extra forward passes along
  the current direction (our curvature is one step stale) and its
  every-Φ-steps schedule. Diagnostics: ``learning_rate``, ``curvature`` (q).

  Args:
    ascend_forget: task 1 is maximised (default True) or minimised.
    auto_lr: scale the update by the automatic learning rate (default False:
      the plain normalised direction, for any outer optimizer).
    learning_rate: η_0, the first step size of the automatic schedule.
    lr_smoothing: β ∈ [0, 1) of the EMA of η (default 0.9).
    task_specific, weight_heads, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient, times η
      when ``auto_lr``).

  Reference:
    Jin, Bu, Vinzamuri, Ramakrishna, Chang, Cevher & Hong, "Unlearning as
    Multi-task Optimization: A Normalized Gradient Difference Approach with an
    Adaptive Learning Rate", NAACL 2025 (arXiv 2410.22086).
  """
  name = "ngdiff"
  base.check_positive(name, learning_rate=learning_rate)
  if not (isinstance(lr_smoothing, (int, float)) and 0.0 <= lr_smoothing < 1.0):
    raise ValueError(f"{name}: lr_smoothing must be in [0, 1), got {lr_smoothing!r}.")
  # Degree 0 (normalised rows); with auto_lr the secant step size has no single degree.
  info = base.AggregatorInfo(name=name, needs_losses=auto_lr,
                             scale_degree=None if auto_lr else 0)
  weight_heads = bool(weight_heads)  # default: each head its own gradient (a gradient method)
  sign = -1.0 if ascend_forget else 1.0

  def init_inner(params, _):
    dtype = state_dtype(params)
    return NGDiffState(learning_rate=jnp.asarray(learning_rate, dtype),
                       prev_objective=jnp.zeros((), dtype), prev_weights=jnp.zeros((2,), dtype),
                       prev_sq_norm=jnp.zeros((), dtype), has_prev=jnp.zeros((), bool))

  def rule(view, st):
    if view.num_tasks != 2:
      raise ValueError(
          f"{name} is defined for exactly two objectives (task 0 = retain, task 1 = forget); "
          f"the gradients have m={view.num_tasks} tasks.")
    # 1/‖g_i‖ = 1/(s_i ‖r_i‖) from the per-row-scaled Gram matrix: exact for any scale.
    inv = linalg.safe_div(1.0, linalg.safe_norms(view.row_gram) * view.row_scales)
    w = inv * jnp.asarray([1.0, sign], inv.dtype)
    if not auto_lr:
      return base.RuleOutput(state=st, weights=w)
    dtype = st.learning_rate.dtype
    losses = view.losses.astype(dtype)
    eta = st.learning_rate
    sq = jnp.maximum(w @ view.gram @ w, 0.0).astype(dtype) * (view.scale ** 2).astype(dtype)
    f_now = st.prev_weights @ losses
    curv = 2.0 * (f_now - st.prev_objective + eta * st.prev_sq_norm) / (eta * eta)
    target = linalg.safe_div(st.prev_sq_norm, curv)
    ok = st.has_prev & (curv > 0) & jnp.isfinite(target) & (target > 0)
    new_eta = jnp.where(ok, lr_smoothing * eta + (1.0 - lr_smoothing) * target, eta)
    new_state = NGDiffState(learning_rate=new_eta, prev_objective=w.astype(dtype) @ losses,
                            prev_weights=w.astype(dtype), prev_sq_norm=sq,
                            has_prev=jnp.ones((), bool))
    # Heads step by η too (their own gradient, or w when weight_heads).
    head_w = None if weight_heads else jnp.full((2,), new_eta, w.dtype)
    return base.RuleOutput(state=new_state, weights=new_eta.astype(w.dtype) * w,
                           head_weights=head_w,
                           diagnostics={"learning_rate": new_eta,
                                        "curvature": jnp.where(st.has_prev, curv, 0.0)})

  tx = base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                            weight_heads=weight_heads, num_tasks=2, nonfinite=nonfinite)
  inner_update = tx.update

  def update_fn(updates, state, params=None, **extra):
    shapes = updates.shapes if isinstance(updates, jacobian_lib.FactoredJacobian) else updates
    m = base.num_tasks_of(shapes, name)
    if m != 2:
      raise ValueError(
          f"{name} is defined for exactly two objectives (task 0 = retain, task 1 = forget); "
          f"the gradients have m={m} tasks.")
    return inner_update(updates, state, params, **extra)

  update_fn.mtl_info = inner_update.mtl_info  # type: ignore[attr-defined]
  return tx._replace(update=update_fn)
