"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg


def imtl_weights(gram: jnp.ndarray) -> jnp.ndarray:
  """IMTL-G weights in Gram form: v = G⁺ √diag(G), w = v / Σv.

  The aggregated d = Jᵀw has equal projections on every unit task gradient
  (u_iᵀd equal for all i) with Σ w = 1. If Σv vanishes (all-zero gradients)
  the weights are 0 and so is the update.
  """
  v = jnp.linalg.pinv(gram, hermitian=True) @ linalg.safe_norms(gram)
  return linalg.safe_div(v, jnp.sum(v))


def imtl(*, task_specific=None, weight_heads: Optional[bool] = None,
         num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """IMTL-G.

  Finds the combination d = Σ_i α_i g_i with Σ α = 1 whose projection onto every
  unit gradient u_i = g_i/‖g_i‖ is the same: with D = [g_1 − g_i]ᵢ and
  U = [u_1 − u_i]ᵢ (i ≥ 2), α_{2..m} = g_1 Uᵀ(DUᵀ)⁻¹, α_1 = 1 − Σ α_{2..m};
  computed in the equivalent Gram form of :func:`imtl_weights`.

  Args:
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Reference:
    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.
  """
  info = base.AggregatorInfo(name="imtl")

  def rule(view, inner):
    return base.RuleOutput(state=inner, weights=imtl_weights(view.gram))

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
