"""Geometric loss strategy (Chennupati et al., CVPR Workshops 2019)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src.methods.uncertainty_weighting import check_eps


def geometric_loss(*, eps: float = 1e-8, task_specific=None, weight_heads: Optional[bool] = None,
                   num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Geometric loss strategy (GLS): minimise the geometric mean (Π_i L_i)^{1/m}.

      d = ∇ (Π_j L_j)^{1/m} = Σ_i w_i g_i,   w_i = (Π_j L_j)^{1/m} / (m L_i),

  computed in log space (exp(mean_j log L_j) / (m L_i)) so that many tasks or
  extreme losses neither overflow nor underflow. Losses are floored at ``eps``
  (positive losses are required by the geometric mean).

  Args:
    eps: floor of the losses (default 1e-8).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. Heads are weighted by w by default.

  Reference:
    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    CVPR Workshops 2019 (LibMTL's GLS).
  """
  name = "geometric_loss"
  check_eps(name, eps)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def rule(view, inner):
    m = view.num_tasks
    log_l = jnp.log(jnp.maximum(view.losses.astype(view.gram.dtype), eps))
    w = jnp.exp(jnp.mean(log_l) - log_l) / m
    return base.RuleOutput(state=inner, weights=w,
                           diagnostics={"geometric_mean": jnp.exp(jnp.mean(log_l))})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
