"""The two forms of one step's per-task gradients that aggregators accept.

* a stacked pytree (``mtl_optax.task_grads``): every leaf ``(m, *shape)``;
* a :class:`FactoredJacobian` (``mtl_optax.factored_task_grads``): leaves of
  matrix-product parameters kept as factors ``g_i = Aᵀ Δ_i``.

Both are wrapped in the same small interface (leaf, gram, combine,
task_finite, where_finite) so that ``make_aggregator`` is written once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import linalg

PyTree = Any
Array = jax.Array


class Site(NamedTuple):
  """A factored matrix product ``y = dot_general(..., W, ...)`` (static facts)."""
  leaf: int            # index of W among the flattened parameters
  w_side: int          # 0: W is the left operand; 1: the right one
  w_contract: tuple    # W's contracting dimensions (paired with a_contract)
  a_contract: tuple
  w_free: tuple        # W's other dimensions, in order
  a_free: tuple        # the activation's other (sample) dimensions, in order
  w_shape: tuple


@jax.tree_util.register_pytree_node_class
class StackedJacobian:
  """The interface of :class:`FactoredJacobian` over a stacked gradient pytree."""

  def __init__(self, grads: PyTree):
    self.stacked, self.treedef = jax.tree_util.tree_flatten(grads)
    self.shapes = grads

  def tree_flatten(self):
    return (self.stacked,), self.treedef

  @classmethod
  def tree_unflatten(cls, treedef, children):
    return cls(jax.tree_util.tree_unflatten(treedef, children[0]))

  def leaf(self, l: int) -> Array:
    return self.stacked[l]

  def leaves(self) -> list:
    return list(self.stacked)

  def gram(self, indices) -> Array:
    return linalg.gram_matrix([self.stacked[l] for l in indices])

  def combine(self, weights: Array, l: int) -> Array:
    return linalg.combine(weights, self.stacked[l])

  def task_finite(self, indices) -> Array:
    m = self.stacked[0].shape[0] if self.stacked else 0
    return rows_finite([self.stacked[l] for l in indices], m)

  def where_finite(self, finite: Array) -> "StackedJacobian":
    return StackedJacobian(jax.tree_util.tree_unflatten(
        self.treedef, [zero_rows(x, finite) for x in self.stacked]))


def rows_finite(arrays, m: int) -> Array:
  """Per task: are all entries of the ``(m, ...)`` arrays finite?"""
  ok = jnp.ones((m,), bool)
  for x in arrays:
    if x.size:
      # x·0 is NaN exactly for non-finite x; a sum reduction compiles ~15× faster on
      # XLA:CPU than all(isfinite(...)) over a large leaf.
      ok = ok & jnp.isfinite(jnp.sum(x.reshape(m, -1) * jnp.zeros((), x.dtype), axis=1))
  return ok


def zero_rows(x, finite: Array):
  """``x`` (task axis first) with the rows of non-finite tasks set to 0 (None stays None)."""
  if x is None:
    return None
  return jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


@jax.tree_util.register_pytree_node_class
class FactoredJacobian:
  """Stacked per-task gradients, with dense-layer blocks kept as factors.

  Returned by :func:`mtl_optax.factored_task_grads` and accepted by every
  aggregator's ``update`` in place of the stacked gradient pytree. Leaf ``l``
  is either stacked (``(m, *shape)``, as from :func:`mtl_optax.task_grads`) or
  factored: ``g_i = Aᵀ Δ_i`` (reshaped to the parameter's layout).

  Attributes:
    num_tasks: m.
    shapes: the stacked pytree's structure, ``jax.ShapeDtypeStruct((m, *shape))``
      leaves (what aggregators use to resolve ``task_specific=``).
  """

  def __init__(self, treedef, sites: tuple, stacked: list, acts: list, deltas: list,
               mixed: list):
    # sites[l] is None for a stacked leaf, else the Site; stacked[l] (m, *shape),
    # acts[l] = A (N, K), deltas[l] = Δ (m, N, D) and mixed[l] = (A Aᵀ) Δ (m, N, D)
    # hold the arrays (None where not applicable).
    self.treedef = treedef
    self.sites = sites
    self.stacked = stacked
    self.acts = acts
    self.deltas = deltas
    self.mixed = mixed

  def tree_flatten(self):
    return (self.stacked, self.acts, self.deltas, self.mixed), (self.treedef, self.sites)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(aux[0], aux[1], *children)

  @property
  def num_tasks(self) -> int:
    for s, d in zip(self.stacked, self.deltas):
      if s is not None:
        return int(s.shape[0])
      if d is not None:
        return int(d.shape[0])
    raise ValueError("FactoredJacobian has no leaves.")

  @property
  def num_leaves(self) -> int:
    return len(self.sites)

  def is_factored(self, l: int) -> bool:
    return self.sites[l] is not None

  @property
  def shapes(self) -> PyTree:
    m = self.num_tasks
    specs = []
    for l, site in enumerate(self.sites):
      if site is None:
        specs.append(jax.ShapeDtypeStruct(self.stacked[l].shape, self.stacked[l].dtype))
      else:
        specs.append(jax.ShapeDtypeStruct((m,) + site.w_shape, self.deltas[l].dtype))
    return jax.tree_util.tree_unflatten(self.treedef, specs)

  def _to_param_layout(self, l: int, mat: Array, lead: tuple = ()) -> Array:
    """(…, K, D) in (contract, free) order → the parameter's axis order."""
    site = self.sites[l]
    order = site.w_contract + site.w_free
    x = mat.reshape(lead + tuple(site.w_shape[d] for d in order))
    inverse = tuple(int(i) for i in np.argsort(order))
    return jnp.transpose(x, tuple(range(len(lead))) + tuple(len(lead) + i for i in inverse))

  def leaf(self, l: int) -> Array:
    """Leaf ``l`` as a stacked ``(m, *shape)`` array (materialises a factored block)."""
    if self.sites[l] is None:
      return self.stacked[l]
    a, delta = self.acts[l], self.deltas[l]
    return self._to_param_layout(l, jnp.einsum("nk,ind->ikd", a, delta), (delta.shape[0],))

  def leaves(self) -> list:
    return [self.leaf(l) for l in range(self.num_leaves)]

  def gram(self, indices) -> Array:
    """Gram matrix JJᵀ of the rows restricted to the leaves ``indices``."""
    stacked = [self.stacked[l] for l in indices if self.sites[l] is None]
    g = linalg.gram_matrix(stacked) if stacked else None
    for l in indices:
      if self.sites[l] is None:
        continue
      delta = self.deltas[l]
      m = delta.shape[0]
      # ⟨Δ_i, (A Aᵀ) Δ_j⟩: one (m × N·D)·(N·D × m) product, both stacks task-major,
      # accumulated like linalg.gram_matrix (float32 or better, also for bfloat16).
      block = jax.lax.dot_general(
          delta.reshape(m, -1), self.mixed[l].reshape(m, -1), (((1,), (1,)), ((), ())),
          precision=jax.lax.Precision.HIGHEST,
          preferred_element_type=linalg.accumulation_dtype(delta.dtype))
      block = 0.5 * (block + block.T)
      g = block if g is None else g + block.astype(g.dtype)
    return g  # type: ignore[return-value]  # callers pass at least one leaf

  def combine(self, weights: Array, l: int) -> Array:
    """Σ_i w_i g_i for leaf ``l`` (no task axis)."""
    if self.sites[l] is None:
      return linalg.combine(weights, self.stacked[l])
    a, delta = self.acts[l], self.deltas[l]
    acc = linalg.accumulation_dtype(delta.dtype)
    mixed = jax.lax.dot_general(weights.astype(acc), delta, (((0,), (0,)), ((), ())),
                                preferred_element_type=acc)                 # (N, D)
    out = jax.lax.dot_general(a, mixed.astype(a.dtype), (((0,), (0,)), ((), ())),
                              preferred_element_type=acc)                   # Aᵀ (Σ w Δ)
    return self._to_param_layout(l, out.astype(delta.dtype))

  def task_finite(self, indices) -> Array:
    """Per task: are all of its gradient entries in ``indices`` finite?

    For a factored leaf this checks A and Δ_i; a product Aᵀ Δ_i of finite
    factors that overflows is caught by the Gram matrix's diagonal (shared
    leaves) or by the aggregator's final finiteness filter (heads).
    """
    m = self.num_tasks
    ok = rows_finite([self.stacked[l] if self.sites[l] is None else self.deltas[l]
                      for l in indices], m)
    acts = [self.acts[l][None] for l in indices if self.sites[l] is not None]
    return ok & rows_finite(acts, 1)[0] if acts else ok

  def where_finite(self, finite: Array) -> "FactoredJacobian":
    """The same Jacobian with the rows of non-finite tasks set to zero."""
    # A non-finite activation makes every task non-finite; zeroing it keeps 0·A = 0.
    acts = [None if a is None else jnp.where(jnp.isfinite(a), a, jnp.zeros((), a.dtype))
            for a in self.acts]
    return FactoredJacobian(self.treedef, self.sites,
                            [zero_rows(s, finite) for s in self.stacked], acts,
                            [zero_rows(d, finite) for d in self.deltas],
                            [zero_rows(k, finite) for k in self.mixed])
