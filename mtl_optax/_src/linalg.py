"""Shared linear algebra over stacked per-task gradient pytrees.

Everything that more than one method needs lives here once: flattening the shared
leaves of a stacked pytree into task rows, the Gram matrix G = J Jᵀ accumulated in
float32 or better (even for bfloat16 gradients), the weighted recombination d = Jᵀ w,
safe normalisation, the Euclidean projection onto the probability simplex, and the
min-norm solver over the simplex used by MGDA and friends.

All functions are pure, shape-static and usable under ``jax.jit``.
"""

from __future__ import annotations

import functools
import math
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


# XLA:CPU's dot of an (m, K) matrix with its transpose slows down 5-10x once the
# operand no longer fits in cache (m = 2, K = 1e7: 64 ms where the same bytes are
# read in 3 ms); a loop over column blocks keeps each product cache-resident.
_CPU_GRAM_BLOCK_BYTES = 2 ** 26
_CPU_GRAM_BLOCK_COLUMNS = 2 ** 15


def _row_gram(row: Array, acc, scale, block_bytes: int) -> Array:
  """``(row / scale) (row / scale)ᵀ`` of one ``(m, K)`` matrix, accumulated in ``acc``."""
  dtype = jnp.promote_types(row.dtype, acc)
  scale = jnp.asarray(scale, acc)

  def gram(block):
    block = block.astype(dtype) / scale
    return jax.lax.dot_general(block, block, (((1,), (1,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST)

  m, k = row.shape
  if (jax.default_backend() != "cpu" or k <= _CPU_GRAM_BLOCK_COLUMNS
      or m * k * jnp.dtype(dtype).itemsize <= block_bytes):
    return gram(row)
  n_blocks, tail = divmod(k, _CPU_GRAM_BLOCK_COLUMNS)
  body = lambda i, g: g + gram(jax.lax.dynamic_slice_in_dim(
      row, i * _CPU_GRAM_BLOCK_COLUMNS, _CPU_GRAM_BLOCK_COLUMNS, axis=1))
  out = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((m, m), dtype))
  return out + gram(row[:, n_blocks * _CPU_GRAM_BLOCK_COLUMNS:]) if tail else out


def gram_matrix(leaves: Sequence[Array], scale: Array | float = 1.0, *,
                block_bytes: int = _CPU_GRAM_BLOCK_BYTES) -> Array:
  """Gram matrix ``G_ij = <g_i, g_j> / scale²`` over stacked leaves.

  On CPU, a leaf of more than ``block_bytes`` (64 MiB) is multiplied in column
  blocks of 2¹⁵ (a loop: 5x faster there, same float32 accumulation); on
  GPU/TPU every leaf is one product.

  Args:
    leaves: stacked gradient leaves, each of shape ``(m, ...)``.
    scale: divisor applied to the rows before the products: a scalar, or an
      ``(m, 1)`` array of per-row divisors (see :func:`power_of_two_scale`) to
      avoid overflow and underflow for huge or tiny gradients.
    block_bytes: size above which a leaf is blocked on CPU (default 2²⁶).

  Returns:
    ``(m, m)`` symmetric matrix in float32 (float64 for float64 inputs).
  """
  if not leaves:
    raise ValueError("gram_matrix needs at least one (shared) gradient leaf.")
  m = leaves[0].shape[0]
  acc = accumulation_dtype(leaves[0].dtype)
  gram = jnp.zeros((m, m), acc)
  for row in task_rows(leaves):
    gram = gram + _row_gram(row, acc, scale, block_bytes)
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


def multiplier_tol(dtype) -> float:
  """Default relative KKT tolerance of the simplex solvers: min(1e-9, 10·eps(dtype))."""
  return min(1e-9, 10 * float(jnp.finfo(dtype).eps))


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@functools.partial(jax.jit, static_argnames=("max_iters", "tol", "ridge"))
def simplex_qp(quad: Array, lin: Array | None = None, max_iters: int | None = None,
               tol: float | None = None, ridge: float | None = None) -> SolverResult:
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
    tol: relative tolerance on the multipliers (default
      :func:`multiplier_tol`: 1e-9, or 10·eps in float64). The KKT
      multipliers are relative to max diag Q, and an index whose multiplier
      is within ``tol`` stays inactive, so ‖Jᵀw‖ is resolved to about
      √tol·max‖g_i‖: 1e-9 would leave 3e-5 of the largest row in float64.
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
  tol = multiplier_tol(dtype) if tol is None else tol
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


def min_norm_on_simplex(gram: Array, max_iters: int | None = None,
                        tol: float | None = None) -> SolverResult:
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


# ---------------------------------------------------------------------------
# Lower-bounded QPs (UPGrad, DualProj) and the Nash / FairGrad equations.
# ---------------------------------------------------------------------------

def spd_solve(a: Array, b: Array) -> Array:
  """Solves ``a x = b`` for a symmetric positive-definite ``a`` (Cholesky).

  ``b`` is ``(m,)`` or ``(m, k)``. Uses ``lax.linalg`` directly: it compiles
  several times faster than ``jnp.linalg.solve`` (LU with pivoting), which
  matters inside the solvers' loops. Returns NaN if ``a`` is not positive
  definite; callers check.
  """
  l = jax.lax.linalg.cholesky(a)
  rhs = b[:, None] if b.ndim == 1 else b
  y = jax.lax.linalg.triangular_solve(l, rhs, left_side=True, lower=True)
  x = jax.lax.linalg.triangular_solve(l, y, left_side=True, lower=True, transpose_a=True)
  return x[:, 0] if b.ndim == 1 else x


def _nonneg_qp(quad: Array, lin: Array, *, max_iters: int | None = None,
              tol: float | None = None, ridge: float | Array | None = None,
              rounds: int = 3) -> SolverResult:
  """Exact solution of a small non-negative QP, inside jit.

      min_x ½ xᵀQx + cᵀx   s.t.  x ≥ 0          (Q positive semi-definite)

  Primal active-set method (Nocedal & Wright, Alg. 16.3) started at x = 0 with
  every bound active. Each iteration either frees the bound with the most
  negative multiplier y_j = (Qx + c)_j, or moves towards the optimum of the
  free set F (x_F = −Q_FF⁻¹ c_F) until a bound blocks. It stops at an exact
  KKT point (x ≥ 0, y ≥ 0, xᵀy = 0), typically after |F*| + a few iterations.

  Why this method: the problems of UPGrad and DualProj are tiny (m ≤ a few
  hundred), must be solved to round-off (their KKT conditions *are* the
  non-conflicting property) and usually have few free variables (the
  conflicting tasks), so starting with every bound active costs ~|F*|
  iterations. The inverse of the free block (embedded as H = (Q_FF ⊕ I)⁻¹)
  is kept up to date by rank-one bordering updates, O(m²) per iteration
  instead of a fresh O(m³) factorisation, and each free-set solve gets two
  steps of iterative refinement; if its residual still exceeds 1000·eps
  (drift of the updates), the round restarts from a freshly inverted block.
  Projected-gradient or ADMM methods would need hundreds of iterations to
  reach the same accuracy on ill-conditioned Gram matrices; projected Newton
  needs an O(m³) factorisation per iteration.

  Singular Q (rank-deficient Gram matrices) would make the free-set systems
  singular, so the method solves ``rounds`` proximal-point problems
  min ½xᵀQx + cᵀx + (ρ/2)‖x − x_prev‖² (ρ = ``ridge``, x_prev = the previous
  round's solution, 0 at first), each restarted from the previous free set.
  The first round is the ridge-regularised problem; later rounds remove the
  ridge's bias at the linear rate ρ/(λ + ρ) in the directions of curvature λ
  (exact to round-off after a few rounds when Q is well conditioned), while
  keeping x bounded along the null space of Q.

  Args:
    quad: ``(m, m)`` PSD matrix Q.
    lin: ``(m,)`` linear term c.
    max_iters: active-set iterations per round (default 3m + 10); at most
      ``rounds + 4`` rounds (restarts included) are run.
    tol: relative tolerance on the multipliers: a bound is freed only if
      y_j < −tol·(|Q||x| + |c|)_j (default 100·eps of the dtype).
    ridge: proximal weight ρ (absolute; default 4·√eps·max diag Q).
    rounds: number of proximal rounds (default 3).

  Returns:
    ``SolverResult(x, residual, iterations)``. The residual is the relative
    KKT violation of the original problem, max_j max((−y_j)₊ / s_j,
    min(x_j / ‖x‖_∞, |y_j| / s_j)) with s = |Q||x| + |c| (0 at an exact
    solution); iterations are summed over the rounds.
  """
  m = quad.shape[0]
  dtype = jnp.promote_types(quad.dtype, lin.dtype)
  eye = jnp.eye(m, dtype=dtype)
  q0 = quad.astype(dtype)
  c0 = lin.astype(dtype)
  eps = float(jnp.finfo(dtype).eps)
  tol = 100 * eps if tol is None else tol
  max_iters = 3 * m + 10 if max_iters is None else max_iters
  if ridge is None:
    ridge = 4.0 * math.sqrt(eps) * jnp.max(jnp.abs(jnp.diagonal(q0)))
  rho = jnp.maximum(jnp.asarray(ridge, dtype), jnp.finfo(dtype).tiny)
  q = q0 + rho * eye
  abs_q = jnp.abs(q)
  drift_tol = 1000 * eps

  def fresh_inverse(free):
    f = free.astype(dtype)
    k = q * f[:, None] * f[None, :] + eye * (1.0 - f)
    return spd_solve(k, eye)            # Q + ρI is positive definite

  def add_index(h, free, j):
    # Bordering: the inverse of [[Q_FF, q], [qᵀ, Q_jj]] from H = Q_FF⁻¹; the
    # Schur complement of Q + ρI is ≥ ρ (clipped against round-off).
    col = q[:, j] * free.astype(dtype)
    b = h @ col                                   # zero outside F
    s = jnp.maximum(q[j, j] - col @ b, rho)
    t = b - eye[j]
    return h - jnp.outer(eye[j], eye[j]) + jnp.outer(t, t) / s

  def remove_index(h, j):
    col = h[:, j]
    pivot = jnp.clip(h[j, j], 1.0 / q[j, j], 1.0 / rho)   # = 1 / Schur complement
    return h - jnp.outer(col, col) / pivot + jnp.outer(eye[j], eye[j])

  def free_optimum(h, free, c):
    """x_F = −Q_FF⁻¹ c_F through H with two refinement steps; and whether H drifted."""
    f = free.astype(dtype)
    z = -(h @ (c * f))
    for _ in range(2):
      z = z + h @ ((-c - q @ z) * f)
    z = z * f
    res = jnp.abs((q @ z + c) * f)
    drift = jnp.any(res > drift_tol * (abs_q @ jnp.abs(z) + jnp.abs(c))) | ~jnp.all(jnp.isfinite(z))
    return z, drift

  def inner(x, free, c):
    """Active-set iterations for min ½xᵀ(Q + ρI)x + cᵀx, x ≥ 0, from (x, free).

    Returns (x, free, iterations, converged).
    """

    def body(carry):
      x, free, h, it, _, _, last = carry
      z, drift = free_optimum(h, free, c)
      blocking = free & (z < 0) & (jnp.arange(m, dtype=jnp.int32) != last)
      ratios = jnp.where(blocking, x / jnp.where(blocking, x - z, 1.0), jnp.inf)
      step = jnp.minimum(1.0, jnp.min(ratios))
      hit = jnp.argmin(ratios)
      full = step >= 1.0
      x_part = jnp.maximum(x + step * (z - x), 0.0).at[hit].set(0.0)
      x_new = jnp.where(full, jnp.maximum(z, 0.0), x_part)
      y = q @ x_new + c
      scale = abs_q @ jnp.abs(x_new) + jnp.abs(c)
      viol = jnp.where(free, jnp.inf, y + tol * scale)
      j = jnp.argmin(viol)
      optimal = viol[j] >= 0
      h_new = jnp.where(full, jnp.where(optimal, h, add_index(h, free, j)), remove_index(h, hit))
      free_new = jnp.where(full, jnp.where(optimal, free, free.at[j].set(True)),
                           free.at[hit].set(False))
      last_new = jnp.where(full & ~optimal, j, -1).astype(jnp.int32)
      # On drift, keep the last good point and let the caller restart.
      x_new = jnp.where(drift, x, x_new)
      free_new = jnp.where(drift, free, free_new)
      return x_new, free_new, h_new, it + 1, full & optimal & ~drift, drift, last_new

    def cond(carry):
      _, _, _, it, done, drift, _ = carry
      return ~done & ~drift & (it < max_iters)

    h = fresh_inverse(free)
    z, drift = free_optimum(h, free, c)
    x = jnp.where(jnp.all(z >= 0) & ~drift, z, x)   # exact optimum of the free set if feasible
    carry = (x, free, h, jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), bool),
             jnp.asarray(-1, jnp.int32))
    x, free, _, it, done, drift, _ = jax.lax.while_loop(cond, body, carry)
    return x, free, it, ~drift

  def outer_body(state):
    x, free, x_prox, done_rounds, restarts, total = state
    x_new, free_new, it, finished = inner(x, free, c0 - rho * x_prox)
    return (x_new, free_new, jnp.where(finished, x_new, x_prox),
            done_rounds + finished.astype(jnp.int32), restarts + 1, total + it)

  def outer_cond(state):
    _, _, _, done_rounds, restarts, _ = state
    return (done_rounds < rounds) & (restarts < rounds + 4)

  zero_i = jnp.zeros((), jnp.int32)
  state = (jnp.zeros((m,), dtype), jnp.zeros((m,), bool), jnp.zeros((m,), dtype), zero_i, zero_i,
           zero_i)
  x, _, _, _, _, total = jax.lax.while_loop(outer_cond, outer_body, state)
  x = jnp.where(jnp.isfinite(x), jnp.maximum(x, 0.0), 0.0)
  y = q0 @ x + c0
  scale = jnp.abs(q0) @ x + jnp.abs(c0) + TINY
  xmax = jnp.max(x) + TINY
  viol = jnp.maximum(jnp.maximum(-y, 0.0) / scale, jnp.minimum(x / xmax, jnp.abs(y) / scale))
  residual = jnp.max(viol) if m else jnp.zeros((), dtype)
  return SolverResult(x, residual, total)


