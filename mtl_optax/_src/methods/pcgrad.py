"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@jax.jit
def pcgrad_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
  """PCGrad in Gram form: the weights w with d = Jᵀw.

  For each task i, ĝ_i starts at g_i and, for j ≠ i in a random order, if
  ĝ_i·g_j < 0 then ĝ_i ← ĝ_i − (ĝ_i·g_j / ‖g_j‖²) g_j. Writing ĝ_i = Jᵀc_i,
  the inner products are (G c_i)_j, so only G is needed; w = Σ_i c_i.
  """
  m = gram.shape[0]
  diag = jnp.diagonal(gram)
  orders = jax.vmap(lambda k: jax.random.permutation(k, m))(jax.random.split(key, m))

  def project_one(i, order):
    def step(k, c):
      j = order[k]
      dot = gram[j] @ c
      coef = linalg.safe_div(dot, diag[j])
      return jnp.where((j != i) & (dot < 0), c.at[j].add(-coef), c)
    return jax.lax.fori_loop(0, m, step, jax.nn.one_hot(i, m, dtype=gram.dtype))

  return jnp.sum(jax.vmap(project_one)(jnp.arange(m), orders), axis=0)


def pcgrad(*, seed: int = 0, task_specific=None, weight_heads: Optional[bool] = None,
           num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """PCGrad ("gradient surgery").

      ĝ_i = g_i − Σ_{j ∈ π_i, conflicting} (ĝ_i·g_j / ‖g_j‖²) g_j,   d = Σ_i ĝ_i,

  with a fresh random order π_i of the other tasks at every step, drawn from
  the PRNG key held in the state. For m = 2 the order is irrelevant and PCGrad
  equals UPGrad with unit preferences and no normalisation. Linear under a
  common scaling of the gradients. Weights w with d = Jᵀw are exposed.

  Args:
    seed: seed of the PRNG key kept in the state (default 0).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Reference:
    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
  """
  info = base.AggregatorInfo(name="pcgrad", stochastic=True, scale_degree=1)

  def rule(view, key):
    key, sub = jax.random.split(key)
    return base.RuleOutput(state=key, weights=pcgrad_weights(view.gram, sub))

  return base.make_aggregator(rule, info, init_inner=lambda params, m: jax.random.PRNGKey(seed),
                              task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
