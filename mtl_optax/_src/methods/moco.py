"""MoCo: multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods._common import require_num_tasks

NORMALIZATIONS = ("loss", "l2", "none")
LAMBDA_UPDATES = ("softmax", "projection")


def shared_param_leaves(params: Any, task_specific, name: str) -> list:
  """The parameter leaves that an aggregator treats as shared (flatten order).

  Resolves ``task_specific`` (None, mask pytree or ``callable(path, leaf)``)
  exactly as ``make_aggregator`` does on the stacked gradients, so that state
  built from these leaves lines up with ``TaskGradients.shared``.
  """
  if params is None:
    raise ValueError(f"{name}: init(params) needs the parameters to size its state.")
  stacked = jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct((1,) + jnp.shape(p), jnp.result_type(p)), params)
  mask = base.resolve_task_specific(task_specific, stacked, params)
  leaves = jax.tree_util.tree_leaves(params)
  shared = [leaf for leaf, head in zip(leaves, mask) if not head]
  if not shared:
    raise ValueError(f"{name}: every leaf is marked task-specific; nothing to aggregate.")
  return shared


def tracked_zeros(params: Any, m: int, task_specific, name: str) -> list:
  """Zero per-task copies ``(m, ...)`` of the shared leaves (float32 or wider)."""
  return [jnp.zeros((m,) + jnp.shape(p), linalg.accumulation_dtype(jnp.result_type(p)))
          for p in shared_param_leaves(params, task_specific, name)]


def normalized_rows(view: base.TaskGradients, factors: Optional[jax.Array]) -> list:
  """Shared leaves with row i rescaled to norm ``factors_i`` (unit norm if None).

  Uses the per-row power-of-two scales of ``view``, so rows of any magnitude
  are normalised without overflow; zero rows stay zero.
  """
  row_gram, row_scales = view.row_gram, view.row_scales
  if row_gram is None or row_scales is None:
    raise ValueError("normalized_rows: the view has no per-row scales.")
  acc = row_gram.dtype
  r_norms = linalg.safe_norms(row_gram)
  coef = linalg.safe_div(jnp.ones_like(r_norms) if factors is None else factors.astype(acc),
                         r_norms)
  out = []
  for leaf in view.shared:
    shape = (leaf.shape[0],) + (1,) * (leaf.ndim - 1)
    rows = leaf.astype(jnp.promote_types(leaf.dtype, acc)) / row_scales.reshape(shape)
    out.append(rows * coef.reshape(shape))
  return out


class MoCoState(NamedTuple):
  """MoCo's inner state: tracked gradients y (shared leaves, task axis first), λ, step k."""
  y: list
  lam: jax.Array
  step: jax.Array


def moco(beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, normalization: str = "loss",
         lambda_update: str = "softmax", *, task_specific=None,
         weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
         nonfinite: str = "skip"):
  """MoCo: tracked per-task gradients and a dual-ascent step on the task weights.

  At step k (from 1), with β_k = β / k^σ_β and γ_k = γ / k^σ_γ:

      ĝ_i = n(g_i),
      y_i ← y_i − β_k (y_i − ĝ_i),
      λ ← softmax(λ − γ_k (Y Yᵀ + ρI) λ)     (or Π_Δ(...) with "projection"),
      d = Yᵀλ = Σ_i λ_i y_i,

  where Y stacks the tracked gradients y_i (initialised at 0) and λ starts at
  1/m. The tracked gradients reduce the bias of the stochastic MGDA-like
  weights; ``d`` is built from Y, not from the current gradients, so MoCo is
  not a weighting of J (λ is in ``diagnostics["lambda"]``).

  Gradient normalisation n(·): "loss" (default; g_i L_i / ‖g_i‖, as in the
  authors' shared code used by LibMTL), "l2" (g_i / ‖g_i‖) or "none" (the
  paper's Algorithm 1). Norms are exact (zero gradients stay zero) instead of
  LibMTL's ``‖g_i‖ + 1e-8``. The λ update uses a softmax (LibMTL, default) or
  the paper's Euclidean projection onto the simplex ("projection"). If the
  λ step overflows (huge un-normalised gradients) λ is kept.

  Args:
    beta: learning rate of the tracked gradients (default 0.5).
    beta_sigma: decay exponent of β_k (default 0.5).
    gamma: learning rate of λ (default 0.1).
    gamma_sigma: decay exponent of γ_k (default 0.5).
    rho: ℓ2 regularisation of the λ step (default 0).
    normalization: "loss" (default; needs ``losses=``), "l2" or "none".
    lambda_update: "softmax" (default) or "projection".
    task_specific, weight_heads, nonfinite: see :func:`mtl_optax.make_aggregator`
      (heads get their own, unweighted task gradient).
    num_tasks: m, required (the tracked gradients have shape (m, ...)).

  Reference:
    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient
    Bias in Multi-objective Learning: A Provably Convergent Approach",
    ICLR 2023. Defaults from LibMTL's ``MoCo``.
  """
  base.check_positive("moco", beta=beta, gamma=gamma)
  base.check_nonnegative("moco", beta_sigma=beta_sigma, gamma_sigma=gamma_sigma, rho=rho)
  if beta > 1:
    raise ValueError(f"moco: beta must be in (0, 1], got {beta!r}.")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"moco: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  if lambda_update not in LAMBDA_UPDATES:
    raise ValueError(f"moco: lambda_update must be one of {LAMBDA_UPDATES}, got {lambda_update!r}.")
  m_init = require_num_tasks("moco", num_tasks)
  # Normalised rows make the tracked gradients, hence d, independent of the scale.
  info = base.AggregatorInfo(name="moco", needs_losses=normalization == "loss", weighted=False,
                             scale_degree=1 if normalization == "none" else 0)

  def init_inner(params, m):
    y = tracked_zeros(params, m_init, task_specific, "moco")
    return MoCoState(y=y, lam=jnp.full((m_init,), 1.0 / m_init, y[0].dtype),
                     step=jnp.zeros((), jnp.int32))

  def rule(view, state):
    m = view.num_tasks
    k = (state.step + 1).astype(state.lam.dtype)
    beta_k = beta / k ** beta_sigma
    gamma_k = gamma / k ** gamma_sigma
    if normalization == "none":
      g_hat = list(view.shared)
    else:
      g_hat = normalized_rows(view, view.losses if normalization == "loss" else None)
    y = [(yl - beta_k.astype(yl.dtype) * (yl - gl.astype(yl.dtype)))
         for yl, gl in zip(state.y, g_hat)]
    gram = linalg.gram_matrix(y)
    lam_old = state.lam.astype(gram.dtype)
    step = lam_old - gamma_k.astype(gram.dtype) * (
        (gram + rho * jnp.eye(m, dtype=gram.dtype)) @ lam_old)
    lam = jax.nn.softmax(step) if lambda_update == "softmax" else linalg.project_simplex(step)
    lam = jnp.where(jnp.all(jnp.isfinite(lam)), lam, lam_old)
    update = [linalg.combine(lam.astype(yl.dtype), yl) for yl in y]
    new_state = MoCoState(y=y, lam=lam.astype(state.lam.dtype), step=state.step + 1)
    return base.RuleOutput(state=new_state, shared_update=update,
                           diagnostics={"lambda": lam.astype(state.lam.dtype)})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)