def lower_bounded_qp(quad: Array, lower: Array, **kwargs) -> SolverResult:
  """``v = argmin_v vᵀQv`` subject to ``v ≥ u`` (the dual-cone projection weights).

  With Q = JJᵀ, Jᵀv is the projection of Jᵀu onto the dual cone
  {d : Jd ≥ 0} of the rows of J (Quinton & Rey 2024, Prop. 1). KKT
  conditions: v ≥ u, Qv ≥ 0, (v − u)ᵀQv = 0. Solved as the non-negative QP in
  x = v − u (:func:`nonneg_qp`, keyword arguments forwarded).
  """
  lower = lower.astype(jnp.promote_types(quad.dtype, lower.dtype))
  sol = nonneg_qp(quad, quad.astype(lower.dtype) @ lower, **kwargs)
  return SolverResult(lower + sol.x, sol.residual, sol.iterations)


def _unit_rows(gram: Array, log2_row_scales: Array) -> tuple[Array, Array, Array]:
  """The unit-row view of a per-row-scaled Gram matrix, shared by the solvers.

  With ``gram`` the Gram matrix of r_i = g_i / 2^{s_i}: returns the non-zero
  mask, log₂‖g_i‖ (0 for zero rows) and the symmetric cosine matrix, whose
  zero rows/columns are replaced by those of the identity (orthonormal
  phantoms: they stay decoupled from the real rows in every solve).
  """
  m = gram.shape[0]
  s = log2_row_scales.astype(gram.dtype)
  diag = jnp.diagonal(gram)
  nz = diag > 0
  log2_n = jnp.where(nz, s + 0.5 * jnp.log2(jnp.where(nz, diag, 1.0)), 0.0)
  cos = jnp.where(nz[:, None] & nz[None, :], cosine_matrix(gram), jnp.eye(m, dtype=gram.dtype))
  return nz, log2_n, 0.5 * (cos + cos.T)


