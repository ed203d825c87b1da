"""ConFIG: conflict-free gradient direction (Liu, Chu & Thuerey, 2024)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods.aligned_mtl import check_pref_vector
from mtl_optax._src.methods.aligned_mtl import pref_array


def config_coefficients(row_gram: jnp.ndarray, row_scales: jnp.ndarray, pref: jnp.ndarray):
  """ConFIG in Gram form: coefficients c on the unit rows u_i, d = Σ_i c_i u_i.

  With the cosine matrix C = UUᵀ of the unit rows and b = C⁺p, the direction
  U⁺p = Uᵀb (the minimum-norm solution of U x = p) has norm √(bᵀCb); its
  projection length Σ_j g_j·d̂ = Σ_j ‖g_j‖ (Cb)_j / √(bᵀCb), hence
  c = b · Σ_j ‖g_j‖(Cb)_j / (bᵀCb). Zero rows have u_i = 0 (and c_i = 0).
  Everything is computed from the per-row-scaled Gram matrix (norms
  ‖g_j‖ = row_scales_j·√R_jj), so rows of very different magnitudes are exact.

  Returns:
    ``(c, unit_norms)`` where unit_norms = √R_ii (the row norms in the per-row
    scaled units: g_i = row_scales_i · unit_norms_i · u_i).
  """
  dtype = row_gram.dtype
  m = row_gram.shape[0]
  r_norms = linalg.safe_norms(row_gram)
  cos = linalg.cosine_matrix(row_gram)
  # pinv cut-off: eigenvalues of C below 10·m·eps·λ_max are round-off.
  b = jnp.linalg.pinv(cos, rtol=10 * m * jnp.finfo(dtype).eps, hermitian=True) @ pref
  cb = jnp.matmul(cos, b, precision=jax.lax.Precision.HIGHEST)
  bcb = jnp.maximum(b @ cb, 0.0)
  # ‖U⁺p‖² = bᵀCb. At round-off level, p is orthogonal to the span of the unit
  # rows (e.g. opposite rows with p = 1): the direction is undefined, d = 0
  # (TorchJD's normalize(·, eps) gives 0 as well; a relative test here keeps
  # round-off from being normalised into an arbitrary unit direction).
  degenerate = bcb <= 10 * m * jnp.finfo(dtype).eps * (pref @ pref)
  b = jnp.where(degenerate, 0.0, b)
  cb = jnp.where(degenerate, 0.0, cb)
  # Σ_j ‖g_j‖(Cb)_j, accumulated relative to the largest row scale (no overflow).
  top = jnp.max(row_scales)
  length = jnp.sum((row_scales / top) * r_norms * cb)
  coef = linalg.safe_div(b * length, bcb) * top
  return coef, r_norms


def config(pref_vector: Optional[Sequence[float]] = None, *, task_specific=None,
           weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
           nonfinite: str = "skip"):
  """ConFIG: the conflict-free direction with equal cosines to every task.

  With unit rows u_i = g_i/‖g_i‖ (U their matrix) and preferences p,

      d̂ = U⁺p / ‖U⁺p‖,     d = (Σ_i g_iᵀd̂) · d̂,

  i.e. the direction whose cosines with the task gradients are proportional to
  p (equal for the default p = 1) when the rows are linearly independent (the
  least-squares / minimum-norm solution otherwise), scaled by the sum of the projections of the
  gradients onto it. Computed in Gram form (the cosine matrix C = UUᵀ and its
  pseudo-inverse, cut-off 10·m·eps·λ_max, so rows closer than ~√(10·m·eps) to
  linear dependence are treated as dependent; if ‖U⁺p‖² ≤ 10·m·eps·‖p‖², p is
  numerically orthogonal to the span of the unit rows and d = 0); the update
  is assembled from the unit rows, so tasks whose gradients differ by 1e±30
  are exact. d is linear under positive per-task scalings of the gradients
  (methods.md §D).
  The weights w with d = Jᵀw are ``diagnostics["weights"]`` (they saturate at
  the dtype's largest value only if the row norms differ by more than ~1e38).

  Args:
    pref_vector: p (length m); default all ones (TorchJD's and the official
      code's equal weighting).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Differences: the official code and TorchJD solve U x = p by least squares on
  the m×n matrix U (torch ``lstsq`` / ``pinv``); we use the Gram form, which
  squares the condition number but never touches an n-sized factorisation.

  Reference:
    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", arXiv 2408.11104 (2024; ICLR 2025), Eq. 2.
  """
  name = "config"
  pref = check_pref_vector(name, pref_vector, num_tasks)
  info = base.AggregatorInfo(name=name, scale_degree=1)

  def rule(view, inner):
    m = view.num_tasks
    dtype = view.row_gram.dtype
    p = pref_array(name, pref, m, 1.0, dtype)
    coef, r_norms = config_coefficients(view.row_gram, view.row_scales, p)
    # Unit rows u_i = g_i / (row_scales_i · r_norms_i): exact power-of-two and
    # O(1) divisions, no overflow.
    inv = linalg.safe_div(jnp.ones_like(r_norms), r_norms) / view.row_scales
    update = []
    for leaf in view.shared:
      acc = linalg.accumulation_dtype(leaf.dtype)
      units = leaf.astype(acc) * inv.astype(acc).reshape((m,) + (1,) * (leaf.ndim - 1))
      update.append(linalg.combine(coef.astype(acc), units))
    big = jnp.finfo(dtype).max
    weights = jnp.clip(coef * inv, -big, big)
    return base.RuleOutput(state=inner, shared_update=update, diagnostics={"weights": weights})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
