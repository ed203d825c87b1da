"""ConicGrad: the best worst-task update in a cone around the mean gradient.

Hassanpour et al., 2025.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods import cagrad as cagrad_lib


def _rim_dual(gram, lin, k, max_iters, tol, line_search_iters):
  """min_{w∈Δ} φ(w) = lᵀw + k √(wᵀQw) by pairwise Frank–Wolfe, polished on the support.

  φ is convex; each step's length is found by bisection on the sign of the
  (monotone) slope of φ along the segment, which resolves the minimiser to
  round-off (comparing values of a flat minimum would stop at √eps). The
  closed-form solve on the support found is CAGrad's
  (:func:`mtl_optax._src.methods.cagrad._polish_on_support`, the same
  stationarity conditions l + k Qw/√(wᵀQw) = ν1), applied twice.
  """
  m = gram.shape[0]
  dtype = gram.dtype

  def gradient(w):
    qw = gram @ w
    return lin + k * linalg.safe_div(qw, jnp.sqrt(jnp.maximum(w @ qw, 0.0)))

  def line_search(w, g, t, a):
    del g
    direction = jax.nn.one_hot(t, m, dtype=dtype) - jax.nn.one_hot(a, m, dtype=dtype)
    slope = lambda gamma: direction @ gradient(w + gamma * direction)

    def body(_, lohi):
      lo, hi = lohi
      mid = 0.5 * (lo + hi)
      up = slope(mid) > 0
      return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

    lo, hi = jax.lax.fori_loop(0, line_search_iters, body, (jnp.zeros((), dtype), w[a]))
    return jnp.where(slope(w[a]) <= 0, w[a], 0.5 * (lo + hi))

  w0 = jnp.full((m,), 1.0 / m, dtype)
  fw = linalg.simplex_pairwise_frank_wolfe(gradient, line_search, w0, max_iters, tol)
  w = fw.x
  iterations = fw.iterations
  if m > 2:
    w = cagrad_lib._polish_on_support(gram, lin, k, w)  # pylint: disable=protected-access
    fw2 = linalg.simplex_pairwise_frank_wolfe(gradient, line_search, w, max_iters, tol)
    w = cagrad_lib._polish_on_support(gram, lin, k, fw2.x)  # pylint: disable=protected-access
    iterations = iterations + fw2.iterations
  g = gradient(w)
  gap = (jnp.max(jnp.where(w > 0, g, -jnp.inf)) - jnp.min(g)) / (jnp.max(jnp.abs(g)) + linalg.TINY)
  return linalg.SolverResult(w, jnp.maximum(gap, 0.0), iterations)


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@functools.partial(jax.jit, static_argnames=("c", "max_iters", "tol", "line_search_iters",
                                             "smoothing"))
def conicgrad_direction(gram, c: float, max_iters: int = 250, tol: float = 1e-7,
                        line_search_iters: int = 50, smoothing: float = 1e-4):
  """Coefficients α of ConicGrad's direction d̂ = Jᵀα (see :func:`conicgrad`), from G.

  With K = {d : ‖d‖ ≤ 1, ⟨d, ĝ₀⟩ ≥ c}, d̂ = argmax_{d∈K} min_i ⟨g_i, d⟩:

  1. If the min-norm point g_μ = Jᵀμ of the convex hull (MGDA, solved
     exactly) is non-zero and inside the cone, d̂ = g_μ/‖g_μ‖: the maximiser
     over the whole unit ball is feasible.
  2. Otherwise the maximiser of the concave objective lies on the plane
     ⟨d, ĝ₀⟩ = c (a maximiser on the spherical part of K's boundary would be
     a local, hence global, maximiser over the ball): d̂ = c ĝ₀ + e with
     e ⊥ ĝ₀, ‖e‖ ≤ s = √(1 − c²). Its dual is
     min_{w∈Δ} c⟨g_w, ĝ₀⟩ + s ‖P⊥ g_w‖ (P⊥ the projection orthogonal to
     g₀: Gram matrix G⊥ = G − (Gu)(Gu)ᵀ/‖g₀‖²), and
     d̂ = c ĝ₀ + s P⊥g_w/‖P⊥g_w‖, i.e. d̂ ∝ g_w + κ ĝ₀ĝ₀ᵀg_w: the rank-one
     correction of the paper's Sherman–Morrison–Woodbury closed form.
     ‖P⊥g_w‖ is smoothed by δ = ``smoothing`` × max‖g_i‖ (see the code).

  Returns:
    ``(alpha, SolverResult of the dual weights)``.
  """
  m = gram.shape[0]
  dtype = gram.dtype
  u = jnp.full((m,), 1.0 / m, dtype)
  gu = gram @ u
  n0 = jnp.sqrt(jnp.maximum(u @ gu, 0.0))
  u0 = linalg.safe_div(u, n0)                      # ĝ₀ = Jᵀu0
  s = float(max(1.0 - c * c, 0.0) ** 0.5)
  top = jnp.sqrt(jnp.max(jnp.abs(jnp.diagonal(gram))))

  mn = linalg.min_norm_on_simplex(gram)
  v_mn = jnp.sqrt(jnp.maximum(mn.x @ gram @ mn.x, 0.0))
  a_mn = mn.x @ gu * linalg.safe_div(jnp.ones((), dtype), n0)
  inside = (v_mn > 1e3 * jnp.finfo(dtype).eps * top) & (a_mn >= c * v_mn)

  q = gram - jnp.outer(gu, gu) * linalg.safe_div(jnp.ones((), dtype), n0 * n0)
  # ‖P⊥g_w‖ is smoothed to √(‖P⊥g_w‖² + δ²), i.e. Q + δ²11ᵀ on the simplex (1ᵀw = 1):
  # where some g_w is parallel to g₀ the dual optimum sits on the norm's kink and
  # the direction e could not be recovered from w; with δ it is e = s P⊥g_w/√(b² + δ²)
  # (‖e‖ < s, so the cone constraint still holds), O(δ) from the exact one.
  q = 0.5 * (q + q.T) + (smoothing * top) ** 2
  inv_n0 = linalg.safe_div(jnp.ones((), dtype), n0)
  rim = _rim_dual(q, c * gu * inv_n0, s, max_iters, tol, line_search_iters)
  w = rim.x
  a = w @ gu * linalg.safe_div(jnp.ones((), dtype), n0)
  # ‖P⊥g_w‖ from the rows themselves (not from Q, whose subtraction cancels).
  p = w - a * u0
  b_raw = jnp.sqrt(jnp.maximum(p @ gram @ p, 0.0))
  b = jnp.sqrt(b_raw * b_raw + (smoothing * top) ** 2)
  # Every g_w parallel to g₀ up to round-off (e.g. a rank-one Jacobian): each e is
  # equally good and P⊥g_w is noise; take e = 0, i.e. d̂ = c ĝ₀ (the direction of g₀).
  noise = 10.0 * jnp.sqrt(m * jnp.finfo(dtype).eps) * top
  alpha_rim = jnp.where(b_raw > noise, c * u0 + s * linalg.safe_div(p, b), c * u0)
  alpha = jnp.where(inside, linalg.safe_div(mn.x, v_mn), alpha_rim)
  result = linalg.SolverResult(jnp.where(inside, mn.x, w),
                               jnp.where(inside, mn.residual, rim.residual),
                               jnp.where(inside, mn.iterations, rim.iterations))
  return jnp.where(n0 > 0, alpha, 0.0), result


def conicgrad(c: float = 0.5, *, max_iters: int = 250, tol: float = 1e-7,
              task_specific=None, weight_heads: Optional[bool] = None,
              num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """ConicGrad: maximise the worst task improvement within a cone around the mean gradient.

  With g₀ = (1/m) Σ g_i and ĝ₀ = g₀/‖g₀‖, the update direction solves

      d̂ = argmax_{d ∈ K} min_i ⟨g_i, d⟩,   K = {d : ‖d‖ ≤ 1, ⟨d, ĝ₀⟩ ≥ c},

  K being the convex hull of the unit directions within the cone
  cos(d, g₀) ≥ c (half-angle arccos c; CAGrad uses a ball around g₀
  instead), and the update is d = ‖g₀‖ d̂/‖d̂‖: the direction comes from the
  cone problem, the magnitude from the mean gradient (decoupled, as in the
  paper). By minimax duality d̂ = d*(w*) with

      w* = argmin_{w∈Δ} σ(g_w),   g_w = Jᵀw,

  σ the support function of K and d*(w) its maximiser in closed form: with
  a = ⟨g_w, ĝ₀⟩, d* = g_w/‖g_w‖ when g_w lies inside the cone, else
  d* ∝ g_w + κ ĝ₀ĝ₀ᵀg_w, the rank-one (Sherman–Morrison–Woodbury) correction
  whose κ ≥ 0 puts d* on the cone's boundary at unit norm. Everything is
  computed from the m×m Gram matrix (:func:`conicgrad_direction`), and d = Jᵀw
  with the w exposed (weighted). Properties: cos(d, g₀) ≥ c; when some
  direction in the cone improves every task, ⟨g_i, d⟩ ≥ 0 for all i
  (non-conflicting, up to the solver's ``residual``), and otherwise d is the
  least-bad direction in the cone (never 0 for c > 0). c = 1 is the mean
  gradient g₀ (c → 0 would admit d = 0: c must be positive). g₀ = 0 gives 0.

  What is and is not reproduced: the authors' code is not public and we
  could not read the paper's full derivation; this is the exact solution of
  the optimisation problem the paper states (max-min objective within a cone
  around the average gradient, closed-form direction for given dual weights,
  magnitude normalised to ‖g₀‖), with the unit directions convexified into
  K, and solved exactly: the MGDA direction when it lies in the cone, else
  the dual of the boundary problem by Frank–Wolfe and a closed-form polish.
  The paper's own solver for the dual weights and its exact magnitude rule
  may differ. Near Pareto-stationary points with a small c the boundary dual
  is ill-conditioned: Frank–Wolfe may stop at its budget (see ``residual``);
  the direction is still in the cone (up to float32 round-off).

  Args:
    c: cosine of the cone's half-angle, in (0, 1] (default 0.5, i.e. 60°;
      the paper tunes c).
    max_iters: Frank–Wolfe budget of the dual (default 250).
    tol: relative stopping gap (default 1e-7); the reached gap (of MGDA's
      or the boundary dual's optimality conditions) is ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Diagnostics: ``value`` = min_i ⟨g_i, d̂⟩ / √(Σ‖g_i‖²) (the relative worst
  task improvement, negative when none is possible), ``cone_cosine`` =
  cos(d, g₀), ``residual``, ``iterations``.

  Reference:
    Hassanpour, Janjua, Zhang, Lavasani, Zhang, Zhou & Gao, "Fantastic
    Multi-Task Gradient Updates and How to Find Them In a Cone", arXiv
    2502.00217, 2025.
  """
  name = "conicgrad"
  if not (isinstance(c, (int, float)) and 0.0 < c <= 1.0):
    # c = 0 would let K contain d = 0, whose normalised direction is undefined.
    raise ValueError(f"{name}: c is the cosine of the cone's half-angle and must be in (0, 1], "
                     f"got {c!r}.")
  base.check_positive(name, max_iters=max_iters, tol=tol)
  info = base.AggregatorInfo(name=name, scale_degree=1)

  def rule(view, inner):
    gram = view.gram
    m = view.num_tasks
    # Unit-trace scaling: the solver's tolerances are then relative to the task norms.
    g = linalg.safe_div(gram, jnp.trace(gram))
    alpha, sol = conicgrad_direction(g, c, max_iters, tol)
    u = jnp.full((m,), 1.0 / m, gram.dtype)
    n0 = jnp.sqrt(jnp.maximum(u @ g @ u, 0.0))
    d_norm = jnp.sqrt(jnp.maximum(alpha @ g @ alpha, 0.0))
    w = n0 * linalg.safe_div(alpha, d_norm)
    primal = g @ alpha                       # ⟨g_i, d̂⟩ / √tr
    cone_cos = linalg.safe_div(u @ g @ alpha, n0 * d_norm)
    return base.RuleOutput(state=inner, weights=w, diagnostics={
        "value": jnp.min(primal), "cone_cosine": cone_cos, "residual": sol.residual,
        "iterations": sol.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
