"""Krum and Multi-Krum: Byzantine-robust selection (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base


def _check_int(name: str, arg: str, value, minimum: int):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    kind = "non-negative" if minimum == 0 else "positive"
    raise ValueError(f"{name}: {arg} must be a {kind} int, got {value!r}.")


def check_krum_tasks(m: int, n_byzantine: int, n_selected: int):
  """Raises a clear error when m tasks are too few for Krum's parameters."""
  if m < n_byzantine + 3:
    raise ValueError(
        f"krum: needs at least n_byzantine + 3 = {n_byzantine + 3} tasks (each score sums "
        f"the distances to the m - n_byzantine - 2 nearest other rows), got m={m}.")
  if m < n_selected:
    raise ValueError(f"krum: n_selected={n_selected} exceeds the number of tasks m={m}.")


def krum_weights(gram: jax.Array, n_byzantine: int, n_selected: int):
  """Multi-Krum weights from the Gram matrix.

  Squared distances ‖g_i − g_j‖² = G_ii + G_jj − 2G_ij; the score of row i is
  the sum of its distances to its m − f − 2 nearest other rows; the
  ``n_selected`` rows of smallest score get weight 1/n_selected. Ties are
  broken by the lower task index (deterministic).

  Returns:
    ``(weights, scores)``.
  """
  m = gram.shape[0]
  diag = jnp.diagonal(gram)
  dist = jnp.sqrt(jnp.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0))
  # Exclude the row itself (its own distance is 0 up to round-off, but another
  # row may tie at 0 too: dropping the diagonal is exact).
  dist = jnp.where(jnp.eye(m, dtype=bool), jnp.inf, dist)
  n_closest = m - n_byzantine - 2
  nearest = jnp.sort(dist, axis=1)[:, :n_closest]
  scores = jnp.sum(nearest, axis=1)
  order = jnp.argsort(scores, stable=True)
  selected = jnp.zeros((m,), gram.dtype).at[order[:n_selected]].set(1.0)
  return selected / n_selected, scores


def krum(n_byzantine: int = 0, n_selected: int = 1, *, task_specific=None,
         weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
         nonfinite: str = "skip"):
  """Krum (n_selected = 1) and Multi-Krum (n_selected > 1).

  Each task gradient is scored by the sum of its Euclidean distances to its
  m − f − 2 nearest other gradients (f = ``n_byzantine``, the number of rows
  that may be adversarial); the update is the mean of the ``n_selected``
  gradients of smallest score:

      s_i = Σ_{j ∈ N_i} ‖g_i − g_j‖,   d = (1/k) Σ_{i ∈ S} g_i,
      S = the k = n_selected rows of smallest s.

  A robust-aggregation baseline, Gram-based (distances from G). Requires
  m ≥ f + 3 and m ≥ n_selected (checked at ``update``, and at construction
  when ``num_tasks`` is given).

  Args:
    n_byzantine: f ≥ 0 (default 0; TorchJD has no default).
    n_selected: k ≥ 1 (default 1: Krum).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Diagnostics: ``krum_scores`` (in units of the scaled Gram matrix: only their
  order is meaningful).

  Reference:
    Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
  """
  name = "krum"
  _check_int(name, "n_byzantine", n_byzantine, 0)
  _check_int(name, "n_selected", n_selected, 1)
  if num_tasks is not None:
    check_krum_tasks(num_tasks, n_byzantine, n_selected)
  info = base.AggregatorInfo(name=name, scale_degree=1)

  def rule(view, inner):
    check_krum_tasks(view.num_tasks, n_byzantine, n_selected)
    w, scores = krum_weights(view.gram, n_byzantine, n_selected)
    return base.RuleOutput(state=inner, weights=w, diagnostics={"krum_scores": scores})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
