"""GradVac: gradient vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods import moco as moco_lib
from mtl_optax._src.methods._common import require_num_tasks

GROUPS = ("whole_model", "leaf")
Group = Union[str, Callable[[tuple, jax.ShapeDtypeStruct], object]]


class GradVacState(NamedTuple):
  """GradVac's inner state: EMA cosine targets φ̂ (groups, m, m) and the PRNG key."""
  targets: jax.Array
  key: jax.Array


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@functools.partial(jax.jit, static_argnames=("beta",))
def gradvac_coefficients(gram: jax.Array, targets: jax.Array, orders: jax.Array,
                         beta: float):
  """One GradVac pass over the tasks in Gram form.

  Writing the corrected gradients ĝ_i = Σ_k C_ik g_k, every quantity the
  algorithm needs is a product with the Gram matrix G: ĝ_i·g_j = (C G)_ij and
  ‖ĝ_i‖² = (C G Cᵀ)_ii. For each task i and each j ≠ i in the order
  ``orders[i]``:

      φ_ij = cos(ĝ_i, g_j);
      if φ_ij < φ̂_ij:  ĝ_i += ‖ĝ_i‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²))
                              / (‖g_j‖ √(1−φ̂_ij²)) · g_j
      φ̂_ij ← (1 − β) φ̂_ij + β φ_ij.

  The correction makes cos(ĝ_i, g_j) equal to the target. Zero gradients
  (and the degenerate target |φ̂| = 1, which no finite correction reaches)
  leave ĝ_i unchanged.

  Args:
    gram: (m, m) Gram matrix (any common positive scaling).
    targets: (m, m) EMA targets φ̂.
    orders: (m, m) int; row i is a permutation of the tasks.
    beta: EMA coefficient.

  Returns:
    ``(C, new_targets)``: the (m, m) coefficients (row i = ĝ_i in the basis of
    the g_k) and the updated targets.
  """
  m = gram.shape[0]
  dtype = gram.dtype
  diag = jnp.maximum(jnp.diagonal(gram), 0.0)
  g_norms = jnp.sqrt(diag)

  def one_task(i, order, target_row):
    def step(k, carry):
      c, row = carry
      j = order[k]
      dot = gram[j] @ c
      norm_i = jnp.sqrt(jnp.maximum(c @ gram @ c, 0.0))
      phi = jnp.clip(linalg.safe_div(dot, norm_i * g_norms[j]), -1.0, 1.0)
      phi_hat = jnp.clip(row[j], -1.0, 1.0)
      root_hat = jnp.sqrt(jnp.maximum(1.0 - phi_hat * phi_hat, 0.0))
      num = norm_i * (phi_hat * jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0)) - phi * root_hat)
      coef = linalg.safe_div(num, g_norms[j] * root_hat)
      active = (j != i) & (phi < phi_hat)
      c = jnp.where(active, c.at[j].add(coef), c)
      row = jnp.where(j != i, row.at[j].set((1.0 - beta) * row[j] + beta * phi), row)
      return c, row
    return jax.lax.fori_loop(0, m, step, (jax.nn.one_hot(i, m, dtype=dtype), target_row))

  return jax.vmap(one_task)(jnp.arange(m), orders, targets.astype(dtype))


def _group_ids(group: Group, stacked_shared_paths: list) -> tuple[list[int], int]:
  """Group index of every shared leaf, and the number of groups."""
  if group == "whole_model":
    return [0] * len(stacked_shared_paths), 1
  if group == "leaf":
    return list(range(len(stacked_shared_paths))), len(stacked_shared_paths)
  labels = [group(path, spec)  # type: ignore[operator]  # the strings are handled above
            for path, spec in stacked_shared_paths]
  uniq = []
  for lab in labels:
    if lab not in uniq:
      uniq.append(lab)
  return [uniq.index(lab) for lab in labels], len(uniq)


def _stack_specs(params):
  """Shape structs of stacked gradients for ``params`` (a task axis of size 1)."""
  return jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct((1,) + jnp.shape(p), jnp.result_type(p)), params)


def _shared_paths_specs(stacked, task_specific, params=None):
  """(path, spec without the task axis) of every shared leaf of a stacked pytree."""
  mask = base.resolve_task_specific(task_specific, stacked, params)
  out = []
  for (path, leaf), head in zip(jax.tree_util.tree_flatten_with_path(stacked)[0], mask):
    if not head:
      out.append((path, jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)))
  return out


