"""EDM: "follow the bisector", MGDA on normalised gradients (Katrutsa et al., 2020)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg


class EDMWeights(NamedTuple):
  """EDM's weights w (d = Jᵀw, Σw = 1), the min-norm α on unit rows and the solver result."""
  weights: jax.Array
  alpha: jax.Array
  solver: linalg.SolverResult


def edm_weights(row_gram: jax.Array, row_scales: jax.Array, max_iters: Optional[int] = None,
                tol: float | None = None) -> EDMWeights:
  """EDM weights from the per-row-scaled Gram matrix.

  α = argmin_{α∈Δ} ‖Σ α_i u_i‖² over the unit rows u_i = g_i/‖g_i‖ (their Gram
  matrix is the cosine matrix), γ = 1/Σ_i(α_i/‖g_i‖) and w_i = γα_i/‖g_i‖, so
  that d = γ Σ α_i u_i = Σ w_i g_i with Σ w = 1. The ratios α_i/‖g_i‖ are
  formed in log₂ (‖g_i‖ = row_scales_i·√R_ii), so norms differing by 1e±30
  are exact. If any gradient is zero, the weights are 0 (the reference code
  skips the shared update; the min-norm point of the unit rows is undefined).
  """
  r_norms = linalg.safe_norms(row_gram)
  all_ok = jnp.all(r_norms > 0)
  cos = linalg.cosine_matrix(row_gram)
  sol = linalg.min_norm_on_simplex(cos, max_iters=max_iters, tol=tol)
  alpha = sol.x
  pos = (alpha > 0) & (r_norms > 0)
  log_q = jnp.where(pos, jnp.log2(jnp.where(pos, alpha, 1.0))
                    - jnp.log2(row_scales) - jnp.log2(jnp.where(pos, r_norms, 1.0)), -jnp.inf)
  top = jnp.max(log_q)
  q = jnp.where(pos, jnp.exp2(log_q - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  w = linalg.safe_div(q, jnp.sum(q))
  w = jnp.where(all_ok, w, 0.0)
  return EDMWeights(w, alpha, sol)


def edm(*, max_iters: Optional[int] = None, tol: float | None = None, task_specific=None,
        weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
        nonfinite: str = "skip"):
  """EDM ("follow the bisector"): MGDA on the normalised gradients, rescaled.

  With unit gradients u_i = g_i/‖g_i‖,

      α = argmin_{α ∈ Δ} ‖Σ_i α_i u_i‖²,   γ = 1 / Σ_i (α_i/‖g_i‖),
      d = γ Σ_i α_i u_i = Σ_i w_i g_i,     w_i = γ α_i/‖g_i‖   (Σ w = 1).

  For two tasks α = (½, ½) and d = (1/‖g_1‖ + 1/‖g_2‖)⁻¹ (u_1 + u_2), along
  the bisector; the update has the length scale of the gradients (a harmonic
  mean of their norms) instead of MGDA's min-norm length. The min-norm problem
  is solved exactly by :func:`mtl_optax.linalg.min_norm_on_simplex` (the
  reference code uses Frank–Wolfe). A zero task gradient makes the shared
  update 0, as in the reference code. α depends only on the directions of the
  gradients; d is non-conflicting (u_iᵀd ≥ 0 for every task, as MGDA's).

  Args:
    max_iters: active-set budget of the min-norm solver (default 4m + 10).
    tol: relative KKT tolerance of the solver (default 1e-9, or 10·eps in
      float64); the reached
      residual is ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Diagnostics: ``edm_alpha`` (α), ``residual``, ``iterations``.

  References:
    Katrutsa, Merkulov, Tursynbek & Oseledets, "Follow the bisector: a simple
    method for multi-objective optimization", arXiv 2007.06937 (2020); as
    implemented by Gama & Grassi, "Uniform Loss vs. Specialized Optimization"
    (arXiv 2505.10347, ``optimizers/edm.py``).
  """
  name = "edm"
  if tol is not None:
    base.check_positive(name, tol=tol)
  if max_iters is not None:
    base.check_positive(name, max_iters=max_iters)
  info = base.AggregatorInfo(name=name, scale_degree=1)

  def rule(view, inner):
    out = edm_weights(view.row_gram, view.row_scales, max_iters=max_iters, tol=tol)
    return base.RuleOutput(state=inner, weights=out.weights, diagnostics={
        "edm_alpha": out.alpha, "residual": out.solver.residual,
        "iterations": out.solver.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
