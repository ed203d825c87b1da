"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods import moco as moco_lib
from mtl_optax._src.methods._common import require_num_tasks

# Finite stand-in for log2(0) as the initial accumulator scale (no inf in the state).
_NO_SCALE = -1e4


class ExcessMTLState(NamedTuple):
  """ExcessMTL's inner state.

  Attributes:
    accum: AdaGrad accumulators Σ_t g_t² of the shared leaves, task axis first,
      stored divided by 4^log2_scale_i (overflow-safe).
    log2_scale: (m,) the per-task power-of-two exponents of those scales.
    log2_w0: (m,) log₂ of the first step's excess-risk estimates (−inf for a
      task whose first gradient was zero).
    logits: (m,) accumulated η·w_i/w0_i; the weights are m·softmax(logits).
    step: number of updates.
  """
  accum: list
  log2_scale: jax.Array
  log2_w0: jax.Array
  logits: jax.Array
  step: jax.Array


def excess_mtl(robust_step_size: float = 1e-2, *, eps: float = 1e-7, task_specific=None,
               weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
               nonfinite: str = "skip"):
  """ExcessMTL: exponentiated-gradient task weights driven by estimated excess risks.

  Each task's excess risk is estimated by the squared gradient norm in the
  AdaGrad metric, w_i = g_iᵀ diag(√(A_i + ε))⁻¹ g_i with A_i = Σ_t g_{i,t}² the
  accumulated squared gradients (current step included). The first step
  records w_i⁽⁰⁾ and keeps the weights at 1; afterwards

      λ_i ← λ_i exp(η w_i / w_i⁽⁰⁾),   λ ← m λ / Σλ,
      d = Σ_i λ_i g_i,

  i.e. λ = m·softmax(η Σ_t w_{i,t}/w_i⁽⁰⁾), which is how it is computed (no
  overflow of the exponentials). The accumulators are kept with per-task
  power-of-two scales and w in log₂, so gradients of any magnitude are
  handled in float32; a task whose first gradient is zero gets ratio 0.
  Heads are weighted by λ by default (ExcessMTL reweights the losses).

  Args:
    robust_step_size: η (default 1e-2, LibMTL's default).
    eps: AdaGrad's ε inside the square root (default 1e-7).
    task_specific, nonfinite: see :func:`mtl_optax.make_aggregator`.
    weight_heads: default True (weighted-loss convention); False gives each
      head its own unweighted gradient.
    num_tasks: m, required (the accumulators have shape (m, ...)).

  Reference:
    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning
    with Excess Risks",
    ICML 2024 (as implemented in LibMTL's ``ExcessMTL``).
  """
  base.check_positive("excess_mtl", robust_step_size=robust_step_size, eps=eps)
  m_init = require_num_tasks("excess_mtl", num_tasks)
  weight_heads = True if weight_heads is None else bool(weight_heads)
  info = base.AggregatorInfo(name="excess_mtl", scale_degree=1, reads_rows=True)
  log2_eps = float(jnp.log2(eps))

  def init_inner(params, m):
    accum = moco_lib.tracked_zeros(params, m_init, task_specific, "excess_mtl")
    dt = accum[0].dtype
    return ExcessMTLState(accum=accum, log2_scale=jnp.full((m_init,), _NO_SCALE, dt),
                          log2_w0=jnp.zeros((m_init,), dt), logits=jnp.zeros((m_init,), dt),
                          step=jnp.zeros((), jnp.int32))

  def rule(view, state):
    m = view.num_tasks
    dt = state.logits.dtype
    nonzero = linalg.safe_norms(view.row_gram) > 0
    log2_s = jnp.where(nonzero, jnp.log2(view.row_scales).astype(dt), _NO_SCALE)
    new_scale = jnp.maximum(state.log2_scale, log2_s)
    shrink = jnp.exp2(2.0 * (state.log2_scale - new_scale))
    # Tasks whose gradients were always zero have no scale yet (their rows are 0).
    scale = jnp.where(new_scale > 0.5 * _NO_SCALE, new_scale, 0.0)
    eps_hat = jnp.exp2(log2_eps - 2.0 * scale)        # ε in units of 4^scale (may be inf)
    tiny_fallback = jnp.exp2(scale - 0.5 * log2_eps)  # 1/√ε in units of 2^-scale
    total = jnp.zeros((m,), dt)
    accum = []
    for acc, g in zip(state.accum, view.shared):
      shape = (m,) + (1,) * (g.ndim - 1)
      g_hat = g.astype(acc.dtype) / jnp.exp2(scale).astype(acc.dtype).reshape(shape)
      acc = acc * shrink.astype(acc.dtype).reshape(shape) + g_hat * g_hat
      accum.append(acc)
      # g² / √(A + ε) in units of 2^scale: ĝ² / √(Â + ε 4^-scale); when ε 4^-scale
      # overflows, A is negligible against ε and the term is ĝ² 2^scale / √ε.
      e = eps_hat.astype(acc.dtype).reshape(shape)
      den = acc + e
      inv = jnp.where(den > 0, jax.lax.rsqrt(jnp.where(den > 0, den, 1.0)), 0.0)
      term = g_hat * g_hat * jnp.where(jnp.isfinite(e), inv,
                                       tiny_fallback.astype(acc.dtype).reshape(shape))
      total = total + jnp.sum(term.reshape(m, -1), axis=1).astype(dt)
    log2_w = scale + jnp.log2(total)
    first = state.step == 0
    log2_w0 = jnp.where(first, log2_w, state.log2_w0)
    ok = jnp.isfinite(log2_w) & jnp.isfinite(log2_w0)
    expo = jnp.minimum(jnp.where(ok, log2_w - log2_w0, -jnp.inf), 126.0)
    ratio = jnp.exp2(expo)
    logits = state.logits + jnp.where(first, 0.0, robust_step_size * ratio)
    logits = logits - jnp.max(logits)
    weights = m * jax.nn.softmax(logits)
    new_state = ExcessMTLState(accum=accum, log2_scale=new_scale, log2_w0=log2_w0,
                               logits=logits, step=state.step + 1)
    return base.RuleOutput(state=new_state, weights=weights.astype(view.gram.dtype),
                           diagnostics={"excess_ratio": ratio.astype(dt)})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)
