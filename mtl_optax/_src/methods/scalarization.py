"""Fixed weightings: ``sum``, ``mean`` and ``linear_scalarization``.

d = Σ_i w_i g_i with constant w (w = 1 for ``sum``, 1/m for ``mean`` — the
"uniform loss" / unitary scalarisation baseline of Gama & Grassi 2025 — and
user-given weights for ``linear_scalarization``). Heads are weighted like the
shared parameters, exactly as differentiating the weighted loss Σ w_i L_i.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base


def _fixed(name, weights_of_m, task_specific, num_tasks, nonfinite):
  info = base.AggregatorInfo(name=name, representation="exact", scale_degree=1)

  def rule(view, inner):
    return base.RuleOutput(state=inner, weights=weights_of_m(view.num_tasks, view.gram.dtype))

  # Heads follow the weighted-loss convention: the weights apply to them too.
  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=True,
                              num_tasks=num_tasks, nonfinite=nonfinite)


def sum(*, task_specific=None, num_tasks: Optional[int] = None, nonfinite: str = "skip"):  # pylint: disable=redefined-builtin
  """Sum of the task gradients: d = Σ_i g_i (the gradient of Σ_i L_i).

  Args:
    task_specific: None, a boolean mask pytree or ``callable(path, leaf)``
      marking the task-specific (head) leaves.
    num_tasks: m, to build the full state at ``init`` (optional).
    nonfinite: "skip" (default) or "zero_task"; see ``make_aggregator``.
  """
  return _fixed("sum", lambda m, dt: jnp.ones((m,), dt), task_specific, num_tasks, nonfinite)


def mean(*, task_specific=None, num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Mean of the task gradients: d = (1/m) Σ_i g_i ("uniform loss").

  Args: as for :func:`sum`.
  """
  return _fixed("mean", lambda m, dt: jnp.full((m,), 1.0 / m, dt), task_specific, num_tasks,
                nonfinite)


def linear_scalarization(weights: Sequence[float], *, task_specific=None,
                         num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Fixed linear scalarisation: d = Σ_i w_i g_i, the gradient of Σ_i w_i L_i.

  Args:
    weights: the m task weights (finite; typically non-negative).
    task_specific, num_tasks, nonfinite: as for :func:`sum`.
  """
  w = np.asarray(weights, dtype=np.float64)
  if w.ndim != 1 or not np.all(np.isfinite(w)):
    raise ValueError(
        f"linear_scalarization: weights must be a finite 1-D sequence, got {weights!r}.")

  def weights_of_m(m, dtype):
    if m != w.shape[0]:
      raise ValueError(
          f"linear_scalarization: {w.shape[0]} weights given but the gradients have m={m} tasks.")
    return jnp.asarray(w, dtype)

  return _fixed("linear_scalarization", weights_of_m, task_specific, num_tasks, nonfinite)
