"""IMTL: impartial multi-task learning (Liu et al., ICLR 2021): IMTL-G, IMTL-L, hybrid."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype
from mtl_optax._src.methods.uncertainty_weighting import inner_optimizer
from mtl_optax._src.methods.uncertainty_weighting import inner_step

VARIANTS = ("gradient", "loss", "hybrid")


def imtl_weights(gram: jnp.ndarray) -> jnp.ndarray:
  """IMTL-G weights in Gram form: v = G⁺ √diag(G), w = v / Σv.

  The aggregated d = Jᵀw has equal projections on every unit task gradient
  (u_iᵀd equal for all i) with Σ w = 1. If Σv vanishes (all-zero gradients)
  the weights are 0 and so is the update.
  """
  v = jnp.linalg.pinv(gram, hermitian=True) @ linalg.safe_norms(gram)
  return linalg.safe_div(v, jnp.sum(v))


class IMTLLossScaleState(NamedTuple):
  """Learnable log loss scales s_i (IMTL-L) and the state of their optimizer."""
  log_scales: jax.Array
  opt_state: Any


def imtl(variant: str = "gradient", *, init_log_scale: float = 0.0,
         learning_rate: float = 1e-4,
         optimizer: Union[str, optax.GradientTransformation] = "adam",
         task_specific=None, weight_heads: Optional[bool] = None,
         num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """IMTL: IMTL-G (gradient balance), IMTL-L (loss balance) or both (hybrid).

  **IMTL-G** (``variant="gradient"``, default): the combination
  d = Σ_i α_i g_i with Σ α = 1 whose projection onto every unit gradient
  u_i = g_i/‖g_i‖ is the same: with D = [g_1 − g_i]ᵢ and U = [u_1 − u_i]ᵢ
  (i ≥ 2), α_{2..m} = g_1 Uᵀ(DUᵀ)⁻¹, α_1 = 1 − Σ α_{2..m}; computed in the
  equivalent Gram form α = G⁺√diag(G) / Σ(G⁺√diag(G)) (:func:`imtl_weights`,
  as TorchJD's IMTLG, which also covers linearly dependent rows). Heads get
  their own gradient.

  **IMTL-L** (``variant="loss"``): learnable loss scales; each task's loss is
  replaced by e^{s_i} L_i − s_i, so w_i = e^{s_i} (d = Σ e^{s_i} g_i, heads
  weighted by e^{s_i} too) and s follows its own gradient
  ∂/∂s_i = e^{s_i} L_i − 1 (equilibrium e^{s_i} L_i = 1: every scaled loss
  equals 1).

  **Hybrid** (``variant="hybrid"``, the paper's full IMTL, Alg. 1): IMTL-L's
  scaled losses, and IMTL-G applied to the scaled shared gradients
  g̃_i = e^{s_i} g_i: α = imtl_weights(diag(e^s) G diag(e^s)), w_i = α_i e^{s_i}
  (d = Σ α_i g̃_i); each head gets its scaled gradient e^{s_i}∇L_i (not α).

  For "loss" and "hybrid", every ``update`` computes the weights from the
  current s, then s takes one step of the inner optimizer (``optimizer``,
  default ``optax.adam(learning_rate)``) on ∂/∂s above — as when s is a model
  parameter trained by the same backward pass (LibMTL's ``loss_scale``).
  ``mo.diagnostics(state)["log_loss_scales"]`` is the s used for the step.

  Args:
    variant: "gradient" (default; IMTL-G), "loss" (IMTL-L) or "hybrid".
    init_log_scale: initial s_i (default 0, as LibMTL; "loss"/"hybrid" only).
    learning_rate: learning rate of the inner optimizer of s (default 1e-4,
      LibMTL's default Adam learning rate, shared with the model there).
    optimizer: "adam" (default), "sgd" or an optax ``GradientTransformation``
      for s ("loss"/"hybrid" only).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. "loss" and "hybrid" need ``losses=``
      and ``num_tasks``; their heads are scaled by e^{s} unless
      ``weight_heads=False``.

  Reference:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021.
  """
  name = "imtl"
  if variant not in VARIANTS:
    raise ValueError(f"{name}: variant must be one of {VARIANTS}, got {variant!r}.")

  if variant == "gradient":
    info = base.AggregatorInfo(name=name, scale_degree=1)

    def rule(view, inner):
      return base.RuleOutput(state=inner, weights=imtl_weights(view.gram))

    return base.make_aggregator(rule, info, task_specific=task_specific,
                                weight_heads=weight_heads, num_tasks=num_tasks,
                                nonfinite=nonfinite)

  m = require_num_tasks(f"{name}(variant={variant!r})", num_tasks,
                        "one learnable loss scale per task")
  if not (isinstance(init_log_scale, (int, float)) and abs(init_log_scale) < float("inf")):
    raise ValueError(f"{name}: init_log_scale must be a finite number, got {init_log_scale!r}.")
  opt = inner_optimizer(name, optimizer, learning_rate)
  info = base.AggregatorInfo(name=name, needs_losses=True,
                             representation="exact" if variant == "loss" else "invalid",
                             scale_degree=1)
  heads_scaled = True if weight_heads is None else bool(weight_heads)

  def init_inner(params, _):
    s = jnp.full((m,), init_log_scale, state_dtype(params))
    return IMTLLossScaleState(s, opt.init(s))

  def scaled_rule(view, st):
    s = st.log_scales
    losses = view.losses.astype(s.dtype)
    scales = jnp.exp(s)
    grad_s = scales * losses - 1.0
    new_s, opt_state = inner_step(opt, grad_s, st.opt_state, s)
    new_state = IMTLLossScaleState(new_s, opt_state)
    diag = {"log_loss_scales": s}
    if variant == "loss":
      return base.RuleOutput(state=new_state, weights=scales, diagnostics=diag)
    gram = view.gram
    # IMTL-G is invariant to a common scaling of G: use e^{s - max s} (no overflow).
    rel = jnp.exp(s - jnp.max(s)).astype(gram.dtype)
    alpha = imtl_weights(gram * rel[:, None] * rel[None, :])
    diag["imtl_alpha"] = alpha
    heads = scales if heads_scaled else jnp.ones_like(scales)
    return base.RuleOutput(state=new_state, weights=alpha * scales.astype(alpha.dtype),
                           head_weights=heads.astype(alpha.dtype), diagnostics=diag)

  return base.make_aggregator(scaled_rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=heads_scaled, num_tasks=num_tasks,
                              nonfinite=nonfinite)
