"""COSMOS: preference-conditioned scalarisation with a cosine penalty (Ruchte & Grabocka, 2021)."""

from __future__ import annotations

from typing import Optional

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods._common import check_preference
from mtl_optax._src.methods._common import preference_for
from mtl_optax._src.methods._common import unit_and_norm


def cosmos_weights(losses, preference, lam):
  """W = ∂s/∂L of s(L) = rᵀL − λ cos(r, L): the COSMOS task weights.

      w = r − λ (r̂ − cos(r, L) L̂) / ‖L‖,   r̂ = r/‖r‖, L̂ = L/‖L‖,

  formed from the unit vectors (no ‖L‖² that could overflow). A zero loss
  vector or a zero preference makes the cosine constant (0), so its gradient
  is taken as 0 and w = r.
  """
  r_hat, _ = unit_and_norm(preference)
  l_hat, l_norm = unit_and_norm(losses)
  cos = r_hat @ l_hat
  grad_cos = linalg.safe_div(r_hat - cos * l_hat, l_norm)
  return preference - lam * grad_cos, cos


def cosmos(preference=None, lam: float = 1.0, *, task_specific=None,
           weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
           nonfinite: str = "skip"):
  """COSMOS scalarisation: minimise s(L) = Σ_i r_i L_i − λ cos(r, L).

  The linear scalarisation with preference r, minus λ times the cosine
  similarity between the loss vector and r (which pulls the losses towards the
  preference ray and spreads the Pareto front). The update is the gradient of
  s, d = Jᵀw with

      w = ∂s/∂L = r − λ (r̂ − cos(r, L) L̂) / ‖L‖,

  so the method is weighted (w may have negative entries where the cosine
  term pushes a loss up). The linear term is the raw rᵀL, as in the paper's
  Eq. 5, the authors' code (ruchtem/cosmos) and TorchJD's ``COSMOS``. A zero
  loss vector makes the cosine constant: its gradient is taken as 0.

  Preference. A fixed ``preference`` (default uniform, 1/m) or, per step,
  ``update(..., preference=r)``. The full method samples r ~ Dir(α) at every
  step AND feeds r to the network (appended to its input); draw r yourself,
  give it to your model and to ``update`` (the transformation cannot condition
  your network).

  Args:
    preference: the fixed preference r (m non-negative entries, not all zero)
      or None (uniform 1/m, or the ``preference=`` passed to ``update``).
    lam: the cosine penalty λ ≥ 0 (default 1.0; the paper tunes it per data
      set between 0.01 and 8; λ = 0 is the linear scalarisation rᵀL).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. Heads are weighted by w by default
      (the gradient of s, as for the other loss scalarisations).

  Reference:
    Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning", ICDM 2021 (arXiv 2103.13392).
  """
  name = "cosmos"
  base.check_nonnegative(name, lam=lam)
  fixed = check_preference(name, preference)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def rule(view, inner):
    dtype = view.gram.dtype
    r = preference_for(name, fixed, view.extra, view.num_tasks, dtype)
    w, cos = cosmos_weights(view.losses.astype(dtype), r, lam)
    return base.RuleOutput(state=inner, weights=w, diagnostics={"cosine": cos})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
