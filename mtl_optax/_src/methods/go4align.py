"""GO4Align: group optimisation for multi-task alignment (Shen et al., NeurIPS 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype
from mtl_optax._src.methods.uncertainty_weighting import check_eps

Array = jax.Array


class GO4AlignState(NamedTuple):
  """The risk-guided probabilities p (the loss history, Σ p = 1)."""
  probs: Array


def kmeans_1d(values: Array, num_groups: int) -> tuple[Array, Array]:
  """Globally optimal k-means of m scalars, inside jit.

  In one dimension an optimal partition consists of runs of the sorted values
  (Fisher 1958; Wang & Song 2011, "Ckmeans.1d.dp"), so dynamic programming
  over the sorted values finds the exact minimum of the within-group sum of
  squares: D[k, j] = min_i D[k−1, i] + SSE(i, j) for the first j values in
  k groups. Shapes are static (m × m tables, ``num_groups`` passes).

  Args:
    values: ``(m,)`` scalars.
    num_groups: K, 1 ≤ K ≤ m (static).

  Returns:
    ``(centres, groups)``: every value's group mean ``(m,)`` and group index
    ``(m,)`` (groups numbered in increasing order of their values).
  """
  m = values.shape[0]
  order = jnp.argsort(values)
  x = values[order]
  zero = jnp.zeros((1,), x.dtype)
  s1 = jnp.concatenate([zero, jnp.cumsum(x)])
  s2 = jnp.concatenate([zero, jnp.cumsum(x * x)])
  i = jnp.arange(m + 1)[:, None]
  j = jnp.arange(m + 1)[None, :]
  n = jnp.maximum(j - i, 1).astype(x.dtype)
  # SSE of the run x[i:j] (empty or reversed runs are forbidden: +inf).
  seg = (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / n
  seg = jnp.where(j > i, jnp.maximum(seg, 0.0), jnp.inf)
  best = seg[0]                      # D[1, j]
  splits = []
  for _ in range(1, num_groups):
    total = best[:, None] + seg      # [i, j]: first i values in k−1 groups, then x[i:j]
    splits.append(jnp.argmin(total, axis=0))
    best = jnp.min(total, axis=0)
  # Backtrack the run boundaries from the full prefix.
  ends = [jnp.asarray(m)]
  for split in reversed(splits):
    ends.append(split[ends[-1]])
  starts = ends[1:] + [jnp.asarray(0)]
  pos = jnp.arange(m)
  group_sorted = jnp.zeros((m,), jnp.int32)
  centre_sorted = jnp.zeros((m,), x.dtype)
  for k, (lo, hi) in enumerate(zip(reversed(starts), reversed(ends))):
    inside = (pos >= lo) & (pos < hi)
    mean = (s1[hi] - s1[lo]) / jnp.maximum(hi - lo, 1).astype(x.dtype)
    group_sorted = jnp.where(inside, k, group_sorted)
    centre_sorted = jnp.where(inside, mean, centre_sorted)
  inverse = jnp.argsort(order)
  return centre_sorted[inverse], group_sorted[inverse]


def go4align(
    num_groups: int = 1,
    robust_step_size: float = 1e-4,
    *,
    eps: float = 1e-8,
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """GO4Align: adaptive group risk minimisation.

  Risk-guided indicators from the loss history, then task grouping:

      p ← p ⊙ exp(−η L) / Σ_j p_j exp(−η L_j)      (p₀ = 1/m; the loss history)
      γ_i = (Σ_j L_j / L_i) · p_i                  (risk-guided group indicator)
      groups = k-means of the scalars γ_i into K groups,
      w_i = mean of γ over task i's group,  d = Σ_i w_i g_i.

  With K = 1 (the authors' default) every task gets the weight mean_i γ_i.
  Heads are weighted (GO4Align trains on the weighted loss Σ w_i L_i).
  Diagnostics: ``indicators`` (γ), ``groups`` (the group index of each task,
  groups ordered by increasing γ) and ``probs`` (p).

  Difference from the reference code: the grouping is the *globally optimal*
  one-dimensional k-means (exact dynamic programming over the sorted γ, see
  :func:`kmeans_1d`), deterministic and jit-friendly, where the reference runs
  randomly initialised Lloyd iterations (``kmeans_pytorch``) that may stop at a
  local optimum. Losses are floored at ``eps`` in Σ L / L_i.

  Args:
    num_groups: K (default 1, the reference training script's default), at
      most the number of tasks.
    robust_step_size: η of the exponentiated update of p (default 1e-4).
    eps: floor of the losses in the ratio (default 1e-8).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. ``num_tasks`` is required.

  Reference:
    Shen et al., "GO4Align: Group Optimization for Multi-Task Alignment",
    NeurIPS 2024 (arXiv 2404.06486) (code: autumn9999/GO4Align,
    ``methods/cluster_methods.py``, class GO4ALIGN).
  """
  name = "go4align"
  m = require_num_tasks(name, num_tasks, "the risk-guided probabilities")
  if (not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool)
      or not 1 <= num_groups <= m):
    raise ValueError(f"{name}: num_groups must be an int in [1, num_tasks={m}], "
                     f"got {num_groups!r}.")
  num_groups = int(num_groups)
  base.check_nonnegative(name, robust_step_size=robust_step_size)
  check_eps(name, eps)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def init_inner(params, _):
    return GO4AlignState(jnp.full((m,), 1.0 / m, state_dtype(params)))

  def rule(view, st):
    dtype = st.probs.dtype
    losses = jnp.maximum(view.losses.astype(dtype), eps)
    # Normalising in log space keeps p exact when η L is large.
    log_p = jnp.log(st.probs) - robust_step_size * losses
    probs = jax.nn.softmax(log_p)
    indicators = jnp.sum(losses) / losses * probs
    if num_groups == 1:
      centres = jnp.full((m,), jnp.mean(indicators), dtype)
      groups = jnp.zeros((m,), jnp.int32)
    else:
      centres, groups = kmeans_1d(indicators, num_groups)
    return base.RuleOutput(state=GO4AlignState(probs), weights=centres,
                           diagnostics={"indicators": indicators, "groups": groups,
                                        "probs": probs})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
