"""LDC-MTL: scalable loss discrepancy control (Xiao, Dong, Zou & Ji, arXiv 2502.08585)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype
from mtl_optax._src.methods.uncertainty_weighting import check_eps
from mtl_optax._src.methods.uncertainty_weighting import inner_optimizer
from mtl_optax._src.methods.uncertainty_weighting import inner_step

Array = jax.Array
NORMALIZATIONS = ("ratio", "log", "none")


class LDCMTLState(NamedTuple):
  """Weight logits ξ (σ = sigmoid(ξ)), their optimizer state, and the first step's losses."""
  logits: Array
  opt_state: Any
  initial_losses: Array
  has_initial: Array


def ldc_mtl_objective_grads(sigma: Array, norm_losses: Array, lamb: float
                            ) -> tuple[Array, Array]:
  """Gradients of LDC-MTL's objective w.r.t. the normalised losses and the weights.

      F(σ, L̃) = Σ_i σ_i L̃_i / sg(Σ_j σ_j) + λ Σ_{i<m} |σ_i L̃_i − σ_{i+1} L̃_{i+1}|

  (sg: no gradient). Returns ``(∂F/∂L̃, ∂F/∂σ)``; sign(0) = 0 as in autograd.
  """
  u = sigma * norm_losses
  # Compared, not subtracted: with ratio normalisation every L̃_i is equal at the
  # first step, and XLA:CPU may fuse σ_i L̃_i − σ_{i+1} L̃_{i+1} into a fused
  # multiply-add whose result is the round-off of one product (±1e-16), not 0.
  s = ((u[:-1] > u[1:]).astype(u.dtype) - (u[:-1] < u[1:]).astype(u.dtype))
  # ∂/∂u_i Σ|u_k − u_{k+1}| = s_i − s_{i−1} (s_m = s_0 = 0 at the ends).
  du = lamb * (jnp.concatenate([s, jnp.zeros((1,), u.dtype)])
               - jnp.concatenate([jnp.zeros((1,), u.dtype), s]))
  total = jnp.sum(sigma)
  return sigma / total + du * sigma, norm_losses / total + du * norm_losses


def ldc_mtl(
    lamb: float = 0.1,
    learning_rate: float = 1e-3,
    *,
    normalization: str = "ratio",
    init: float = 1.0,
    optimizer: Union[str, optax.GradientTransformation] = "adam",
    eps: float = 1e-8,
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """LDC-MTL: loss balancing by a first-order bilevel method with O(1) overhead.

  Learnable task weights σ = sigmoid(ξ) (the reference's weight vector; its
  dense-prediction models compute them with a small router network instead).
  The lower level trains the model on the weighted normalised losses, the
  upper level shrinks the discrepancy between consecutive weighted losses;
  the first-order algorithm takes one gradient step of

      F(θ, ξ) = Σ_i σ_i L̃_i(θ) / Σ_j σ_j + λ Σ_{i<m} |σ_i L̃_i(θ) − σ_{i+1} L̃_{i+1}(θ)|

  in both θ and ξ (Σ_j σ_j is held constant, as in the reference code), so

      d = Σ_i c_i ∇L̃_i,   c_i = σ_i / Σσ + λ σ_i (s_i − s_{i−1}),
      s_i = sign(σ_i L̃_i − σ_{i+1} L̃_{i+1}),
      ξ ← optimizer(ξ, ∂F/∂ξ),   ∂F/∂σ_i = L̃_i / Σσ + λ L̃_i (s_i − s_{i−1}),

  with the weights c of the current ξ (ξ moves after the step, as a joint
  ``loss.backward(); optimizer.step()`` does). The loss pre-normalisation
  ``normalization`` is "ratio" (L̃_i = L_i / r_i with r = L⁽⁰⁾ / min L⁽⁰⁾ from
  the first call's losses, the paper's coarse normalisation and the NYUv2
  code), "log" (L̃_i = log(L_i / L_i⁽⁰⁾), ∇L̃_i = g_i / L_i, the QM9 code) or
  "none" (the CelebA code). The exposed weights are the coefficients of the
  raw task gradients (c_i / r_i, or c_i / L_i for "log"); they may be
  negative when λ is large. Heads are weighted (a weighted loss).
  Diagnostics: ``sigma`` (the σ behind the step) and ``normalized_losses``.

  The weights depend on the losses only: the paper's O(1) cost is one
  backward pass of Σ_i c_i L_i (c from ``mo.task_weights``); given stacked
  gradients the transformation simply combines them.

  Args:
    lamb: λ, weight of the loss-discrepancy term (default 0.1, the
      reference's two-task Cityscapes setting; 0.05 NYUv2, 0.01 CelebA).
    learning_rate: step size of ξ's optimizer (default 1e-3).
    normalization: "ratio" (default), "log" or "none" (see above).
    init: initial ξ (default 1.0, the reference's CelebA weight vector).
    optimizer: "adam" (default, as the reference), "sgd", or an optax
      transformation for ξ.
    eps: floor of losses in divisions and logs (default 1e-8).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. ``num_tasks`` is required.

  Reference:
    Xiao, Dong, Zou & Ji, "LDC-MTL: Balancing Multi-Task Learning through
    Scalable Loss Discrepancy Control", arXiv 2502.08585, 2025 (code:
    OptMN-Lab/LDC-MTL, ``experiments/*/trainer.py``).
  """
  name = "ldc_mtl"
  m = require_num_tasks(name, num_tasks, "the weight logits")
  base.check_nonnegative(name, lamb=lamb)
  check_eps(name, eps)
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"{name}: normalization must be one of {NORMALIZATIONS}, "
                     f"got {normalization!r}.")
  if not (isinstance(init, (int, float)) and np.isfinite(init)):
    raise ValueError(f"{name}: init must be a finite number, got {init!r}.")
  opt = inner_optimizer(name, optimizer, learning_rate)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def init_inner(params, _):
    dtype = state_dtype(params)
    xi = jnp.full((m,), float(init), dtype)
    return LDCMTLState(xi, opt.init(xi), jnp.ones((m,), dtype), jnp.zeros((), bool))

  def rule(view, st):
    xi = st.logits
    dtype = xi.dtype
    losses = jnp.maximum(view.losses.astype(dtype), eps)
    initial = jnp.where(st.has_initial, st.initial_losses, losses)
    if normalization == "ratio":
      scale = initial / jnp.min(initial)
      norm_losses, chain = losses / scale, 1.0 / scale
    elif normalization == "log":
      norm_losses, chain = jnp.log(losses / initial), 1.0 / losses
    else:
      norm_losses, chain = losses, jnp.ones_like(losses)
    sigma = jax.nn.sigmoid(xi)
    d_loss, d_sigma = ldc_mtl_objective_grads(sigma, norm_losses, lamb)
    d_xi = d_sigma * sigma * (1.0 - sigma)
    new_xi, new_opt = inner_step(opt, d_xi, st.opt_state, xi)
    new_state = LDCMTLState(new_xi, new_opt, initial, jnp.ones((), bool))
    return base.RuleOutput(state=new_state, weights=d_loss * chain,
                           diagnostics={"sigma": sigma, "normalized_losses": norm_losses})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
