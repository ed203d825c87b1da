"""FAMO: fast adaptive multitask optimization (Liu, Liang, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype
from mtl_optax._src.methods.uncertainty_weighting import check_eps
from mtl_optax._src.methods.uncertainty_weighting import inner_optimizer
from mtl_optax._src.methods.uncertainty_weighting import inner_step

Array = jax.Array


class FAMOState(NamedTuple):
  """Task logits ξ, their optimizer state, and the previous call's losses."""
  logits: Array
  opt_state: Any
  prev_losses: Array
  has_prev: Array


def famo_weights(logits: Array, losses: Array, min_losses: Array, eps: float) -> Array:
  """FAMO's task weights: w_i = (z_i/D_i) / Σ_j (z_j/D_j), z = softmax(ξ), D = L − L_min.

  d = Σ_i w_i g_i is the gradient of Σ_i c z_i log D_i with c = (Σ_j z_j/D_j)⁻¹
  held constant; Σ w = 1. ``D`` is floored at ``eps``.
  """
  z = jax.nn.softmax(logits)
  inv = z / jnp.maximum(losses - min_losses, eps)
  return inv / jnp.sum(inv)


def famo(
    learning_rate: float = 0.025,
    weight_decay: float = 1e-3,
    *,
    optimizer: Union[str, optax.GradientTransformation] = "adam",
    min_losses: Optional[Sequence[float]] = None,
    eps: float = 1e-8,
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """FAMO: balanced loss decrease with O(1) extra cost per step.

  With task logits ξ, z = softmax(ξ) and D_i = L_i − L_i^min (floored at
  ``eps``), the update direction is

      d = Σ_i c z_i / D_i · g_i,   c = (Σ_j z_j / D_j)⁻¹          (w_i = c z_i / D_i, Σ w = 1)

  and after a step θ_t → θ_{t+1} the logits follow the observed decrease of
  the log losses:

      δ = J_softmax(ξ)ᵀ (log D(θ_t) − log D(θ_{t+1})),   ξ ← ξ − β (δ + γ ξ).

  **No extra forward pass.** The paper evaluates D(θ_{t+1}) on the same batch
  right after the step. Here the losses at θ_{t+1} are the ones passed to the
  *next* ``update`` call: the state keeps the previous call's losses, and each
  call first updates ξ from (previous losses, current losses), then computes
  the weights of the current step from the new ξ. The weights used at every
  step are therefore the paper's whenever the losses are evaluated on the same
  data (full batch); with mini-batches δ also contains the change of batch
  (the log ratio is an unbiased but noisier estimate of the decrease). The
  first call has no previous losses and does not move ξ. To reproduce the
  paper exactly with mini-batches, pass the previous batch's losses
  re-evaluated at the current parameters (the paper's extra forward) as
  ``update(..., losses=L_t, previous_batch_losses=L_{t−1}(θ_t))``; δ then
  uses them instead of ``losses``.

  The inner update of ξ is ``optimizer`` applied to δ after adding γξ: with
  "sgd" it is literally ξ ← ξ − β(δ + γξ) (the paper's equation); the default
  "adam" is ``torch.optim.Adam(lr=β, weight_decay=γ)`` of the reference code
  and LibMTL. Diagnostics: ``logits`` (the ξ behind the step's weights) and
  ``loss_decrease`` (log D_prev − log D_now, zeros on the first call).

  Args:
    learning_rate: β (default 0.025, as the paper and LibMTL).
    weight_decay: γ (default 1e-3, LibMTL's; the reference code's examples use
      1e-2 to 1e-5 depending on the benchmark).
    optimizer: "adam" (default), "sgd" or an optax ``GradientTransformation``
      (which then replaces β and γ).
    min_losses: L^min per task (default 0), as ``set_min_losses`` in the
      reference code.
    eps: floor of D (default 1e-8; the reference adds 1e-8 instead, identical
      for D ≫ 1e-8, and NaN-free for D ≤ 0).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. ``num_tasks`` is required. Heads are
      weighted by w by default (the reference backpropagates the weighted
      loss through the whole model). The reference's gradient clipping
      (max_norm=1) is not part of FAMO: chain ``optax.clip_by_global_norm``.

  Reference:
    Liu, Liang, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023 (code: github.com/Cranial-XIX/FAMO).
  """
  name = "famo"
  m = require_num_tasks(name, num_tasks, "task logits and the previous losses")
  check_eps(name, eps)
  opt = inner_optimizer(name, optimizer, learning_rate, weight_decay)
  if min_losses is not None:
    min_np = np.asarray(min_losses, np.float64)
    if min_np.shape != (m,) or not np.all(np.isfinite(min_np)):
      raise ValueError(f"{name}: min_losses must be {m} finite numbers, got {min_losses!r}.")
  else:
    min_np = np.zeros((m,))
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def init_inner(params, _):
    dtype = state_dtype(params)
    xi = jnp.zeros((m,), dtype)
    return FAMOState(xi, opt.init(xi), jnp.ones((m,), dtype), jnp.zeros((), bool))

  def rule(view, st):
    xi = st.logits
    dtype = xi.dtype
    lmin = jnp.asarray(min_np, dtype)
    losses = view.losses.astype(dtype)
    after = view.extra.get("previous_batch_losses")
    if after is None:
      after = losses
    else:
      after = base.check_losses(after, m, f"{name} (previous_batch_losses)", True).astype(dtype)
    log_decrease = (jnp.log(jnp.maximum(st.prev_losses - lmin, eps))
                    - jnp.log(jnp.maximum(after - lmin, eps)))
    log_decrease = jnp.where(st.has_prev & jnp.isfinite(log_decrease), log_decrease,
                             jnp.zeros_like(log_decrease))
    delta = linalg.softmax_vjp(jax.nn.softmax(xi), log_decrease)
    new_xi, new_opt = inner_step(opt, delta, st.opt_state, xi)
    new_xi = jnp.where(st.has_prev, new_xi, xi)
    new_opt = jax.tree_util.tree_map(lambda a, b: jnp.where(st.has_prev, a, b),
                                     new_opt, st.opt_state)
    w = famo_weights(new_xi, losses, lmin, eps)
    new_state = FAMOState(new_xi, new_opt, losses, jnp.ones((), bool))
    return base.RuleOutput(state=new_state, weights=w,
                           diagnostics={"logits": new_xi, "loss_decrease": log_decrease})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
