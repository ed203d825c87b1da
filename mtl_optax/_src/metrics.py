"""Multi-task evaluation metrics: Δm%, mean rank, gradient interference, fixed weights.

* :func:`delta_m` — the relative multi-task performance Δm% against single-task
  baselines (Maninis et al. 2019; the protocol of Navon et al. 2022, Gama &
  Grassi 2025):

      Δm% = (1/T) Σ_t (1/|M_t|) Σ_j (−1)^{l_tj} (M_tj − S_tj) / S_tj × 100,

  with l_tj = 1 when lower is better for metric j of task t. Positive is better.
* :func:`mean_rank` — the mean rank (MR) of every method over all metrics.
* :func:`interference` / :func:`interference_from_gram` — Gama & Grassi's
  interference measure: the mean over tasks of the cosine similarity between a
  task's shared gradient and the average shared gradient (1 = no interference).
* :func:`fixed_weights` — an exponential moving average (β = 0.9) of the
  per-epoch mean task weights of a run, to re-train with fixed weights
  (``mo.linear_scalarization``), as in Gama & Grassi, Table 2.
* :func:`spearman` — Spearman's rank correlation (ties averaged), to compare
  rankings with published ones.

``delta_m``, ``mean_rank``, ``fixed_weights`` and ``spearman`` are host-side
(NumPy) helpers for result tables; ``interference`` is pure JAX and can run
inside a jitted training step.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base
from mtl_optax._src import linalg

Array = jax.Array
# Lower-is-better specification: one bool for everything, a mapping metric → bool
# (applies to that metric name in every task), or the nested structure of the values.
Direction = Union[bool, Mapping[str, Any]]


# ---------------------------------------------------------------------------
# Δm%.
# ---------------------------------------------------------------------------

def _as_task_dict(values, what):
  """Normalises ``values`` to ``{task: {metric: float}}``.

  Accepts ``{task: {metric: value}}``, ``{task: value}`` (one metric per task,
  named after the task) or a 1-D sequence (task i ↦ ``{"i": value}``).
  """
  if isinstance(values, Mapping):
    out = {}
    for task, v in values.items():
      if isinstance(v, Mapping):
        if not v:
          raise ValueError(f"delta_m: task {task!r} of {what} has no metrics.")
        out[task] = {k: float(x) for k, x in v.items()}
      else:
        out[task] = {task: float(v)}
    if not out:
      raise ValueError(f"delta_m: {what} is empty.")
    return out
  arr = np.asarray(values, dtype=np.float64)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f"delta_m: {what} must be a mapping or a non-empty 1-D sequence, "
                     f"got shape {arr.shape}.")
  return {i: {i: float(x)} for i, x in enumerate(arr)}


def _direction(lower_is_better, task, metric):
  """Looks up whether lower is better for (task, metric)."""
  lib = lower_is_better
  if isinstance(lib, (bool, np.bool_)):
    return bool(lib)
  if isinstance(lib, Mapping):
    if task in lib:
      v = lib[task]
      if isinstance(v, Mapping):
        if metric not in v:
          raise KeyError(f"lower_is_better[{task!r}] has no entry for metric {metric!r}.")
        return bool(v[metric])
      return bool(v)
    if metric in lib:
      return bool(lib[metric])
    raise KeyError(f"lower_is_better has no entry for task {task!r} / metric {metric!r}.")
  arr = np.asarray(lib)
  if arr.ndim == 1 and isinstance(task, (int, np.integer)) and task < arr.size:
    return bool(arr[task])
  raise TypeError(
      "lower_is_better must be a bool, a mapping (task → bool / {metric: bool}, or "
      f"metric → bool) or, for sequence values, a sequence of bools; got {lib!r}.")


def delta_m(values, baselines, lower_is_better: Direction, *, per_task: bool = False):
  """Relative multi-task performance Δm% against single-task baselines.

      Δm% = (1/T) Σ_t (1/|M_t|) Σ_{j∈M_t} (−1)^{l_tj} (M_tj − S_tj) / S_tj × 100

  Each metric's relative change is signed so that positive means better than
  the baseline; a task with several metrics contributes the mean of its
  metrics' changes (so every task has the same weight).

  Args:
    values: the multi-task model's metrics, ``{task: {metric: value}}``,
      ``{task: value}`` (one metric per task) or a 1-D sequence (one metric per
      task, in order).
    baselines: the single-task values S, same structure (extra entries are
      ignored; every (task, metric) of ``values`` must be present).
    lower_is_better: ``True``/``False`` for all metrics; a mapping
      ``{metric_name: bool}``; a mapping ``{task: bool}`` or
      ``{task: {metric: bool}}``; or, for sequence values, a sequence of bools.
    per_task: also return the per-task terms.

  Returns:
    Δm in percent (float); with ``per_task=True``, ``(delta, {task: Δ_t})``
    where Δ_t = (1/|M_t|) Σ_j (−1)^{l_tj}(M_tj − S_tj)/S_tj × 100 and
    delta = mean_t Δ_t.

  Raises:
    ValueError: a baseline is missing or zero.

  Example:
    >>> # ((0.95 - 0.96) / 0.96 - (0.012 - 0.010) / 0.010) / 2 * 100
    >>> round(delta_m({"CL": {"acc": 0.95}, "RR": {"mse": 0.012}},
    ...               {"CL": {"acc": 0.96}, "RR": {"mse": 0.010}},
    ...               {"acc": False, "mse": True}), 4)
    -10.5208
  """
  vals = _as_task_dict(values, "values")
  base_ = _as_task_dict(baselines, "baselines")
  terms = {}
  for task, metrics in vals.items():
    if task not in base_:
      raise ValueError(f"delta_m: no baseline for task {task!r}.")
    acc = []
    for metric, m_val in metrics.items():
      if metric not in base_[task]:
        raise ValueError(f"delta_m: no baseline for task {task!r}, metric {metric!r}.")
      s_val = base_[task][metric]
      if s_val == 0 or not np.isfinite(s_val):
        raise ValueError(f"delta_m: baseline of {task!r}/{metric!r} must be finite and "
                         f"non-zero, got {s_val}.")
      sign = -1.0 if _direction(lower_is_better, task, metric) else 1.0
      acc.append(sign * (m_val - s_val) / abs(s_val) * 100.0)
    terms[task] = float(np.mean(acc))
  delta = float(np.mean(list(terms.values())))
  return (delta, terms) if per_task else delta


# ---------------------------------------------------------------------------
# Mean rank.
# ---------------------------------------------------------------------------

def _flatten(d, prefix=()):
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = float(v)
  return out


def _rankdata(x):
  """Ranks 1..n of a 1-D array, ties get the average rank (as scipy's 'average')."""
  x = np.asarray(x, dtype=np.float64)
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x), dtype=np.float64)
  sx = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sx[j + 1] == sx[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
    i = j + 1
  return ranks


def mean_rank(table: Mapping[str, Mapping], lower_is_better: Direction) -> dict:
  """Mean rank (MR) of each method over all metrics (1 = best everywhere).

  For each metric the methods are ranked (1 = best; ties share the average
  rank); a method's MR is the mean of its ranks over the metrics.

  Args:
    table: ``{method: {task: {metric: value}}}`` or ``{method: {metric: value}}``;
      every method must report the same metrics.
    lower_is_better: as for :func:`delta_m` (a bool, ``{metric: bool}``,
      ``{task: bool}`` or ``{task: {metric: bool}}``).

  Returns:
    ``{method: mean rank}`` (floats).
  """
  if not table:
    raise ValueError("mean_rank: the table is empty.")
  flat = {meth: _flatten(row) if isinstance(row, Mapping) else None
          for meth, row in table.items()}
  if any(v is None for v in flat.values()):
    raise TypeError("mean_rank: every row of the table must be a mapping of metrics.")
  methods = list(flat)
  keys = list(flat[methods[0]])
  for meth in methods:
    if set(flat[meth]) != set(keys):
      raise ValueError(f"mean_rank: method {meth!r} reports metrics {sorted(flat[meth])}, "
                       f"expected {sorted(keys)}.")
  ranks = np.zeros((len(methods), len(keys)))
  for j, key in enumerate(keys):
    task, metric = (key[0], key[-1]) if len(key) > 1 else (key[0], key[0])
    lower = _direction(lower_is_better, task, metric)
    col = np.array([flat[meth][key] for meth in methods])
    ranks[:, j] = _rankdata(col if lower else -col)
  return {meth: float(r) for meth, r in zip(methods, ranks.mean(axis=1))}


def spearman(x: Union[Sequence[float], np.ndarray],
             y: Union[Sequence[float], np.ndarray]) -> float:
  """Spearman's rank correlation of two paired samples (ties averaged).

  The Pearson correlation of the ranks; NaN if either sample is constant.
  """
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.shape != y.shape or x.ndim != 1 or x.size < 2:
    raise ValueError(f"spearman: need two 1-D samples of the same size >= 2, got "
                     f"{x.shape} and {y.shape}.")
  rx, ry = _rankdata(x), _rankdata(y)
  rx -= rx.mean()
  ry -= ry.mean()
  den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return float((rx * ry).sum() / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------
# Interference.
# ---------------------------------------------------------------------------

def interference_from_gram(gram: Array) -> Array:
  """Mean cosine between each task gradient and the average gradient, from G = JJᵀ.

      I = (1/m) Σ_i cos(g_i, ḡ),  ḡ = (1/m) Σ_j g_j,
      cos(g_i, ḡ) = (G1)_i / (‖g_i‖ · √(1ᵀG1)).

  A zero gradient contributes a cosine of 0.

  Args:
    gram: ``(m, m)`` Gram matrix of the task gradients (any common positive
      scale: the cosines are scale-invariant).

  Returns:
    Scalar in [−1, 1] (1: all task gradients point the same way).
  """
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(f"interference_from_gram: gram must be (m, m), got {gram.shape}.")
  gram = gram.astype(linalg.accumulation_dtype(gram.dtype))
  # Normalise by the largest diagonal entry so huge or tiny gradients stay finite.
  top = jnp.max(jnp.abs(jnp.diagonal(gram)))
  gram = linalg.safe_div(gram, top)
  g1 = jnp.sum(gram, axis=1)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  mean_norm = jnp.sqrt(jnp.maximum(jnp.sum(g1), 0.0))
  cos = linalg.safe_div(g1, norms * mean_norm)
  return jnp.mean(jnp.clip(cos, -1.0, 1.0))


def interference(grads, task_specific: base.TaskSpecific = None) -> Array:
  """Gama & Grassi's interference measure on stacked per-task gradients.

      I = (1/m) Σ_i cos(g_i, ḡ),  ḡ = (1/m) Σ_j g_j,

  over the *shared* parameters (leaves marked by ``task_specific`` are left
  out: a head's gradient only exists for its own task). I = 1 when every task
  gradient points along the average; lower values mean more conflict.

  Args:
    grads: stacked per-task gradients (every leaf has a leading task axis of
      size m), e.g. from ``mo.task_grads``.
    task_specific: None (all leaves shared), a boolean mask pytree with the
      structure of the parameters, or ``callable(path, leaf) -> bool``
      (see ``mo.cagrad``).

  Returns:
    Scalar (jittable).
  """
  base.num_tasks_of(grads, "interference")
  heads = base.resolve_task_specific(task_specific, grads)
  leaves = jax.tree_util.tree_leaves(grads)
  shared = [leaf for leaf, h in zip(leaves, heads) if not h]
  if not shared:
    raise ValueError("interference: every leaf is marked task-specific.")
  row_scales = linalg.power_of_two_scale(linalg.rows_max_abs(shared))
  row_gram = linalg.gram_matrix(shared, row_scales[:, None])
  gram = linalg.scaled_gram(row_gram, jnp.log2(row_scales).astype(row_gram.dtype))
  return interference_from_gram(gram)


# ---------------------------------------------------------------------------
# Fixed weights from a run.
# ---------------------------------------------------------------------------

def fixed_weights(weight_history, beta: float = 0.9, *, normalize: bool = False) -> np.ndarray:
  """Fixed task weights from a run: EMA of its per-epoch mean weights.

      w̄_e = mean of the weights over the steps of epoch e,
      v_1 = w̄_1,  v_e = β v_{e−1} + (1 − β) w̄_e,  result v_E.

  (Gama & Grassi 2025, §5: the fixed weights that nearly match an SMTO's
  result.) The EMA starts at the first epoch's mean (no zero initialisation,
  hence no bias correction is needed).

  Args:
    weight_history: ``(E, m)`` per-epoch mean weights, ``(E, S, m)`` per-step
      weights grouped by epoch (averaged over S first), or a list of E arrays
      ``(S_e, m)`` (epochs of different lengths).
    beta: EMA decay in [0, 1) (0.9).
    normalize: rescale the result to sum to 1.

  Returns:
    ``(m,)`` NumPy array of weights.
  """
  if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
    raise ValueError(f"fixed_weights: beta must be in [0, 1), got {beta!r}.")
  if (isinstance(weight_history, (list, tuple)) and weight_history
      and np.ndim(weight_history[0]) == 2):
    per_epoch = np.stack([np.asarray(w, np.float64).mean(axis=0) for w in weight_history])
  else:
    arr = np.asarray(weight_history, dtype=np.float64)
    if arr.ndim == 3:
      per_epoch = arr.mean(axis=1)
    elif arr.ndim == 2:
      per_epoch = arr
    else:
      raise ValueError("fixed_weights: weight_history must be (E, m), (E, S, m) or a list of "
                       f"(S_e, m) arrays; got shape {arr.shape}.")
  if per_epoch.shape[0] == 0:
    raise ValueError("fixed_weights: empty weight history.")
  if not np.all(np.isfinite(per_epoch)):
    raise ValueError("fixed_weights: the weight history has non-finite entries.")
  v = per_epoch[0]
  for w in per_epoch[1:]:
    v = beta * v + (1.0 - beta) * w
  if normalize:
    total = v.sum()
    if total == 0:
      raise ValueError("fixed_weights: cannot normalise weights that sum to 0.")
    v = v / total
  return v
