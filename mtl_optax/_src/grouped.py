"""Grouped aggregation: one aggregator, applied independently to groups of parameters.

GradVac (Wang et al., ICLR 2021) showed that gradient conflicts differ between
layers and aggregates per parameter group ("whole model", "encoder/decoder",
"all layers", "all matrices"); TorchJD's grouping example does the same with a
dedicated aggregator per group. :func:`grouped` wraps any mtl_optax aggregator
that way: each group's per-task gradients are aggregated on their own, with
their own Gram matrix, weights and (independent) inner state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import jacobian as jacobian_lib
from mtl_optax._src import linalg

GROUPINGS = ("leaf", "layer", "top_level")
Groups = Union[str, Callable[[tuple, jax.ShapeDtypeStruct], Any]]


class GroupedState(NamedTuple):
  """State of :func:`grouped`: the inner aggregator's state of each group, in group order.

  ``mo.diagnostics`` / ``mo.task_weights`` read group 0's; all groups' are
  returned by :func:`group_diagnostics`.
  """
  groups: tuple


def _label(groups: Groups, path, spec):
  if groups == "leaf":
    return jax.tree_util.keystr(path)
  if groups == "layer":  # the leaf's parent: e.g. {"Dense_0": {"kernel", "bias"}} -> "Dense_0"
    return jax.tree_util.keystr(path[:-1])
  if groups == "top_level":
    return jax.tree_util.keystr(path[:1])
  return groups(path, spec)  # type: ignore[operator]


def _group_ids(groups: Groups, stacked, heads):
  """Group index of every leaf (None for heads) and the number of groups.

  Groups are numbered in order of first appearance (pytree flattening order).
  """
  labels: list = []
  ids: list = []
  for (path, leaf), head in zip(jax.tree_util.tree_flatten_with_path(stacked)[0], heads):
    if head:
      ids.append(None)
      continue
    lab = _label(groups, path, jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype))
    try:
      idx = labels.index(lab)
    except ValueError:
      labels.append(lab)
      idx = len(labels) - 1
    ids.append(idx)
  return ids, labels


def grouped(aggregator, groups: Groups = "layer", *, task_specific=None):
  """Applies ``aggregator`` independently to each group of shared parameters.

  For each group k of shared leaves, with J_k the per-task gradients of that
  group only, the group's update is A(J_k) (its own Gram matrix, weights and
  inner state); the shared update is their concatenation. One group is the
  aggregator itself; one group per leaf is GradVac's "all matrices" mode.

  Groups: ``"layer"`` (default; leaves with the same parent, e.g. a Flax
  layer's kernel and bias), ``"top_level"`` (the first key of the path: per
  network block, e.g. encoder / decoder), ``"leaf"`` (every tensor alone) or
  ``callable(path, leaf) -> label`` (any hashable label; called with each
  leaf's key path and a ``ShapeDtypeStruct`` of the parameter). Groups are
  ordered by first appearance in the pytree's flattening order.

  Partition. The wrapper owns the shared / task-specific partition
  (``task_specific=``), like :func:`mtl_optax.flat`: the aggregator only sees
  a group's shared leaves (every other leaf replaced by ``None``, key paths
  unchanged), so build it without ``task_specific``. Each head leaf gets
  Σ_i g_i (its own task's gradient); for aggregators that weight heads (loss
  weightings, ``AggregatorInfo.weight_heads``) Σ_i w̄_i g_i with w̄ the mean
  over groups of the groups' weights (for loss weightings all groups have the
  same weights, so this is the weighted loss's gradient).

  Non-finite values: if any task gradient or loss is NaN/inf the whole step
  is skipped (zero update, no group's inner state advanced), so the groups
  never drift apart; ``nonfinite_tasks`` of each group's diagnostics counts
  the affected tasks.

  State: :class:`GroupedState`, a tuple of the aggregator's states, one per
  group, with a structure fixed at ``init`` (build the aggregator with
  ``num_tasks`` to fix its diagnostics too). ``mo.diagnostics(state)`` gives
  group 0's diagnostics, :func:`mtl_optax.group_diagnostics` all of them.

  Args:
    aggregator: any mtl_optax aggregator.
    groups: "layer" (default), "top_level", "leaf" or a labelling callable.
    task_specific: None, a boolean mask pytree or ``callable(path, leaf)``
      marking head leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes the
    stacked gradients (not a ``FactoredJacobian``), ``params`` and the
    aggregator's keyword arguments (``losses=``, ...).

  References:
    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine", ICLR 2021 (per-group
    aggregation); TorchJD's "Grouping" example.
  """
  inner_info = base.aggregator_info(aggregator)
  if not (groups in GROUPINGS or callable(groups)):
    raise ValueError(f"grouped: groups must be one of {GROUPINGS} or a callable, got {groups!r}.")
  name = f"grouped_{inner_info.name}"
  info = dataclasses.replace(inner_info, name=name, weighted=False)

  def partition(stacked, params):
    heads = base.resolve_task_specific(task_specific, stacked, params)
    if heads and all(heads):
      raise ValueError(f"{name}: every leaf is marked task-specific; nothing to aggregate.")
    ids, labels = _group_ids(groups, stacked, heads)
    return heads, ids, labels

  def sub(treedef, leaves, ids, k):
    return jax.tree_util.tree_unflatten(treedef,
                                        [l if g == k else None for l, g in zip(leaves, ids)])

  def init_fn(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    stacked = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct((1,) + jnp.shape(p), jnp.result_type(p)), params)
    _, ids, labels = partition(stacked, params)
    return GroupedState(groups=tuple(aggregator.init(sub(treedef, leaves, ids, k))
                                     for k in range(len(labels))))

  def update_fn(updates, state, params=None, **extra):
    if not isinstance(state, GroupedState):
      raise TypeError(f"{name}: state must come from this transformation's init.")
    if isinstance(updates, jacobian_lib.FactoredJacobian):
      raise TypeError(f"{name}: grouped aggregation needs the stacked per-task gradients, "
                      "not a FactoredJacobian.")
    m = base.num_tasks_of(updates, name)
    losses = base.check_losses(extra.pop("losses", None), m, name, inner_info.needs_losses)
    heads, ids, labels = partition(updates, params)
    if len(labels) != len(state.groups):
      raise ValueError(
          f"{name}: the state was built for {len(state.groups)} groups but the gradients have "
          f"{len(labels)} (the parameters changed since init?).")
    leaves, treedef = jax.tree_util.tree_flatten(updates)

    finite = jacobian_lib.rows_finite(leaves, m)
    if losses is not None:
      finite = finite & jnp.isfinite(losses)
    n_bad = jnp.sum(~finite).astype(jnp.int32)
    bad = n_bad > 0
    leaves = [jacobian_lib.zero_rows(l, finite) for l in leaves]
    kwargs = dict(extra)
    if losses is not None:
      kwargs["losses"] = jnp.where(finite, losses, jnp.ones((), losses.dtype))
    p_leaves = treedef.flatten_up_to(params) if params is not None else None

    out = [None] * len(leaves)
    new_states, group_w = [], []
    for k, old in enumerate(state.groups):
      p_sub = sub(treedef, p_leaves, ids, k) if p_leaves is not None else None
      upd, new = aggregator.update(sub(treedef, leaves, ids, k), old, p_sub, **kwargs)
      for i, u in enumerate(treedef.flatten_up_to(upd)):
        if ids[i] == k:
          out[i] = u
      if isinstance(new, base.AggregatorState):
        inner = jax.tree_util.tree_map(lambda n, o: jnp.where(bad, o, n), new.inner, old.inner)
        diag = dict(new.diagnostics)
        if "nonfinite_tasks" in diag:
          diag["nonfinite_tasks"] = n_bad
        new = new._replace(inner=inner, diagnostics=diag)
        group_w.append(new.diagnostics.get("weights"))
      new_states.append(new)

    head_w = None
    if inner_info.weight_heads and group_w and all(w is not None for w in group_w):
      head_w = jnp.mean(jnp.stack(group_w), axis=0)
    if head_w is None:
      head_w = jnp.ones((m,), linalg.accumulation_dtype(leaves[0].dtype))
    for i, h in enumerate(heads):
      if h:
        out[i] = linalg.combine(head_w, leaves[i])
    out = [jnp.where(bad | ~jnp.isfinite(u), jnp.zeros((), u.dtype), u.astype(l.dtype))
           for u, l in zip(out, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out), GroupedState(groups=tuple(new_states))

  update_fn.mtl_info = info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def group_diagnostics(state) -> list:
  """The diagnostics dict of every group of the (first) :func:`grouped` state in ``state``."""
  found = [s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, GroupedState)) if isinstance(s, GroupedState)]
  if not found:
    raise ValueError("No grouped aggregator state found in the given optimizer state.")
  return [base.diagnostics(g) for g in found[0].groups]