def _psi(y: Array, alpha) -> Array:
  """Antiderivative of y^{−1/α}: log y for α = 1, else (y^{1−1/α} − 1) / (1 − 1/α).

  ``alpha`` may be a Python float or a traced scalar (both branches are then
  computed and selected; the second one tends to log y as α → 1).
  """
  if isinstance(alpha, (int, float)) and alpha == 1.0:
    return jnp.log(y)
  e = 1.0 - 1.0 / alpha
  is_log = e == 0
  e_safe = jnp.where(is_log, 1.0, e)
  return jnp.where(is_log, jnp.log(y), (y ** e_safe - 1.0) / e_safe)


def _log2_weights_to_weights(log2_w: Array, valid: Array) -> Array:
  """2^log2_w where valid (else 0), shifted down uniformly if it would overflow."""
  dtype = log2_w.dtype
  top = math.log2(float(jnp.finfo(dtype).max)) - 2.0
  peak = jnp.max(jnp.where(valid, log2_w, -jnp.inf))
  shift = jnp.where(jnp.isfinite(peak), jnp.maximum(peak - top, 0.0), 0.0)
  return jnp.where(valid, jnp.exp2(jnp.where(valid, log2_w - shift, 0.0)), 0.0)


def _nash_system(gram: Array, alpha: float = 1.0, *, log2_row_scales: Array | None = None,
                w0: Array | None = None, max_iters: int = 20, tol: float | None = None,
                ridge: float | None = None) -> SolverResult:
  """Solves ``G w = w^{−1/α}``, w > 0: Nash-MTL (α = 1) and FairGrad weights.

  For α = 1 the solution is the Nash bargaining solution of Navon et al.
  (2022), d = Jᵀw with g_iᵀd = 1/w_i; FairGrad (Ban & Ji, 2024) uses general
  α > 0. The equations are the optimality conditions of the strictly convex

      f(w) = ½ wᵀGw − Σ_i ψ(w_i),   ψ' = w^{−1/α}  (ψ = log for α = 1),

  which is minimised by damped Newton in JAX (the peers run a sequence of
  cvxpy problems or scipy ``least_squares`` on the host). Details:

  * Jacobi scaling: with n_i = ‖g_i‖ and w_i = x_i / n_i the system becomes
    (Cx)_i = b_i x_i^{−1/α} with the cosine matrix C and b_i = n_i^{1/α−1}
    (b = 1 for Nash: the solution is invariant to per-task gradient scales).
    It is well conditioned and exact for task gradients of wildly different
    norms when ``gram`` is a per-row-scaled Gram matrix (``log2_row_scales``).
  * Newton steps follow the multiplicative curve x·exp(tΔ/x) (x stays
    positive; the first-order term is the Newton step Δ), t chosen by exact
    search over t ∈ {2¹⁰, …, 1, …, 2⁻²⁰} (which lets x grow by orders of
    magnitude per step when far away, e.g. towards a diverging solution) and
    t = 1 once the Newton decrement is below 0.05 and the search cannot do
    better beyond round-off (quadratic convergence).
  * Zero gradients get w_i = 0 (any weight gives the same update) and are
    removed from the system. A positive root exists iff no z ≥ 0, z ≠ 0 has
    Jᵀz = 0 (0 is not in the convex hull of the non-zero gradients); when
    the gradients are Pareto-stationary w would diverge. A ridge
    ``ridge``·I on C (default 10·m·eps, above the round-off of the quadratic
    form) keeps the iterates finite; if the ridge carries more than half of
    some equation at the end, there is no root (to working precision) and
    w = 0 is returned (d = 0: no update improves every task, the
    disagreement point of the bargaining game); the residual reports it.
    The same w = 0 is returned when the final residual exceeds 1/2 (the
    step budget ran out far from a root): any returned w ≠ 0 has
    (Gw)_i > 0 for every i, a non-conflicting update.

  Tolerance: stops when the relative residual max_i |w_i^{1/α}(Gw)_i − 1|
  (dimensionless; ‖Gw − w^{−1/α}‖ ≤ residual·‖w^{−1/α}‖) of the ridged system
  is ≤ ``tol`` (default 100·eps of the dtype: ~1e-5 in float32, ~2e-14 in
  float64), after ``max_iters`` Newton steps, when no step decreases f, or
  when a Newton step in the quadratic phase fails to halve the residual
  (round-off floor, ~cond(C)·eps); then two Newton steps on the un-ridged
  equations remove the ridge's bias (each kept only if it helps).
  Newton converges quadratically: 5–10 steps from a cold start are typical.

  Args:
    gram: ``(m, m)`` PSD matrix: G, or the Gram matrix of the rows
      r_i = g_i / 2^{s_i} with ``log2_row_scales`` = s.
    alpha: FairGrad's α > 0 (1 gives Nash-MTL); a Python float, or a traced
      scalar (e.g. to vmap over α).
    log2_row_scales: optional ``(m,)`` s (see ``gram``).
    w0: optional warm start (weights of the true G); used if it has a lower
      objective than the cold start.
    max_iters: Newton budget (static).
    tol: see above.
    ridge: see above.

  Returns:
    ``SolverResult(w, residual, iterations)``; ``residual`` is the relative
    residual of the un-ridged equations over the non-zero gradients.
  """
  m = gram.shape[0]
  dtype = gram.dtype
  eps = float(jnp.finfo(dtype).eps)
  tol = 100 * eps if tol is None else tol
  ridge = 10 * m * eps if ridge is None else ridge
  if isinstance(alpha, (int, float)):
    alpha = float(alpha)
  else:
    alpha = jnp.asarray(alpha, dtype)
  s = jnp.zeros((m,), dtype) if log2_row_scales is None else log2_row_scales
  nz, log2_n, cos = _unit_rows(gram, s)
  eye = jnp.eye(m, dtype=dtype)
  c_ridge = cos + ridge * eye
  # b_i = n_i^{1/α − 1}, normalised so that max b = 1: x = κ y, log2 κ = B α/(α+1).
  log2_b = jnp.where(nz, (1.0 / alpha - 1.0) * log2_n, 0.0)
  big_b = jnp.where(jnp.any(nz), jnp.max(jnp.where(nz, log2_b, -jnp.inf)), 0.0)
  floor = 0.8 * math.log2(float(jnp.finfo(dtype).tiny))
  log2_b = jnp.where(nz, jnp.maximum(log2_b - big_b, floor), 0.0)
  b = jnp.exp2(log2_b)
  log2_kappa = big_b * alpha / (alpha + 1.0)

  def objective(y):  # y: (..., m)
    quad = 0.5 * jnp.sum((y @ c_ridge) * y, axis=-1)
    return quad - jnp.sum(b * _psi(y, alpha), axis=-1)

  def residual(y, mat):
    r = jnp.abs(y ** (1.0 / alpha) * (mat @ y) / b - 1.0)
    return jnp.max(jnp.where(nz, r, 0.0))

  exponents = list(range(10, -21, -1))
  steps = jnp.asarray([2.0 ** k for k in exponents], dtype)
  unit_step = exponents.index(0)

  def newton_direction(y, mat):
    """Newton step Δ for f with quadratic term ``mat``, as the rate Δ/y, and −∇fᵀΔ."""
    grad = mat @ y - b * y ** (-1.0 / alpha)
    # Newton system in log-coordinates, (Y H Y) δ = −Y ∇f with Δ = Y δ: the
    # matrix Y C Y + diag(b y^{1−1/α} / α) is far better conditioned than the
    # Hessian H itself (its diagonal term is the identity for Nash).
    hess = y[:, None] * mat * y[None, :] + jnp.diag(b / alpha * y ** (1.0 - 1.0 / alpha))
    rhs = -y * grad
    sol = spd_solve(hess, rhs)
    sol = sol + spd_solve(hess, rhs - hess @ sol)   # one refinement step
    sol = jnp.where(jnp.all(jnp.isfinite(sol)), sol, rhs / jnp.diagonal(hess))
    return sol, -grad @ (y * sol)

  def body(carry):
    y, r, it, _ = carry
    rate, dec = newton_direction(y, c_ridge)
    cand = y * jnp.exp(steps[:, None] * rate[None, :])
    vals = objective(cand)
    vals = jnp.where(jnp.all(jnp.isfinite(cand), axis=1) & jnp.isfinite(vals), vals, jnp.inf)
    k = jnp.argmin(vals)
    f0 = objective(y)
    # Near the solution take the plain Newton step (t = 1) unless the search
    # found a point that is better beyond round-off: f's differences are then
    # at round-off level and the search would only slow convergence down.
    noise = 100 * eps * (jnp.abs(f0) + 1.0)
    newton = (dec < 0.05) & (vals[unit_step] <= vals[k] + noise)
    y_new = jnp.where(newton, cand[unit_step], cand[k])
    ok = jnp.all(jnp.isfinite(y_new)) & jnp.all(y_new > 0) & (newton | (vals[k] < f0))
    y_new = jnp.where(ok, y_new, y)
    r_new = residual(y_new, c_ridge)
    # Round-off floor: a step of the quadratic phase that does not halve the
    # residual cannot improve it further (keep the better of the two points).
    floor_reached = newton & (r_new > 0.5 * r)
    keep = floor_reached & (r_new > r)
    return (jnp.where(keep, y, y_new), jnp.where(keep, r, r_new), it + 1, ~ok | floor_reached)

  def cond(carry):
    _, r, it, stop = carry
    return (it < max_iters) & (r > tol) & ~stop

  y_cold = b ** (alpha / (alpha + 1.0))
  y0 = y_cold
  if w0 is not None:
    log2_y = jnp.log2(jnp.where(w0 > 0, w0, 1.0).astype(dtype)) + log2_n - log2_kappa
    y_warm = jnp.where(nz & (w0 > 0) & jnp.isfinite(log2_y), jnp.exp2(log2_y), y_cold)
    y_warm = jnp.where(jnp.isfinite(y_warm) & (y_warm > 0), y_warm, y_cold)
    y0 = jnp.where(objective(y_warm) < objective(y_cold), y_warm, y_cold)
  r0 = residual(y0, c_ridge)
  carry = (y0, r0, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  y, _, it, _ = jax.lax.while_loop(cond, body, carry)
  # No positive root: the ridge carries half of some equation (its share of
  # y_i^{1/α}((C + εI)y)_i = b_i is ε y_i^{1+1/α} / b_i).
  share = ridge * y ** (1.0 + 1.0 / alpha) / b
  # The exact criterion, checked too because Newton may run out of steps
  # before w has grown that far: 0 is in the convex hull of the unit rows (zero
  # rows enter as orthonormal phantoms, which keep a zero min-norm zero and a
  # positive one positive).
  hull = min_norm_on_simplex(cos)
  hull_norm2 = hull.x @ cos @ hull.x
  no_root = jnp.any(nz & (share > 0.5)) | (jnp.any(nz) & (hull_norm2 <= ridge))

  # Polish: pure Newton steps on the un-ridged equations remove the ridge's
  # bias (ε y_i^{1+1/α}, not negligible in float32 for large y); a step is
  # kept only if it lowers the un-ridged residual.
  def polish(_, state):
    y, r = state
    rate, _ = newton_direction(y, cos)
    y_new = y * jnp.exp(rate)
    r_new = residual(y_new, cos)
    better = jnp.all(jnp.isfinite(y_new)) & (r_new < r)
    return jnp.where(better, y_new, y), jnp.where(better, r_new, r)

  y_pol, _ = jax.lax.fori_loop(0, 2, polish, (y, residual(y, cos)))
  y = jnp.where(no_root, y, y_pol)
  res = residual(y, cos)
  # A residual below 1 guarantees (Gw)_i > 0, i.e. g_iᵀd > 0 for every task:
  # weights that miss that (Newton out of steps on a nearly Pareto-stationary
  # problem, where w grows slowly towards a far-away root) are not returned
  # either; w = 0 is the same disagreement point as without a root.
  failed = no_root | ~(res <= 0.5)
  w = _log2_weights_to_weights(log2_kappa + jnp.log2(y) - log2_n, nz & ~failed)
  return SolverResult(w, res, it)


def _dual_cone_weights(row_gram: Array, log2_row_scales: Array, lowers: Array, *,
                      reg_eps: float = 1e-4, norm_eps: float = 0.0,
                      ridge: float | None = None, max_iters: int | None = None,
                      tol: float | None = None) -> SolverResult:
  """Weights of the projections of Jᵀu_k onto the dual cone of the rows of J.

  For each row u_k ≥ 0 of ``lowers`` solves (TorchJD's normalisation)

      v_k = argmin_v vᵀĜv  s.t.  v ≥ u_k,   Ĝ = G / tr(G) + reg_eps·I,

  and returns w = Σ_k v_k (UPGrad: u_k = p_k e_k; DualProj: one row u = p).
  With reg_eps = 0, Jᵀv_k is the exact projection of Jᵀu_k onto
  {d : Jd ≥ 0} (Quinton & Rey 2024, Prop. 1); reg_eps > 0 (TorchJD's default
  1e-4) only guarantees g_iᵀd ≥ −reg_eps·tr(G)·w_i. If tr(G) ≤ ``norm_eps``
  (absolute; TorchJD uses 1e-4) Ĝ is replaced by 0 and w = Σ_k u_k (the
  preference weights, e.g. the mean); with the default 0 this happens only
  when every gradient is zero.

  The QPs are solved (one after the other, :func:`lower_bounded_qp`) in the coordinates
  v̂ = diag(n) v of the unit rows, n_i = ‖g_i‖: there Ĝ becomes the cosine
  matrix plus the diagonal reg_eps·tr(G)/n_i² (same minimiser), which is well
  scaled even when task gradients differ by 1e±30, so the non-conflicting
  property survives any per-task scaling. Zero rows get v_kj = u_kj (as in
  TorchJD, where only the regularisation acts on them).

  Args:
    row_gram: ``(m, m)`` Gram matrix of the rows r_i = g_i / 2^{s_i}.
    log2_row_scales: ``(m,)`` s.
    lowers: ``(k, m)`` non-negative lower bounds u_k.
    reg_eps: ridge on the trace-normalised Gram matrix (see above).
    norm_eps: fallback threshold on tr(G) (see above).
    ridge: proximal weight of the QP solver in unit-row coordinates (default
      4·√eps; see :func:`nonneg_qp`).
    max_iters, tol: see :func:`nonneg_qp`.

  Returns:
    ``SolverResult(w, residual, iterations)`` with the largest QP residual
    and iteration count over the k problems. If the exact weights overflow
    the dtype (row norms differing by more than its range) they are scaled
    down uniformly: the direction of Jᵀw is kept.
  """
  m = row_gram.shape[0]
  dtype = row_gram.dtype
  eps = float(jnp.finfo(dtype).eps)
  ridge = 4.0 * math.sqrt(eps) if ridge is None else ridge
  lowers = jnp.maximum(lowers.astype(dtype), 0.0)
  nz, log2_n, cos = _unit_rows(row_gram, log2_row_scales)
  top_n = jnp.max(jnp.where(nz, log2_n, -jnp.inf))
  top_n = jnp.where(jnp.isfinite(top_n), top_n, 0.0)
  log2_trace = 2.0 * top_n + jnp.log2(jnp.sum(jnp.where(nz, jnp.exp2(2.0 * (log2_n - top_n)), 0.0)))
  fallback = ~jnp.any(nz)
  if norm_eps > 0:
    fallback = fallback | (log2_trace <= math.log2(norm_eps))
  pin = 1.0 / eps ** 2
  if reg_eps > 0:
    log2_rho = math.log2(reg_eps) + log2_trace - 2.0 * log2_n
    rho = jnp.where(nz, jnp.exp2(jnp.minimum(log2_rho, math.log2(pin))), 0.0)
  else:
    rho = jnp.zeros((m,), dtype)
  quad = cos + jnp.diag(rho)
  # Bounds in unit-row coordinates, normalised per problem: b̂_kj = u_kj n_j / 2^{L_k}.
  active = (lowers > 0) & nz[None, :]
  big_l = jnp.max(jnp.where(active, log2_n[None, :], -jnp.inf), axis=1)
  big_l = jnp.where(jnp.isfinite(big_l), big_l, 0.0)
  bounds = jnp.where(active, lowers * jnp.exp2(log2_n[None, :] - big_l[:, None]), 0.0)
  # One QP per row of ``lowers``, solved in sequence: vmapping the active-set
  # loops makes every problem run the slowest one's iterations with masked
  # updates, which on CPU was ~100× slower at m = 40 (and slower to compile).
  sol = jax.lax.map(
      lambda u: lower_bounded_qp(quad, u, ridge=ridge, max_iters=max_iters, tol=tol), bounds)
  vhat = jnp.where(nz[None, :], jnp.maximum(sol.x, 0.0), 0.0)
  # v_kj = v̂_kj 2^{L_k − l_j}; w_j = Σ_k v_kj, summed in log₂ with a common shift.
  pos = vhat > 0
  log2_v = jnp.where(pos, jnp.log2(jnp.where(pos, vhat, 1.0)) + big_l[:, None] - log2_n[None, :],
                     -jnp.inf)
  top = math.log2(float(jnp.finfo(dtype).max)) - 2.0 - math.log2(max(lowers.shape[0], 1))
  peak = jnp.max(log2_v)
  shift = jnp.where(jnp.isfinite(peak), jnp.maximum(peak - top, 0.0), 0.0)
  w = jnp.sum(jnp.where(pos, jnp.exp2(jnp.where(pos, log2_v - shift, 0.0)), 0.0), axis=0)
  w = w + jnp.where(nz, 0.0, jnp.sum(lowers, axis=0)) * jnp.exp2(-shift)
  w = jnp.where(fallback, jnp.sum(lowers, axis=0), w)
  residual = jnp.where(fallback, 0.0, jnp.max(sol.residual)).astype(dtype)
  iterations = jnp.where(fallback, 0, jnp.max(sol.iterations)).astype(jnp.int32)
  return SolverResult(w, residual, iterations)


# The solvers are jitted (static hyper-parameters): called eagerly they run a
# cached executable instead of re-tracing their loops at every call; inside an
# outer jit they are inlined as usual.
nonneg_qp = jax.jit(_nonneg_qp, static_argnames=("max_iters", "tol", "rounds"))
dual_cone_weights = jax.jit(_dual_cone_weights,
                            static_argnames=("reg_eps", "norm_eps", "ridge", "max_iters", "tol"))
_nash_static = jax.jit(_nash_system, static_argnames=("alpha", "max_iters", "tol", "ridge"))
_nash_traced = jax.jit(_nash_system, static_argnames=("max_iters", "tol", "ridge"))


@functools.wraps(_nash_system)
def nash_system(gram: Array, alpha: float | Array = 1.0, **kwargs) -> SolverResult:
  if isinstance(alpha, (int, float)):
    return _nash_static(gram, float(alpha), **kwargs)
  return _nash_traced(gram, alpha, **kwargs)


nash_system.__name__ = nash_system.__qualname__ = "nash_system"


def dense_qp(quad: Array, lin: Array, ineq: Array, ineq_rhs: Array, eq: Array,
             eq_rhs: Array, iters: int = 30) -> SolverResult:
  """A small dense convex QP with general linear constraints, inside jit.

      min_x ½ xᵀQx + cᵀx   s.t.   Gx ≤ h,   Ax = b       (Q positive semi-definite)

  Primal-dual interior-point method with Mehrotra's predictor-corrector
  (Nocedal & Wright, Alg. 16.4; the method of CVXOPT's ``coneqp``), started
  at x = 0 with unit slacks and multipliers, for a fixed number of
  iterations (no data-dependent loop length: vmap- and jit-friendly). Each
  iteration solves one (n + k)-sized KKT system twice. Meant for problems of a
  few dozen variables whose data are O(1) (scale them first); for the
  simplex-constrained and non-negative QPs of the aggregators use
  :func:`simplex_qp` / :func:`lower_bounded_qp`, which are exact.

  Args:
    quad: ``(n, n)`` PSD matrix Q.
    lin: ``(n,)`` linear term c.
    ineq, ineq_rhs: ``(p, n)`` G and ``(p,)`` h.
    eq, eq_rhs: ``(k, n)`` A (full row rank) and ``(k,)`` b.
    iters: iteration budget (default 30; the duality gap typically shrinks
      ~10× per iteration).

  Returns:
    ``SolverResult(x, residual, iterations)``: residual = max of the primal
    and dual infeasibilities and the mean complementarity sᵀz/p, relative to
    the data's scale.
  """
  dtype = jnp.result_type(quad, jnp.float32)
  q, c = quad.astype(dtype), lin.astype(dtype)
  g, h = ineq.astype(dtype), ineq_rhs.astype(dtype)
  a, b = eq.astype(dtype), eq_rhs.astype(dtype)
  n, p, k = q.shape[0], g.shape[0], a.shape[0]
  scale = jnp.maximum(jnp.max(jnp.abs(q)), 1.0)

  def residuals(x, s, z, y):
    r_dual = q @ x + c + g.T @ z + a.T @ y
    return r_dual, a @ x - b, g @ x + s - h

  def newton(x, s, z, y, comp):
    """Direction for the complementarity target s∘z + ds∘z + s∘dz = comp."""
    r_dual, r_eq, r_in = residuals(x, s, z, y)
    d = z / s
    kkt = jnp.zeros((n + k, n + k), dtype)
    kkt = kkt.at[:n, :n].set(q + g.T @ (d[:, None] * g))
    kkt = kkt.at[:n, n:].set(a.T).at[n:, :n].set(a)
    # ds = −r_in − G dx;  dz = (comp − s∘z + z∘r_in + z∘G dx) / s.
    rhs_x = -r_dual - g.T @ ((comp - s * z + z * r_in) / s)
    sol = jnp.linalg.solve(kkt, jnp.concatenate([rhs_x, -r_eq]))
    dx, dy = sol[:n], sol[n:]
    ds = -r_in - g @ dx
    dz = (comp - s * z - z * ds) / s
    return dx, ds, dz, dy

  def max_step(v, dv):
    ratios = jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf)
    return jnp.minimum(1.0, jnp.min(ratios))

  def body(_, carry):
    x, s, z, y = carry
    mu = jnp.dot(s, z) / p
    dx, ds, dz, dy = newton(x, s, z, y, jnp.zeros((p,), dtype))
    alpha = jnp.minimum(max_step(s, ds), max_step(z, dz))
    mu_aff = jnp.dot(s + alpha * ds, z + alpha * dz) / p
    sigma = jnp.clip((mu_aff / jnp.maximum(mu, TINY)) ** 3, 0.0, 1.0)
    dx, ds, dz, dy = newton(x, s, z, y, sigma * mu - ds * dz)
    alpha = 0.99 * jnp.minimum(max_step(s, ds), max_step(z, dz))
    new = (x + alpha * dx, s + alpha * ds, z + alpha * dz, y + alpha * dy)
    # Once converged the KKT system may become singular in low precision: keep
    # the last finite iterate.
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in new]))
    ok = ok & jnp.all(new[1] > 0) & jnp.all(new[2] > 0)
    return tuple(jnp.where(ok, nv, ov) for nv, ov in zip(new, carry))

  init = (jnp.zeros((n,), dtype), jnp.ones((p,), dtype), jnp.ones((p,), dtype),
          jnp.zeros((k,), dtype))
  x, s, z, y = jax.lax.fori_loop(0, iters, body, init)
  r_dual, r_eq, r_in = residuals(x, s, z, y)
  residual = jnp.max(jnp.stack([jnp.max(jnp.abs(r_dual)) / scale,
                                jnp.max(jnp.abs(r_eq)) if k else jnp.zeros((), dtype),
                                jnp.max(jnp.abs(r_in)) if p else jnp.zeros((), dtype),
                                jnp.dot(s, z) / max(p, 1) / scale]))
  return SolverResult(x, residual, jnp.asarray(iters, jnp.int32))