def gradvac(beta: float = 0.5, group: Group = "whole_model", *, seed: int = 0,
            task_specific=None, weight_heads: Optional[bool] = None,
            num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Gradient Vaccine: PCGrad-like corrections towards EMA cosine targets.

  PCGrad only acts on conflicting pairs (cos < 0) and projects to cos = 0;
  GradVac keeps, for every ordered pair (i, j), an exponential moving average
  φ̂_ij of the observed cosine similarity and corrects ĝ_i whenever its cosine
  with g_j falls below that target, to exactly the target (see
  :func:`gradvac_coefficients`). d = Σ_i ĝ_i. With φ̂ = 0 (the initial state)
  a step equals PCGrad. The order in which each task visits the others is
  drawn from the PRNG key in the state (as PCGrad, LibMTL and TorchJD do).

  Everything is computed from the Gram matrix (TorchJD's ``GradVacWeighting``
  form); with ``group="whole_model"`` the update is d = Jᵀw with w exposed.
  Per-group targets (LibMTL's ``GradVac_group_type``): ``group="leaf"`` runs
  the algorithm separately on every shared leaf (LibMTL's "all_matrix"), and
  a callable ``group(path, leaf) -> label`` groups leaves by label (e.g. by
  layer: ``lambda path, leaf: path[0]``, LibMTL's "all_layer"); per-group
  weights are then in ``diagnostics["group_weights"]``. Norms and cosines are
  exact (no 1e-8 added to denominators, unlike LibMTL).

  Args:
    beta: EMA coefficient of the targets (default 0.5, as LibMTL and TorchJD).
    group: "whole_model" (default), "leaf" or ``callable(path, leaf) -> label``
      (called with the path and a ``ShapeDtypeStruct`` of each shared leaf).
    seed: seed of the PRNG key kept in the state.
    task_specific, weight_heads, nonfinite: see :func:`mtl_optax.make_aggregator`
      (heads get their own, unweighted task gradient).
    num_tasks: m, required (the targets have shape (groups, m, m)).

  Reference:
    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models",
    ICLR 2021.
  """
  base.check_positive("gradvac", beta=beta)
  if beta > 1:
    raise ValueError(f"gradvac: beta must be in (0, 1], got {beta!r}.")
  if not (group in GROUPS or callable(group)):
    raise ValueError(f"gradvac: group must be one of {GROUPS} or a callable, got {group!r}.")
  m_init = require_num_tasks("gradvac", num_tasks)
  info = base.AggregatorInfo(name="gradvac", stochastic=True,
                             weighted=group == "whole_model", scale_degree=1)

  def init_inner(params, m):
    moco_lib.shared_param_leaves(params, task_specific, "gradvac")  # validates the partition
    _, n_groups = _group_ids(group, _shared_paths_specs(_stack_specs(params), task_specific,
                                                         params))
    dtype = linalg.accumulation_dtype(jnp.result_type(jax.tree_util.tree_leaves(params)[0]))
    return GradVacState(targets=jnp.zeros((n_groups, m_init, m_init), dtype),
                        key=jax.random.PRNGKey(seed))

  def rule(view, state):
    m = view.num_tasks
    key, sub = jax.random.split(state.key)
    orders = jax.vmap(lambda k: jax.random.permutation(k, m))(jax.random.split(sub, m))
    targets = state.targets
    if group == "whole_model":
      coef, new_t = gradvac_coefficients(view.gram, targets[0], orders, beta)
      new_state = GradVacState(targets=new_t[None].astype(targets.dtype), key=key)
      return base.RuleOutput(state=new_state, weights=jnp.sum(coef, axis=0))
    # Per-group Gram matrices (each group with its own power-of-two scale).
    if group == "leaf":
      ids, n_groups = list(range(len(view.shared))), len(view.shared)
    else:
      if view.params is None:
        raise ValueError("gradvac: a callable group needs the parameters: "
                         "call update(grads, state, params).")
      ids, n_groups = _group_ids(group, _shared_paths_specs(
          _stack_specs(view.params), task_specific, view.params))
    if n_groups != targets.shape[0]:
      raise ValueError(
          f"gradvac: the state was built for {targets.shape[0]} groups but the gradients "
          f"have {n_groups} (the parameters changed since init?).")
    weights, new_targets = [], []
    for gidx in range(n_groups):
      leaves = [leaf for leaf, g in zip(view.shared, ids) if g == gidx]
      scale = linalg.power_of_two_scale(jnp.max(linalg.rows_max_abs(leaves)))
      gram = linalg.gram_matrix(leaves, scale)
      coef, new_t = gradvac_coefficients(gram, targets[gidx], orders, beta)
      weights.append(jnp.sum(coef, axis=0))
      new_targets.append(new_t.astype(targets.dtype))
    update = [linalg.combine(weights[g], leaf) for leaf, g in zip(view.shared, ids)]
    new_state = GradVacState(targets=jnp.stack(new_targets), key=key)
    return base.RuleOutput(state=new_state, shared_update=update,
                           diagnostics={"group_weights": jnp.stack(weights)})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)
