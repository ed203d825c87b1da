"""Coordinate-wise trimmed mean (Yin et al., ICML 2018)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg


def check_trim(m: int, trim_number: int):
  """Raises a clear error when m tasks are too few to trim 2·trim_number of them."""
  if m < 2 * trim_number + 1:
    raise ValueError(
        f"trimmed_mean: trimming trim_number={trim_number} values from each end needs at "
        f"least 2 * trim_number + 1 = {2 * trim_number + 1} tasks, got m={m}.")


def trimmed_mean(trim_number: int = 1, *, task_specific=None,
                 weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
                 nonfinite: str = "skip"):
  """Coordinate-wise trimmed mean of the task gradients.

  For every coordinate k, the m values (g_1)_k … (g_m)_k are sorted, the
  ``trim_number`` smallest and largest are dropped, and the rest averaged:

      d_k = 1/(m − 2b) Σ_{i = b+1}^{m − b} (g_(i))_k,    b = trim_number.

  A robust-aggregation baseline. It is not a weighted method (each coordinate
  keeps different tasks), so it exposes no task weights. Accumulated in
  float32 or better. Requires m ≥ 2b + 1 (checked at ``update``, and at
  construction when ``num_tasks`` is given).

  Args:
    trim_number: b ≥ 0 (default 1; b = 0 is the mean; TorchJD has no default).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Reference:
    Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML 2018.
  """
  name = "trimmed_mean"
  if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
    raise ValueError(f"{name}: trim_number must be a non-negative int, got {trim_number!r}.")
  if num_tasks is not None:
    check_trim(num_tasks, trim_number)
  info = base.AggregatorInfo(name=name, weighted=False, scale_degree=1)

  def rule(view, inner):
    m = view.num_tasks
    check_trim(m, trim_number)
    update = []
    for leaf in view.shared:
      acc = linalg.accumulation_dtype(leaf.dtype)
      kept = jnp.sort(leaf, axis=0)[trim_number:m - trim_number].astype(acc)
      # Σ_i (x_i / k) never exceeds max |x_i|: no overflow even near the
      # dtype's largest value (a plain Σ x_i / k could overflow).
      update.append(jnp.sum(kept / (m - 2 * trim_number), axis=0))
    return base.RuleOutput(state=inner, shared_update=update)

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
