"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(normalization: str = "none", *, max_iters: int | None = None, tol: float = 1e-9,
         task_specific=None, weight_heads: Optional[bool] = None,
         num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Multiple-gradient descent (MGDA).

  With normalised gradients ĝ_i = g_i / n_i,

      α = argmin_{α ∈ Δ} ‖Σ_i α_i ĝ_i‖²,   d = Σ_i α_i ĝ_i = Jᵀw,  w_i = α_i / n_i,

  solved exactly in JAX by an active-set method (closed form for m = 2; the
  reference code uses Frank–Wolfe, which zig-zags on ill-conditioned Gram
  matrices). d is a common descent direction: g_iᵀd ≥ ‖d‖² for every task.
  Normalisations (as in LibMTL): "none" (n_i = 1, the paper), "l2"
  (n_i = ‖g_i‖), "loss" (n_i = L_i), "loss+" (n_i = L_i ‖g_i‖). Run on the
  gradients of a shared representation (``representation_update``) this is
  MGDA-UB. Zero gradients (n_i = 0) get weight 0.

  Args:
    normalization: "none" (default), "l2", "loss" or "loss+"; the last two need
      ``losses=``.
    max_iters: active-set iteration budget (default 4m + 10).
    tol: relative tolerance on the KKT multipliers (default 1e-9); the
      reached KKT residual is ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  References:
    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Math. 2012; Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mgda: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  base.check_positive("mgda", tol=tol)
  if max_iters is not None:
    base.check_positive("mgda", max_iters=max_iters)
  info = base.AggregatorInfo(name="mgda", needs_losses=normalization in ("loss", "loss+"),
                             representation="variant")

  def rule(view, inner):
    gram = view.gram
    norms = linalg.safe_norms(gram) * view.scale.astype(gram.dtype)  # true ‖g_i‖
    if normalization == "none":
      n = jnp.ones_like(norms)
    elif normalization == "l2":
      n = norms
    else:
      loss = jnp.abs(view.losses.astype(gram.dtype))
      n = loss if normalization == "loss" else loss * norms
    g_hat = linalg.normalize_gram(gram, n)
    sol = linalg.min_norm_on_simplex(g_hat, max_iters=max_iters, tol=tol)
    w = linalg.safe_div(sol.x, n)
    return base.RuleOutput(state=inner, weights=w,
                           diagnostics={"residual": sol.residual, "iterations": sol.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
