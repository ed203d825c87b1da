"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg

RESCALES = (0, 1, 2)


def _objective(gram, gb, k, w):
  return w @ gb + k * jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))


def _polish_on_support(gram, gb, k, w):
  """Exact dual optimum on the support of ``w`` (closed form), if it is better.

  On a support S the optimality conditions a_S + k G_S w_S / ‖g_w‖ = ν1,
  Σ w_S = 1 give, with p = G_S⁻¹1, q = G_S⁻¹a_S, P = Σp, Q = Σq, A = a_Sᵀq
  (a = Gb) and D = Q² − P(A − k²):  w_S = (νp − q)/√D,  ν = (Q + √D)/P.
  The candidate is kept only if it is feasible and lowers the dual objective,
  so a misidentified support can never make things worse.
  """
  m = gram.shape[0]
  dtype = gram.dtype
  f = (w > 1e-9 * jnp.max(w)).astype(dtype)
  eye = jnp.eye(m, dtype=dtype)
  ridge = 10 * m * jnp.finfo(dtype).eps * jnp.max(jnp.abs(jnp.diagonal(gram)))
  mat = gram * f[:, None] * f[None, :] + eye * (1.0 - f) + ridge * eye * f
  sol = jnp.linalg.solve(mat, jnp.stack([f, gb * f], axis=1))
  p, q = sol[:, 0] * f, sol[:, 1] * f
  big_p, big_q, big_a = jnp.sum(p), jnp.sum(q), gb @ q
  disc = big_q * big_q - big_p * (big_a - k * k)
  root = jnp.sqrt(jnp.maximum(disc, 0.0))
  nu = linalg.safe_div(big_q + root, big_p)
  cand = linalg.safe_div(nu * p - q, root) * f
  ok = (disc > 0) & (big_p > 0) & jnp.all(cand >= 0) & jnp.all(jnp.isfinite(cand))
  ok = ok & (jnp.abs(jnp.sum(cand) - 1.0) < 1e-3)
  cand = jnp.where(ok, cand / jnp.where(ok, jnp.sum(cand), 1.0), w)
  better = _objective(gram, gb, k, cand) <= _objective(gram, gb, k, w)
  return jnp.where(ok & better, cand, w)


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@functools.partial(jax.jit, static_argnames=("c", "max_iters", "tol"))
def cagrad_dual(gram: jnp.ndarray, c: float, max_iters: int = 250, tol: float = 1e-7):
  """Solves CAGrad's dual over the simplex.

      w* = argmin_{w∈Δ} F(w) = wᵀG b + √φ ‖Jᵀw‖,  b = 1/m,  φ = c² ‖g₀‖²,

  with pairwise Frank–Wolfe, whose line search along e_t − e_a is exact in
  closed form (with q(γ) = A(γ + B/A)² + r², F' = s + √φ (B + γA)/√q vanishes
  at γ + B/A = −sign(s)|s| r / √(A(φA − s²)) when φA > s², otherwise F is
  monotone along the segment), followed by an exact closed-form solve on the
  support it found (:func:`_polish_on_support`), which removes Frank–Wolfe's
  slow tail on ill-conditioned problems.

  Returns:
    ``linalg.SolverResult`` of the dual weights; ``residual`` is the relative
    pairwise optimality gap of the returned point.
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
    u = (-jnp.sign(s) * jnp.abs(s) * jnp.sqrt(r2)
         * linalg.safe_div(1.0, jnp.sqrt(jnp.maximum(a_ * disc, 0.0))))
    interior = (disc > 0) & (a_ > linalg.TINY)
    to_end = jnp.where(s < 0, jnp.inf, 0.0)
    return jnp.where(interior, u - linalg.safe_div(b_, a_), to_end)

  fw = linalg.simplex_pairwise_frank_wolfe(gradient, line_search, b, max_iters, tol)
  if m <= 2:
    return fw
  w = _polish_on_support(gram, gb, k, fw.x)
  # A second round fixes a support that the first Frank–Wolfe run left incomplete.
  fw2 = linalg.simplex_pairwise_frank_wolfe(gradient, line_search, w, max_iters, tol)
  w = _polish_on_support(gram, gb, k, fw2.x)
  g = gradient(w)
  supp = w > 0
  gap = (jnp.max(jnp.where(supp, g, -jnp.inf)) - jnp.min(g)) / (jnp.max(jnp.abs(g)) + linalg.TINY)
  return linalg.SolverResult(w, jnp.maximum(gap, 0.0), fw.iterations + fw2.iterations)


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
  info = base.AggregatorInfo(name="cagrad", scale_degree=1)
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
      # The signs of g_iᵀd = (Gw)_i come from the per-row-scaled Gram matrix R:
      # (Gw)_i = s_i (R v)_i with v_j = s_j w_j (formed in log₂, then normalised),
      # so that a task whose gradient is 1e-30 of another's is not rounded away.
      log_v = jnp.log2(view.row_scales) + jnp.log2(jnp.abs(w))
      top = jnp.max(jnp.where(w != 0, log_v, -jnp.inf))
      v = jnp.where(w != 0, jnp.sign(w) * jnp.exp2(log_v - jnp.where(jnp.isfinite(top), top, 0.0)),
                    0.0)
      r_norms = linalg.safe_norms(view.row_gram)
      slack = 10 * m * jnp.finfo(gram.dtype).eps * r_norms * jnp.sum(jnp.abs(v) * r_norms)
      w = jnp.where(jnp.any(view.row_gram @ v < -slack), jnp.zeros_like(w), w)
    return base.RuleOutput(state=inner, weights=w,
                           diagnostics={"residual": sol.residual, "iterations": sol.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
