"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods import moco as moco_lib
from mtl_optax._src.methods._common import require_num_tasks


class DBMTLState(NamedTuple):
  """DB-MTL's inner state: EMA buffers b_i of the log-loss gradients (shared leaves), step k."""
  buffer: list
  step: jax.Array


def db_mtl(beta: float = 0.9, beta_sigma: float = 0.0, *, eps: float = 1e-8,
           task_specific=None, weight_heads: Optional[bool] = None,
           num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """DB-MTL: log-loss gradients, EMA-tracked and balanced to the largest norm.

  Loss-scale balancing trains on log L_i, whose gradient is ĝ_i = g_i / (L_i + ε);
  gradient-magnitude balancing rescales every tracked gradient to the norm of
  the largest one. At step k (from 1), with β_k = β / k^σ:

      b_i ← β_k b_i + (1 − β_k) ĝ_i                  (b_i = 0 initially),
      α_i = max_j ‖b_j‖ / ‖b_i‖,
      d = Σ_i α_i b_i.

  Because the buffers carry earlier gradients, d is not a weighting of the
  current J (α is in ``diagnostics["alpha"]``, clipped to the largest finite
  value of its dtype; the buffer norms in ``diagnostics["buffer_norms"]``).
  Norms are computed on per-row power-of-two rescaled buffers, so gradients
  and losses of any magnitude are balanced without overflow, and α_i b_i is
  formed as max_j‖b_j‖ · b_i/‖b_i‖ (zero buffers contribute nothing instead
  of LibMTL's ``‖b_i‖ + 1e-8``). Losses must be positive (ε guards exact
  zeros, as in LibMTL).

  Task-specific (head) leaves receive the gradient of their task's log loss,
  g_i / (L_i + ε), as in the paper and LibMTL (``weight_heads=False`` gives
  them the plain g_i instead).

  Args:
    beta: EMA coefficient of the buffers (default 0.9, LibMTL's default).
    beta_sigma: decay exponent of β_k (default 0: constant β).
    eps: added to the losses before taking logs (default 1e-8).
    task_specific, nonfinite: see :func:`mtl_optax.make_aggregator`.
    weight_heads: None/True (default): heads get ∇ log L_i; False: ∇ L_i.
    num_tasks: m, required (the buffers have shape (m, ...)).

  Reference:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for Multi-Task
    Learning",
    arXiv 2308.12029, 2023 (defaults from LibMTL's ``DB_MTL``).
  """
  base.check_nonnegative("db_mtl", beta=beta, beta_sigma=beta_sigma, eps=eps)
  if beta >= 1:
    raise ValueError(f"db_mtl: beta must be in [0, 1), got {beta!r}.")
  m_init = require_num_tasks("db_mtl", num_tasks)
  log_heads = weight_heads is None or bool(weight_heads)
  info = base.AggregatorInfo(name="db_mtl", needs_losses=True, weighted=False,
                             scale_degree=1)

  def init_inner(params, m):
    return DBMTLState(buffer=moco_lib.tracked_zeros(params, m_init, task_specific, "db_mtl"),
                      step=jnp.zeros((), jnp.int32))

  def rule(view, state):
    m = view.num_tasks
    k = (state.step + 1).astype(state.buffer[0].dtype)
    beta_k = beta / k ** beta_sigma
    inv_loss = 1.0 / (view.losses.astype(view.row_gram.dtype) + eps)
    buffer = []
    for b, g in zip(state.buffer, view.shared):
      shape = (m,) + (1,) * (g.ndim - 1)
      g_log = g.astype(b.dtype) * inv_loss.astype(b.dtype).reshape(shape)
      bk = beta_k.astype(b.dtype)
      buffer.append(bk * b + (1.0 - bk) * g_log)
    # Norms of the buffers, overflow-safe: b_i = s_i r_i with s_i a power of two.
    scales = linalg.power_of_two_scale(linalg.rows_max_abs(buffer))
    r_gram = linalg.gram_matrix(buffer, scales[:, None])
    r_norms = linalg.safe_norms(r_gram)
    norms = r_norms * scales.astype(r_gram.dtype)
    top = jnp.max(norms)
    unit = linalg.safe_div(jnp.ones_like(r_norms), r_norms)  # b_i / ‖b_i‖ = r_i / ‖r_i‖
    update = []
    for b in buffer:
      shape = (m,) + (1,) * (b.ndim - 1)
      rows = b / scales.astype(b.dtype).reshape(shape) * unit.astype(b.dtype).reshape(shape)
      update.append(top.astype(b.dtype) * jnp.sum(rows, axis=0))
    big = jnp.finfo(r_gram.dtype).max
    alpha = jnp.where(norms > 0, jnp.minimum(linalg.safe_div(top, norms, fill=big), big), 0.0)
    new_state = DBMTLState(buffer=buffer, step=state.step + 1)
    return base.RuleOutput(
        state=new_state, shared_update=update,
        head_weights=inv_loss if log_heads else None,
        diagnostics={"alpha": alpha, "buffer_norms": norms})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=log_heads, num_tasks=num_tasks, nonfinite=nonfinite)
