"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg

RESCALES = (0, 1, 2)


def cagrad_dual(gram: jnp.ndarray, c: float, max_iters: int = 250, tol: float = 1e-7):
  """Solves CAGrad's dual over the simplex.

      w* = argmin_{w∈Δ} F(w) = wᵀG b + √φ ‖Jᵀw‖,  b = 1/m,  φ = c² ‖g₀‖²,

  with pairwise Frank–Wolfe; the line search along e_t − e_a is exact in closed
  form: with q(γ) = A(γ + B/A)² + r², F' = s + √φ (B + γA)/√q vanishes at
  γ + B/A = −sign(s)|s| r / √(A(φA − s²)) when φA > s² (otherwise F is
  monotone along the segment and the step goes to an end point).

  Returns:
    ``linalg.SolverResult`` of the dual weights.
  """
  m = gram.shape[0]
  dtype = gram.dtype
  b = jnp.full((m,), 1.0 / m, dtype)
  gb = gram @ b
  k = c * jnp.sqrt(jnp.maximum(b @ gb, 0.0))

  def gradient(w):
    gw = gram @ w
    return gb + k * linalg.safe_div(gw, jnp.sqrt(jnp.maximum(w @ gw, 0.0)))

  def line_search(w, g, t, a):
    gw = gram @ w
    a_ = gram[t, t] + gram[a, a] - 2.0 * gram[t, a]       # dᵀGd
    b_ = gw[t] - gw[a]                                     # dᵀGw
    c_ = jnp.maximum(w @ gw, 0.0)                          # wᵀGw
    s = gb[t] - gb[a]                                      # dᵀGb
    r2 = jnp.maximum(c_ - linalg.safe_div(b_ * b_, a_), 0.0)
    disc = k * k * a_ - s * s
    u = -jnp.sign(s) * jnp.abs(s) * jnp.sqrt(r2) * linalg.safe_div(1.0, jnp.sqrt(jnp.maximum(a_ * disc, 0.0)))
    interior = (disc > 0) & (a_ > linalg.TINY)
    to_end = jnp.where(s < 0, jnp.inf, 0.0)
    return jnp.where(interior, u - linalg.safe_div(b_, a_), to_end)

  return linalg.simplex_pairwise_frank_wolfe(gradient, line_search, b, max_iters, tol)


def cagrad(c: float = 0.4, rescale: int = 1, *, max_iters: int = 250, tol: float = 1e-7,
           task_specific=None, weight_heads: Optional[bool] = None,
           num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Conflict-averse gradient descent (CAGrad).

  Maximises the worst task improvement in a ball around the average gradient
  g₀ = (1/m) Σ g_i:  max_d min_i g_iᵀd  s.t. ‖d − g₀‖ ≤ c‖g₀‖. Through its dual
  (:func:`cagrad_dual`, solved in JAX; the reference code calls scipy SLSQP on
  the host) the update is

      d = g₀ + (c‖g₀‖ / ‖g_w‖) g_w,   g_w = Jᵀw*,

  divided by 1 + c² (``rescale=1``, the paper's default), 1 + c
  (``rescale=2``) or not at all (``rescale=0``; TorchJD's convention). c = 0
  gives the mean; for c ≥ 1 the direction is non-conflicting (when the
  gradients are Pareto-stationary, i.e. 0 is in their convex hull, the update
  is 0, a primal optimum, instead of the ill-defined 0/0 of the formula).

  Args:
    c: radius of the ball, in units of ‖g₀‖ (default 0.4; the paper uses
      0.4–0.5 on multi-MNIST/NYUv2). Must be ≥ 0.
    rescale: 0, 1 (default) or 2.
    max_iters: Frank–Wolfe budget of the dual (default 250).
    tol: relative stopping gap (default 1e-7); the reached gap is
      ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Reference:
    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021.
  """
  base.check_nonnegative("cagrad", c=c)
  if rescale not in RESCALES:
    raise ValueError(f"cagrad: rescale must be one of {RESCALES}, got {rescale!r}.")
  base.check_positive("cagrad", max_iters=max_iters, tol=tol)
  info = base.AggregatorInfo(name="cagrad")
  divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]

  def rule(view, inner):
    gram = view.gram
    m = view.num_tasks
    sol = cagrad_dual(gram, c, max_iters, tol)
    b = jnp.full((m,), 1.0 / m, gram.dtype)
    g0_norm = jnp.sqrt(jnp.maximum(b @ gram @ b, 0.0))
    gw_norm = jnp.sqrt(jnp.maximum(sol.x @ gram @ sol.x, 0.0))
    coef = linalg.safe_div(c * g0_norm, gw_norm)
    w = (b + coef * sol.x) / divisor
    if c >= 1.0:
      # For c ≥ 1, d = 0 lies in the ball, so the optimal worst-task improvement
      # min_i g_iᵀd is ≥ 0. When 0 is in the convex hull of the gradients the
      # dual optimum has g_w = 0 and d = g₀ + (c‖g₀‖/‖g_w‖)g_w is a 0/0 limit
      # whose direction the solver cannot resolve: keep d = 0 (a primal optimum)
      # whenever the dual-derived d is worse than it.
      w = jnp.where(jnp.min(gram @ w) < 0, jnp.zeros_like(w), w)
    return base.RuleOutput(state=inner, weights=w,
                           diagnostics={"residual": sol.residual, "iterations": sol.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
