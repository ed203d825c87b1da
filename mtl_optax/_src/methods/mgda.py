"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(normalization: str = "none", *, max_iters: int | None = None, tol: float | None = None,
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
  MGDA-UB. A zero gradient makes the min-norm point 0 (Pareto
  stationarity), so the update is 0, whatever the normalisation. The
  normalised Gram matrix is built from per-row-scaled products in log₂, so
  gradients whose norms differ by up to ~1e±37 are handled in float32.

  Args:
    normalization: "none" (default), "l2", "loss" or "loss+"; the last two need
      ``losses=``.
    max_iters: active-set iteration budget (default 4m + 10).
    tol: relative tolerance on the KKT multipliers (default 1e-9, or 10·eps
      in float64); the reached KKT residual is ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Example:
    MGDA-UB: MGDA on the per-task gradients ∂L_i/∂z of the shared
    representation z, min-norm weights from their Gram matrix, then one
    backward pass through the trunk with the combined cotangent.

    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8, 3))        # a batch; 3 tasks
    >>> trunk_params = {"w": 0.1 * jnp.ones((4, 16))}
    >>> head_params = {"a": 0.1 * jnp.ones((3, 16))}       # one linear head per task
    >>> trunk = lambda tp, x: jnp.tanh(x @ tp["w"])        # z = trunk(θ_sh, x)
    >>> heads_loss = lambda hp, z, y: jnp.mean((z @ hp["a"].T - y) ** 2, axis=0)
    >>> tx = mo.mgda()
    >>> losses, (trunk_update, head_update), state = mo.representation_update(
    ...     tx, tx.init(None), trunk, heads_loss, trunk_params, head_params,
    ...     trunk_args=(x,), head_args=(y,))
    >>> weights = mo.task_weights(state)                   # MGDA-UB's task weights
    >>> weights.shape, trunk_update["w"].shape
    ((3,), (4, 16))

  References:
    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Math. 2012; Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mgda: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  if tol is not None:
    base.check_positive("mgda", tol=tol)
  if max_iters is not None:
    base.check_positive("mgda", max_iters=max_iters)
  info = base.AggregatorInfo(name="mgda", needs_losses=normalization in ("loss", "loss+"),
                             representation="variant")

  def rule(view, inner):
    # Normalised rows ĝ_i = g_i / n_i = (s_i / n_i) r_i, built in log₂ from the
    # per-row-scaled Gram matrix so that gradients differing by 1e±30 survive.
    r_norms = linalg.safe_norms(view.row_gram)
    log_s = jnp.log2(view.row_scales)
    if normalization == "none":
      log_n = jnp.zeros_like(log_s)
    elif normalization == "l2":
      log_n = log_s + jnp.log2(r_norms)
    else:
      log_loss = jnp.log2(jnp.abs(view.losses.astype(view.row_gram.dtype)))
      log_n = log_loss if normalization == "loss" else log_loss + log_s + jnp.log2(r_norms)
    # Rows that cannot be normalised (zero gradient or loss) stay zero rows of
    # the normalised Gram matrix: the min-norm point is then 0.
    ok = jnp.isfinite(log_n) & (r_norms > 0)
    log_a = jnp.where(ok, log_s - log_n, -jnp.inf)
    g_hat = linalg.scaled_gram(view.row_gram, jnp.where(jnp.any(ok), log_a, 0.0))
    sol = linalg.min_norm_on_simplex(g_hat, max_iters=max_iters, tol=tol)
    # d = Σ sol_i ĝ_i = Σ w_i g_i with w_i = sol_i / n_i = sol_i · 2^(−log n_i).
    w = jnp.where(ok, sol.x * jnp.exp2(jnp.where(ok, -log_n, 0.0)), 0.0)
    return base.RuleOutput(state=inner, weights=w,
                           diagnostics={"residual": sol.residual, "iterations": sol.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
