"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base

SCALE_MODES = ("min", "median", "rmse")


def check_pref_vector(name: str, pref_vector, num_tasks: Optional[int]):
  """Validates an optional preference vector; returns it as a tuple of floats (or None)."""
  if pref_vector is None:
    return None
  arr = np.asarray(pref_vector, dtype=np.float64)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f"{name}: pref_vector must be a non-empty 1-D sequence of numbers, "
                     f"got shape {arr.shape}.")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name}: pref_vector must be finite, got {pref_vector!r}.")
  if num_tasks is not None and arr.size != num_tasks:
    raise ValueError(f"{name}: pref_vector has {arr.size} entries but num_tasks={num_tasks}.")
  return tuple(float(x) for x in arr)


def pref_array(name: str, pref, m: int, default: float, dtype) -> jax.Array:
  """The (m,) preference vector (``default`` everywhere when ``pref`` is None)."""
  if pref is None:
    return jnp.full((m,), default, dtype)
  if len(pref) != m:
    raise ValueError(f"{name}: pref_vector has {len(pref)} entries but the gradients have "
                     f"m={m} tasks.")
  return jnp.asarray(pref, dtype)


def balance_transformation(gram: jax.Array, scale_mode: str = "min"):
  """Aligned-MTL's balance matrix B = √σ · V Λ^{-1/2} Vᵀ over the kept eigenpairs.

  With G = VΛVᵀ, eigenvalues λ ≤ λ_max·m·eps(dtype) are treated as zero
  (dropped); σ is the smallest ("min"), the lower median ("median") or the
  mean ("rmse": the mean of the λ_k = s_k², i.e. the squared RMS singular
  value s of J) of the kept eigenvalues. If no eigenvalue is kept (G = 0), B = I. B is
  symmetric and invariant to a common scaling of G, and the aligned rows BJ
  satisfy (BJ)(BJ)ᵀ = B G B = σ·V_k V_kᵀ: orthogonal, of equal norm √σ, on the
  kept eigenspace.

  Returns:
    ``(B, rank, condition_number)`` (λ_max / λ_min over the kept eigenvalues;
    1 when none is kept).
  """
  m = gram.shape[0]
  dtype = gram.dtype
  lam, vecs = jnp.linalg.eigh(gram)  # ascending
  tol = jnp.max(lam) * m * jnp.finfo(dtype).eps
  keep = lam > tol
  rank = jnp.sum(keep).astype(jnp.int32)
  safe_lam = jnp.where(keep, lam, 1.0)
  if scale_mode == "min":
    sigma = jnp.min(jnp.where(keep, lam, jnp.inf))
  elif scale_mode == "median":
    # The kept eigenvalues are the top `rank` of the ascending list, at indices
    # m - rank .. m - 1; their lower median (torch.median's convention, used by
    # the reference code and TorchJD) sits at (rank - 1) // 2 within them.
    sigma = lam[jnp.clip(m - rank + (rank - 1) // 2, 0, m - 1)]
  elif scale_mode == "rmse":
    sigma = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1).astype(dtype)
  else:
    raise ValueError(f"aligned_mtl: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}.")
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(safe_lam), 0.0)
  coef = jnp.sqrt(jnp.where(rank > 0, sigma, 1.0)) * inv_sqrt
  b = jnp.matmul(vecs * coef[None, :], vecs.T, precision=jax.lax.Precision.HIGHEST)
  b = jnp.where(rank > 0, 0.5 * (b + b.T), jnp.eye(m, dtype=dtype))
  cond = jnp.where(rank > 0, jnp.max(lam) / jnp.min(jnp.where(keep, lam, jnp.inf)), 1.0)
  return b, rank, cond


def aligned_mtl(scale_mode: str = "min", pref_vector: Optional[Sequence[float]] = None, *,
                task_specific=None, weight_heads: Optional[bool] = None,
                num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Aligned-MTL: align the principal components of the task gradients.

  With the eigendecomposition G = JJᵀ = VΛVᵀ (eigenvalues λ > λ_max·m·eps(dtype)
  kept, the others dropped as round-off), the balance matrix

      B = √σ · V Λ^{-1/2} Vᵀ,     w = B p,     d = Jᵀw,

  makes the rows of BJ (the "aligned" gradients) orthogonal with equal norms
  √σ: the condition number of the aligned system is 1. σ is the smallest kept
  eigenvalue ("min", the paper's default), their lower median ("median") or
  their mean ("rmse"). p is the preference vector (default 1/m). The weights
  do not depend on a common scaling of J; d is linear in it.

  Args:
    scale_mode: "min" (default), "median" or "rmse".
    pref_vector: task preferences p (length m); default uniform 1/m, as TorchJD.
      The reference code (SamsungLabs/MTL) sums the aligned gradients, i.e.
      p = 1: its update is m times ours.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient; the
      reference code optionally scales decoder gradients, not done here).

  Diagnostics: ``rank`` (number of kept eigenvalues) and ``condition_number``
  (λ_max / λ_min over the kept eigenvalues).

  Differences: the reference code's and TorchJD's cut-off uses float32's eps
  whatever the dtype; ours uses the eps of the Gram matrix's dtype (float64
  inputs keep more eigenvalues).

  Run on shared-representation gradients (``representation_update``) it is
  the paper's Aligned-MTL-UB.

  Reference:
    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023 (Algorithm 1).
  """
  name = "aligned_mtl"
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"{name}: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}.")
  pref = check_pref_vector(name, pref_vector, num_tasks)
  info = base.AggregatorInfo(name=name, representation="variant", scale_degree=1)

  def rule(view, inner):
    m = view.num_tasks
    gram = view.gram
    p = pref_array(name, pref, m, 1.0 / m, gram.dtype)
    b, rank, cond = balance_transformation(gram, scale_mode)
    w = jnp.matmul(b, p, precision=jax.lax.Precision.HIGHEST)
    return base.RuleOutput(state=inner, weights=w,
                           diagnostics={"rank": rank, "condition_number": cond})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
