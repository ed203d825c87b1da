"""Scale-invariant loss: Σ_i log L_i (the baseline of Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src.methods.uncertainty_weighting import check_eps


def scale_invariant(*, eps: float = 1e-8, task_specific=None, weight_heads: Optional[bool] = None,
                    num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Scale-invariant (SI) loss: minimise Σ_i log L_i.

      d = Σ_i g_i / L_i,   i.e.  w_i = 1 / max(L_i, eps).

  Invariant to a rescaling of any task's loss (L_i → c_i L_i leaves d
  unchanged). Losses must be positive; they are floored at ``eps`` so that a
  zero (or negative) loss gives a large finite weight, never NaN/inf.

  Args:
    eps: floor of the losses (default 1e-8).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. Heads are weighted by w by default.

  Reference:
    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (the
    "SI" baseline); Gama & Grassi 2025 compare it as "SI".
  """
  name = "scale_invariant"
  check_eps(name, eps)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def rule(view, inner):
    losses = view.losses.astype(view.gram.dtype)
    return base.RuleOutput(state=inner, weights=1.0 / jnp.maximum(losses, eps))

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
