"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base
from mtl_optax._src import linalg


def graddrop_leaf(leaf: jax.Array, uniform: jax.Array, leak,
                  purity_fn: Optional[Callable] = None, batch_axis: Optional[int] = None,
                  signs: Optional[jax.Array] = None) -> jax.Array:
  """GradDrop on one stacked leaf ``(m, ...)``; returns the combined ``(...)`` gradient.

  Args:
    leaf: stacked per-task gradients of one leaf.
    uniform: U(0, 1) draws, shaped like the purity P (the leaf without the task
      axis, and without ``batch_axis`` when marginalising).
    leak: (m,) leak per task.
    purity_fn: optional monotone map applied to P.
    batch_axis: axis of the leaf *without* the task axis that is a batch
      axis: P is computed from the gradients summed over it (the paper's
      marginalisation for activations) and the mask is shared along it.
    signs: optional signs (±1) of the layer inputs, shaped like one task's
      leaf, multiplied into the gradients before summing over ``batch_axis``.
  """
  m = leaf.shape[0]
  acc = jnp.promote_types(leaf.dtype, linalg.accumulation_dtype(leaf.dtype))
  g = leaf.astype(acc)
  stat = g
  if batch_axis is not None:
    if signs is not None:
      stat = stat * signs.astype(acc)[None]
    stat = jnp.sum(stat, axis=batch_axis + 1, keepdims=True)
  total = jnp.sum(stat, axis=0)
  mass = jnp.sum(jnp.abs(stat), axis=0)
  purity = 0.5 * (1.0 + linalg.safe_div(total, mass))
  if purity_fn is not None:
    purity = purity_fn(purity)
  u = uniform.astype(acc)
  if batch_axis is not None:
    u = jnp.expand_dims(u, batch_axis)
  keep_pos = purity > u
  keep_neg = purity < u
  mask = (keep_pos[None] & (stat > 0)) | (keep_neg[None] & (stat < 0))
  lk = jnp.asarray(leak, acc).reshape((m,) + (1,) * (leaf.ndim - 1))
  factor = lk + (1.0 - lk) * mask.astype(acc)
  return jnp.sum(factor * g, axis=0).astype(leaf.dtype)


def graddrop(leak: Union[float, Sequence[float]] = 0.0, *, purity_fn: Optional[Callable] = None,
             batch_axis: Optional[int] = None, seed: int = 0, task_specific=None,
             weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
             nonfinite: str = "skip"):
  """GradDrop: keep, coordinate-wise, only the gradients of one randomly chosen sign.

  For each coordinate, the positive sign purity

      P = ½ (1 + Σ_i g_i / Σ_i |g_i|) ∈ [0, 1]

  (with an optional monotone ``purity_fn`` applied) is compared to a fresh
  U ~ U(0, 1): if P > U the positive entries g_i > 0 are kept, if P < U the
  negative ones; the others are dropped. With leak ℓ_i,

      d = Σ_i (ℓ_i + (1 − ℓ_i) M_i) ⊙ g_i.

  The paper applies GradDrop to the gradients of a shared activation layer
  and marginalises over the batch: with ``batch_axis`` set (the batch axis of
  each leaf, *not counting* the task axis) P is computed from the gradients
  summed over that axis — multiplied by the signs of the layer's inputs when
  ``update(..., inputs=x)`` passes them (a pytree like the shared leaves of
  one task's gradient, or a single array for a single shared leaf) — and
  the mask is shared across the batch. By default (``batch_axis=None``) the
  rule is applied elementwise to whatever stacked gradients it receives
  (parameter gradients, or representation gradients via
  ``mo.representation_update``), as TorchJD's and LibMTL's GradDrop do. No
  output renormalisation (the lingvo/Gama & Grassi code rescales d to
  ‖Σ g_i‖; not in the paper). U is drawn from the PRNG key in the state.

  Args:
    leak: ℓ, a float in [0, 1] or one per task (default 0: pure GradDrop).
    purity_fn: optional monotone function applied to P (TorchJD's ``f``;
      ``lambda p: k * (p - 0.5) + 0.5`` gives the lingvo ``k`` variant).
    batch_axis: see above (default None).
    seed: seed of the PRNG key kept in the state.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Reference:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020.
  """
  leak_arr = np.asarray(leak, dtype=np.float64)
  if leak_arr.ndim > 1 or not np.all((leak_arr >= 0) & (leak_arr <= 1)):
    raise ValueError(
        f"graddrop: leak must be a float or a sequence of floats in [0, 1], got {leak!r}.")
  if batch_axis is not None and (not isinstance(batch_axis, int) or batch_axis < 0):
    raise ValueError(
        f"graddrop: batch_axis must be a non-negative int or None, got {batch_axis!r}.")
  if purity_fn is not None and not callable(purity_fn):
    raise ValueError(f"graddrop: purity_fn must be callable, got {purity_fn!r}.")
  info = base.AggregatorInfo(name="graddrop", weighted=False, stochastic=True,
                             representation="variant", scale_degree=1)

  def rule(view, key):
    m = view.num_tasks
    if leak_arr.ndim == 1 and leak_arr.shape[0] != m:
      raise ValueError(f"graddrop: {leak_arr.shape[0]} leak values given but m={m} tasks.")
    leak_m = np.broadcast_to(leak_arr, (m,))
    inputs = view.extra.get("inputs")
    signs = [None] * len(view.shared)
    if inputs is not None:
      if batch_axis is None:
        raise ValueError("graddrop: inputs= is only used with batch_axis set.")
      leaves = jax.tree_util.tree_leaves(inputs)
      if len(leaves) != len(view.shared) or any(
          jnp.shape(x) != s.shape[1:] for x, s in zip(leaves, view.shared)):
        raise ValueError(
            "graddrop: inputs= must hold one array per shared leaf, shaped like one task's "
            f"gradient; got shapes {[jnp.shape(x) for x in leaves]} for gradients "
            f"{[s.shape[1:] for s in view.shared]}.")
      signs = [jnp.sign(x) for x in leaves]
    key, sub = jax.random.split(key)
    update = []
    for idx, (leaf, sg) in enumerate(zip(view.shared, signs)):
      if batch_axis is not None and batch_axis >= leaf.ndim - 1:
        raise ValueError(
            f"graddrop: batch_axis={batch_axis} but a shared leaf has shape {leaf.shape[1:]} "
            "(without the task axis).")
      shape = list(leaf.shape[1:])
      if batch_axis is not None:
        del shape[batch_axis]
      u = jax.random.uniform(jax.random.fold_in(sub, idx), tuple(shape),
                             dtype=linalg.accumulation_dtype(leaf.dtype))
      update.append(graddrop_leaf(leaf, u, leak_m, purity_fn, batch_axis, sg))
    return base.RuleOutput(state=key, shared_update=update)

  return base.make_aggregator(rule, info, init_inner=lambda params, m: jax.random.PRNGKey(seed),
                              task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
