"""Shared linear algebra over stacked per-task gradient pytrees.

Everything that more than one method needs lives here once: flattening the shared
leaves of a stacked pytree into task rows, the Gram matrix G = J Jᵀ accumulated in
float32 or better (even for bfloat16 gradients), the weighted recombination d = Jᵀ w,
safe normalisation, the Euclidean projection onto the probability simplex, and the
min-norm solver over the simplex used by MGDA and friends.

All functions are pure, shape-static and usable under ``jax.jit``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# Floor used when dividing by norms or sums that may be exactly zero.
TINY = 1e-30


def accumulation_dtype(dtype) -> jnp.dtype:
  """The dtype Gram matrices and solvers use for gradients of ``dtype``.

  float64 stays float64; everything narrower (float32, bfloat16, float16)
  is accumulated in float32.
  """
  return jnp.promote_types(dtype, jnp.float32)


def task_rows(leaves: Sequence[Array]) -> list[Array]:
  """Reshapes stacked leaves ``(m, ...)`` into ``(m, n_leaf)`` matrices."""
  return [leaf.reshape(leaf.shape[0], -1) for leaf in leaves]


def rows_max_abs(leaves: Sequence[Array]) -> Array:
  """Largest absolute entry of each task row over all stacked leaves: ``(m,)``."""
  m = leaves[0].shape[0]
  maxima = [jnp.max(jnp.abs(leaf.reshape(m, -1)), axis=1).astype(jnp.float32)
            for leaf in leaves if leaf.size]
  if not maxima:
    return jnp.zeros((m,), jnp.float32)
  return jnp.max(jnp.stack(maxima), axis=0)


def power_of_two_scale(max_abs: Array) -> Array:
  """Powers of two close to ``max_abs`` (1 where it is zero), elementwise.

  Dividing by a power of two is exact in floating point (barring under/overflow),
  so Gram matrices of rescaled rows equal the exact ones up to those factors.
  """
  safe = jnp.where(max_abs > 0, max_abs, 1.0)
  return jnp.exp2(jnp.round(jnp.log2(safe)))


def scaled_gram(row_gram: Array, log2_factors: Array) -> Array:
  """Gram matrix of the rows ``a_i r_i`` divided by ``max(a)²``, without overflow.

  With ``R = row_gram`` (Gram of the rows r_i) and ``a_i = 2**log2_factors[i]``,
  returns ``diag(a) R diag(a) / max(a)²``. Working in log₂ keeps rows whose
  factors differ by 1e±30 from overflowing float32; only rows negligible
  against the largest one (by > 2^126) underflow to zero.
  """
  rel = jnp.exp2(log2_factors - jnp.max(log2_factors)).astype(row_gram.dtype)
  return row_gram * rel[:, None] * rel[None, :]


def gram_matrix(leaves: Sequence[Array], scale: Array | float = 1.0) -> Array:
  """Gram matrix ``G_ij = <g_i, g_j> / scale²`` over stacked leaves.

  Args:
    leaves: stacked gradient leaves, each of shape ``(m, ...)``.
    scale: divisor applied to the rows before the products: a scalar, or an
      ``(m, 1)`` array of per-row divisors (see :func:`power_of_two_scale`) to
      avoid overflow and underflow for huge or tiny gradients.

  Returns:
    ``(m, m)`` symmetric matrix in float32 (float64 for float64 inputs).
  """
  if not leaves:
    raise ValueError("gram_matrix needs at least one (shared) gradient leaf.")
  m = leaves[0].shape[0]
  acc = accumulation_dtype(leaves[0].dtype)
  gram = jnp.zeros((m, m), acc)
  for row in task_rows(leaves):
    row = row.astype(jnp.promote_types(row.dtype, acc)) / jnp.asarray(scale, acc)
    gram = gram + jnp.dot(row, row.T, precision=jax.lax.Precision.HIGHEST)
  # Symmetrise: round-off may leave the two triangles a few ulps apart.
  return 0.5 * (gram + gram.T)


def combine(weights: Array, leaf: Array) -> Array:
  """Weighted sum over the task axis: ``Σ_i w_i leaf[i]``, in ``leaf.dtype``.

  The product is accumulated in float32 or better, so bfloat16 leaves are not
  summed in bfloat16.
  """
  acc = accumulation_dtype(leaf.dtype)
  out = jax.lax.dot_general(
      weights.astype(acc), leaf.astype(acc) if leaf.dtype != acc else leaf,
      (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
  return out.astype(leaf.dtype)


def safe_div(num: Array, den: Array, fill: float = 0.0) -> Array:
  """``num / den`` where ``|den| > TINY``, else ``fill`` (no NaN/inf from 0/0)."""
  ok = jnp.abs(den) > TINY
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fill)


def safe_norms(gram: Array) -> Array:
  """Row norms ``‖g_i‖ = sqrt(G_ii)``, clipped at zero against round-off."""
  return jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))


def cosine_matrix(gram: Array) -> Array:
  """Cosine similarities from a Gram matrix; zero rows give cosine 0."""
  n = safe_norms(gram)
  return safe_div(gram, n[:, None] * n[None, :])


def normalize_gram(gram: Array, scales: Array) -> Array:
  """Gram matrix of the rows ``g_i / scales_i`` (zero where ``scales_i`` is 0)."""
  inv = safe_div(jnp.ones_like(scales), scales)
  return gram * inv[:, None] * inv[None, :]


def project_simplex(v: Array) -> Array:
  """Euclidean projection of ``v`` onto the probability simplex.

  Sort-based algorithm (Held et al. 1974; Duchi et al. 2008):
  w = max(v - τ, 0) with τ chosen so that Σ w = 1.
  """
  m = v.shape[-1]
  u = jnp.sort(v, axis=-1)[..., ::-1]
  css = jnp.cumsum(u, axis=-1) - 1.0
  ind = jnp.arange(1, m + 1, dtype=v.dtype)
  cond = u - css / ind > 0
  rho = jnp.sum(cond, axis=-1, keepdims=True)
  tau = jnp.take_along_axis(css, rho - 1, axis=-1) / rho.astype(v.dtype)
  return jnp.maximum(v - tau, 0.0)


class SolverResult(NamedTuple):
  """Output of an iterative solver: solution, optimality residual, iterations."""
  x: Array
  residual: Array
  iterations: Array


def _quadratic_step(gram: Array, gw: Array, t: Array, a: Array) -> Array:
  """Exact line-search step moving mass from vertex a to vertex t for wᵀGw."""
  curvature = gram[t, t] + gram[a, a] - 2.0 * gram[t, a]
  slope = gw[a] - gw[t]  # = -d/dγ of ½ wᵀGw along e_t - e_a, times 1
  return safe_div(slope, curvature, fill=jnp.inf)


def simplex_pairwise_frank_wolfe(
    gradient: Callable[[Array], Array],
    line_search: Callable[[Array, Array, Array, Array], Array],
    w0: Array,
    max_iters: int = 100,
    tol: float = 1e-7,
) -> SolverResult:
  """Pairwise Frank–Wolfe over the probability simplex, inside jit.

  Each step moves mass from the "away" vertex (largest partial derivative among
  the support) to the Frank–Wolfe vertex (smallest partial derivative), with a
  step chosen by ``line_search``. Pairwise steps make the method converge
  linearly on the simplex for strongly convex quadratics (Lacoste-Julien &
  Jaggi, 2015), unlike the plain Frank–Wolfe of Sener & Koltun (2018).

  Args:
    gradient: ``w -> ∇f(w)``.
    line_search: ``(w, grad, t, a) -> γ`` unconstrained optimal step along
      ``e_t - e_a``; it is clipped to the feasible ``[0, w_a]``.
    w0: starting point on the simplex.
    max_iters: fixed iteration budget (static).
    tol: stop when the pairwise gap ``grad_a - grad_t`` is below
      ``tol * (|grad|_max + TINY)``.

  Returns:
    ``SolverResult(x, residual, iterations)``, residual = final pairwise gap
    relative to the gradient scale (0 at an exact KKT point).
  """

  def gap_of(w, g):
    in_support = w > 0
    a = jnp.argmax(jnp.where(in_support, g, -jnp.inf))
    t = jnp.argmin(g)
    scale = jnp.max(jnp.abs(g)) + TINY
    return (g[a] - g[t]) / scale, t, a

  def cond(carry):
    w, g, it = carry
    gap, _, _ = gap_of(w, g)
    return (it < max_iters) & (gap > tol)

  def body(carry):
    w, g, it = carry
    _, t, a = gap_of(w, g)
    step = jnp.clip(line_search(w, g, t, a), 0.0, w[a])
    step = jnp.where(jnp.isfinite(step), step, w[a])
    w = w.at[t].add(step).at[a].add(-step)
    w = jnp.maximum(w, 0.0)
    return w, gradient(w), it + 1

  g0 = gradient(w0)
  w, g, it = jax.lax.while_loop(cond, body, (w0, g0, jnp.zeros((), jnp.int32)))
  gap, _, _ = gap_of(w, g)
  return SolverResult(w, jnp.maximum(gap, 0.0), it)


def simplex_qp(quad: Array, lin: Array | None = None, max_iters: int | None = None,
               tol: float = 1e-9, ridge: float | None = None) -> SolverResult:
  """Exact solution of a small QP over the probability simplex, inside jit.

      min_w ½ wᵀQw + cᵀw   s.t.  w ≥ 0,  Σ w = 1      (Q positive semi-definite)

  Primal active-set method (Nocedal & Wright, Alg. 16.3): starting at the best
  vertex, each iteration solves the equality-constrained problem on the free
  set (a bordered (m+1)×(m+1) linear system, built with masks so that shapes
  stay static), takes the longest feasible step towards it, and frees the
  index with the most negative multiplier once the free-set optimum is
  feasible. It terminates in finitely many iterations (typically ≤ 2m) at an
  exact KKT point, unlike Frank–Wolfe, whose zig-zagging makes it slow on
  ill-conditioned Gram matrices. A ridge at round-off level (``ridge`` × max
  diag Q; default 10·m·eps(dtype)) keeps the free-set systems non-singular for
  rank-deficient Q; it moves the optimum by no more than the round-off already
  present in a Gram matrix (‖Jᵀw‖ ~ √ridge·‖J‖ at Pareto-stationary points).

  Args:
    quad: ``(m, m)`` PSD matrix Q.
    lin: ``(m,)`` linear term c (default 0).
    max_iters: iteration budget (default 4m + 10).
    tol: relative tolerance on the multipliers.
    ridge: relative Tikhonov regularisation (see above).

  Returns:
    ``SolverResult(x, residual, iterations)``: the weights, the relative KKT
    violation max_i max(0, ν − (Qw+c)_i) on all i and |(Qw+c)_i − ν| on the
    support (ν = the support's common value), and the iterations used.
  """
  m = quad.shape[0]
  dtype = quad.dtype
  lin = jnp.zeros((m,), dtype) if lin is None else lin.astype(dtype)
  if m == 1:
    return SolverResult(jnp.ones((1,), dtype), jnp.zeros((), dtype), jnp.zeros((), jnp.int32))
  max_iters = 4 * m + 10 if max_iters is None else max_iters
  if ridge is None:
    ridge = 10 * m * float(jnp.finfo(dtype).eps)
  scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(quad))), jnp.max(jnp.abs(lin)))
  scale = jnp.where(scale > 0, scale, 1.0)
  q = quad / scale + ridge * jnp.eye(m, dtype=dtype)
  c = lin / scale
  eye = jnp.eye(m, dtype=dtype)

  def free_set_optimum(free):
    f = free.astype(dtype)
    k = jnp.zeros((m + 1, m + 1), dtype)
    k = k.at[:m, :m].set(q * f[:, None] * f[None, :] + eye * (1.0 - f))
    k = k.at[:m, m].set(f).at[m, :m].set(f)
    rhs = jnp.concatenate([-c * f, jnp.ones((1,), dtype)])
    sol = jnp.linalg.solve(k, rhs)
    return sol[:m] * f

  def kkt(w):
    g = q @ w + c
    nu = jnp.sum(w * g)  # = the support's common value at a KKT point
    viol_all = jnp.max(jnp.maximum(nu - g, 0.0))
    viol_supp = jnp.max(jnp.where(w > 0, jnp.abs(g - nu), 0.0))
    return g, nu, jnp.maximum(viol_all, viol_supp)

  def cond(carry):
    w, free, it, done = carry
    return (~done) & (it < max_iters)

  def body(carry):
    w, free, it, _ = carry
    target = free_set_optimum(free)
    p = target - w
    blocking = free & (p < 0) & (target < 0)
    ratios = jnp.where(blocking, w / jnp.where(blocking, -p, 1.0), jnp.inf)
    alpha = jnp.minimum(1.0, jnp.min(ratios))
    w_new = jnp.maximum(w + alpha * p, 0.0)
    w_new = w_new / jnp.sum(w_new)
    hit = jnp.argmin(ratios)
    took_full = alpha >= 1.0
    # A blocking constraint becomes active.
    free_blocked = free.at[hit].set(False)
    # At the free-set optimum: free the index whose multiplier is most negative.
    g, nu, _ = kkt(w_new)
    mult = jnp.where(free, jnp.inf, g - nu)
    j = jnp.argmin(mult)
    optimal = mult[j] >= -tol
    free_released = free.at[j].set(True)
    new_free = jnp.where(took_full, jnp.where(optimal, free, free_released), free_blocked)
    done = took_full & optimal
    return w_new, new_free, it + 1, done

  start = jnp.argmin(jnp.diagonal(q) + 2.0 * c)
  w0 = jax.nn.one_hot(start, m, dtype=dtype)
  w, _, it, _ = jax.lax.while_loop(cond, body, (w0, w0 > 0, jnp.zeros((), jnp.int32),
                                                jnp.zeros((), bool)))
  _, _, residual = kkt(w)
  return SolverResult(w, residual, it)


def min_norm_on_simplex(gram: Array, max_iters: int | None = None, tol: float = 1e-9) -> SolverResult:
  """Min-norm point of the convex hull of the rows: ``argmin_{w∈Δ} wᵀGw``.

  The MGDA sub-problem (Désidéri 2012; Sener & Koltun 2018), solved exactly
  by :func:`simplex_qp` (closed form for two tasks). KKT: w ∈ Δ and
  (Gw)_i ≥ wᵀGw for all i, with equality on the support.

  Args:
    gram: ``(m, m)`` positive semi-definite matrix.
    max_iters: active-set iteration budget (default 4m + 10).
    tol: relative tolerance on the multipliers.

  Returns:
    ``SolverResult`` with the weights, the relative KKT residual and iterations.
  """
  m = gram.shape[0]
  dtype = gram.dtype
  if m == 2:
    # min over γ of ‖γ g1 + (1-γ) g2‖²: γ ∝ <g2 - g1, g2>, 1 - γ ∝ <g1 - g2, g1>.
    # Both weights are formed directly (not as 1 - γ) so that each has full
    # relative precision when one is tiny (nearly opposite gradients of very
    # different norms); clipping at 0 handles the vertex solutions.
    a = jnp.maximum(gram[1, 1] - gram[0, 1], 0.0)
    b = jnp.maximum(gram[0, 0] - gram[0, 1], 0.0)
    total = a + b
    w = jnp.where(total > 0, jnp.stack([a, b]) / jnp.where(total > 0, total, 1.0),
                  jnp.full((2,), 0.5, dtype)).astype(dtype)
    gw = gram @ w
    scale = jnp.max(jnp.abs(jnp.diagonal(gram))) + TINY
    nu = w @ gw
    residual = jnp.maximum(jnp.max(jnp.maximum(nu - gw, 0.0)),
                           jnp.max(jnp.where(w > 0, jnp.abs(gw - nu), 0.0))) / scale
    return SolverResult(w, residual, jnp.ones((), jnp.int32))
  return simplex_qp(gram, None, max_iters=max_iters, tol=tol)


def softmax_vjp(z: Array, v: Array) -> Array:
  """``J_softmax(ξ)ᵀ v`` from ``z = softmax(ξ)``: ``z ⊙ v − z (zᵀv)``.

  The gradient with respect to logits ξ of ``vᵀ softmax(ξ)`` (the Jacobian is
  symmetric: ``diag(z) − z zᵀ``). Used by methods with learnable task logits
  (FAMO, GradNorm).
  """
  return z * v - z * jnp.sum(z * v, axis=-1, keepdims=True)


def cross_gram(leaves_a: Sequence[Array], leaves_b: Sequence[Array],
               scale: Array | float = 1.0) -> Array:
  """Cross Gram matrix ``C_ij = <a_i, b_j> / scale²`` of two stacked gradients.

  ``a`` and ``b`` are two stacked pytrees' leaves (the same shapes, task axis
  first), e.g. the gradients of two independent batches (MoDo, SDMGrad's
  double sampling). Not symmetric in general. Accumulated in float32 or
  better; ``scale`` (a scalar, e.g. a power of two close to the largest entry)
  guards against overflow.
  """
  if not leaves_a or len(leaves_a) != len(leaves_b):
    raise ValueError("cross_gram needs two equally long, non-empty lists of stacked leaves.")
  m = leaves_a[0].shape[0]
  acc = accumulation_dtype(leaves_a[0].dtype)
  out = jnp.zeros((m, m), acc)
  for a, b in zip(task_rows(leaves_a), task_rows(leaves_b)):
    a = a.astype(jnp.promote_types(a.dtype, acc)) / jnp.asarray(scale, acc)
    b = b.astype(jnp.promote_types(b.dtype, acc)) / jnp.asarray(scale, acc)
    out = out + jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return out
