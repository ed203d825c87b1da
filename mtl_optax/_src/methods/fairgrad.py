"""FairGrad: fair resource allocation in multi-task learning (Ban & Ji, ICML 2024)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg


def fairgrad(alpha: float = 1.0, *, max_iters: int = 40, tol: Optional[float] = None,
             task_specific=None, weight_heads: Optional[bool] = None,
             num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """FairGrad: α-fair allocation of the update among the tasks.

  Maximises the α-fair utility Σ_i (g_iᵀd)^{1−α}/(1−α) (log for α = 1) of the
  per-task improvements; the update is d = Jᵀw with w > 0 solving

      G w = w^{−1/α}      (elementwise),

  i.e. g_iᵀd = w_i^{−1/α}. α = 1 gives Nash-MTL's equations (proportional
  fairness), α → ∞ approaches max-min fairness. Solved inside jit by damped
  Newton on the equivalent strictly convex problem
  min ½wᵀGw − Σ ψ(w_i), ψ' = w^{−1/α} (:func:`mtl_optax.linalg.nash_system`);
  the reference code calls scipy ``least_squares`` on the host from
  w = 1/m. A common scaling of J by s scales d by s^{(1−α)/(1+α)}.

  Differences from the peers: no clipping and no extra factor (LibMTL; the
  authors' code multiplies the update by m "to match the sum loss"); zero
  gradients get weight 0; when no positive solution exists (the gradients are
  Pareto-stationary: Jᵀz = 0 for some z ≥ 0, z ≠ 0) w = 0 and d = 0, and the
  residual reports it.

  Args:
    alpha: the fairness exponent α > 0 (default 1.0, the default of the
      authors' code and LibMTL; the paper tunes it per benchmark, e.g. 2.0
      on CelebA and QM9).
    max_iters: Newton-step budget (default 40; 5–10 steps are typical, the
      budget matters only without a root, where w grows geometrically until
      the round-off ridge stops it and w = 0 is returned).
    tol: relative residual max_i |w_i^{1/α}(Gw)_i − 1| at which the solver
      stops (default 100·eps of the dtype); the reached residual is
      ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Reference:
    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
  """
  base.check_positive("fairgrad", alpha=alpha)
  if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
    raise ValueError(f"fairgrad: max_iters must be a positive int, got {max_iters!r}.")
  if tol is not None:
    base.check_positive("fairgrad", tol=tol)
  info = base.AggregatorInfo(name="fairgrad", scale_degree=(1.0 - alpha) / (1.0 + alpha))

  def rule(view, inner):
    sol = linalg.nash_system(view.row_gram, float(alpha),
                             log2_row_scales=jnp.log2(view.row_scales), max_iters=max_iters,
                             tol=tol)
    return base.RuleOutput(state=inner, weights=sol.x,
                           diagnostics={"residual": sol.residual, "iterations": sol.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
