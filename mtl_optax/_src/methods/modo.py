"""MoDo: multi-objective gradient with double sampling (Chen et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods import sdmgrad as sdmgrad_lib
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype


class MoDoState(NamedTuple):
  """MoDo's inner state: the simplex weights λ."""
  lam: jax.Array


def modo(gamma: float = 1e-3, rho: float = 0.1, *, heads: str = "mean", task_specific=None,
         weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
         nonfinite: str = "skip"):
  """MoDo: stochastic MGDA whose weights take one projected step per update.

  With two independent stochastic gradients J_a, J_b (``weight_grads=``; the
  calling convention is that of :func:`mtl_optax.sdmgrad`, see
  ``mo.multi_batch_task_grads``), J_a J_bᵀ is an unbiased estimate of the Gram
  matrix and

      λ ← Π_Δ(λ − γ (J_a J_bᵀ λ + ρ λ)),     d = Jᵀλ,

  with J the main sample's gradients (λ starts at 1/m and is exposed as the
  task weights). Unlike MGDA the weights move by one small step per update,
  which is what makes the double-sampling estimate unbiased. The step is not
  scale-invariant (γ has units of 1/‖g‖²); if it overflows, λ is kept.
  Heads: "mean" (default, LibMTL) averages each head's own-task gradient
  over the three samples; "main" uses the main sample only.

  Args:
    gamma: step size of λ (default 1e-3).
    rho: ℓ2 regularisation of λ's step (default 0.1).
    heads: "mean" (default) or "main".
    task_specific, weight_heads, nonfinite: see :func:`mtl_optax.make_aggregator`.
    num_tasks: m, required (λ has shape (m,)).

  Reference:
    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance",
    NeurIPS 2023 (defaults of LibMTL's ``MoDo``, from the official code).
  """
  base.check_positive("modo", gamma=gamma)
  base.check_nonnegative("modo", rho=rho)
  if heads not in sdmgrad_lib.HEAD_MODES:
    raise ValueError(f"modo: heads must be one of {sdmgrad_lib.HEAD_MODES}, got {heads!r}.")
  m_init = require_num_tasks("modo", num_tasks)
  info = base.AggregatorInfo(name="modo", scale_degree=1)

  def init_inner(params, m):
    return MoDoState(lam=jnp.full((m_init,), 1.0 / m_init, state_dtype(params)))

  def rule(view, state):
    leaves_a, leaves_b = sdmgrad_lib.shared_weight_leaves(view, task_specific)
    gram_s, scale = sdmgrad_lib.scaled_cross_gram(leaves_a, leaves_b)
    dtype = jnp.promote_types(gram_s.dtype, state.lam.dtype)
    lam_old = state.lam.astype(dtype)
    # J_a J_bᵀ λ = s² (Ĝ λ): the product is formed before the s² factor to limit overflow.
    s = scale.astype(dtype)
    grad = (gram_s.astype(dtype) @ lam_old) * s * s + rho * lam_old
    lam = linalg.project_simplex(lam_old - gamma * grad)
    lam = jnp.where(jnp.all(jnp.isfinite(lam)), lam, lam_old)
    return base.RuleOutput(state=MoDoState(lam=lam.astype(state.lam.dtype)),
                           weights=lam.astype(view.gram.dtype))

  tx = base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                            weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)
  return sdmgrad_lib.with_multi_batch(tx, "modo", task_specific, heads)
