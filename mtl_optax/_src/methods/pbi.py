"""PBI: penalty-based boundary intersection (Zhang & Li, MOEA/D, 2007)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base
from mtl_optax._src.methods._common import check_preference
from mtl_optax._src.methods._common import preference_for
from mtl_optax._src.methods._common import unit_and_norm


def pbi_weights(losses, preference, theta, reference=None):
  """W = ∂s/∂L of s(L) = d1 + θ d2 (PBI) and (d1, d2).

  With f = L − z, r̂ = r/‖r‖: d1 = fᵀr̂, p = f − d1 r̂, d2 = ‖p‖, and
  w = r̂ + θ p/‖p‖. On the preference ray (p = 0, up to round-off: ‖p‖ ≤
  10·m·eps·‖f‖) d2 is not differentiable: its zero subgradient is taken (w = r̂).
  """
  f = losses if reference is None else losses - reference
  r_hat, _ = unit_and_norm(preference)
  d1 = f @ r_hat
  p_hat, d2 = unit_and_norm(f - d1 * r_hat)
  # Within round-off of the ray, p is noise whose direction means nothing.
  _, f_norm = unit_and_norm(f)
  on_ray = d2 <= 10 * f.shape[0] * jnp.finfo(f.dtype).eps * f_norm
  p_hat = jnp.where(on_ray, 0.0, p_hat)
  return r_hat + theta * p_hat, d1, jnp.where(on_ray, 0.0, d2)


def pbi(preference=None, theta: float = 5.0, *, reference=None, task_specific=None,
        weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
        nonfinite: str = "skip"):
  """Penalty-based boundary intersection (PBI) scalarisation: minimise d1 + θ d2.

  With the preference direction r̂ = r/‖r‖ and f = L − z (z a reference,
  ideal, point; 0 by default):

      d1 = ⟨f, r̂⟩,   d2 = ‖f − d1 r̂‖,   s(L) = d1 + θ d2,

  d1 the progress along the preference ray, d2 the distance to it. The update
  is the gradient of s, d = Jᵀw with

      w = ∂s/∂L = r̂ + θ (f − d1 r̂) / d2,

  (weighted; entries may be negative). On the ray itself (d2 = 0) the zero
  subgradient of d2 is used (w = r̂), where TorchJD's ``PBI`` adds 1e-12
  under the square root (our w is exact elsewhere, theirs differs by
  O(1e-12/d2²)). A zero preference gives r̂ = 0.

  Preference: a fixed ``preference`` (default uniform) or, per step,
  ``update(..., preference=r)``, as for :func:`mtl_optax.cosmos`.

  Args:
    preference: the preference r (m non-negative entries, not all zero) or
      None (uniform, or ``preference=`` at update time).
    theta: penalty θ ≥ 0 on d2 (default 5.0, MOEA/D's experiments).
    reference: the reference point z (m finite values) or None (the origin,
      which assumes non-negative losses).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. Heads are weighted by w by default.

  Reference:
    Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition", IEEE Trans. Evolutionary Computation 11(6), 2007.
  """
  name = "pbi"
  base.check_nonnegative(name, theta=theta)
  fixed = check_preference(name, preference)
  z = None
  if reference is not None:
    z = np.asarray(reference, dtype=np.float64)
    if z.ndim != 1 or not np.all(np.isfinite(z)):
      raise ValueError(f"{name}: reference must be a finite 1-D vector, got {reference!r}.")
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def rule(view, inner):
    dtype = view.gram.dtype
    m = view.num_tasks
    r = preference_for(name, fixed, view.extra, m, dtype)
    ref = None
    if z is not None:
      if z.shape != (m,):
        raise ValueError(f"{name}: reference has {z.shape[0]} entries but the gradients have "
                         f"m={m} tasks.")
      ref = jnp.asarray(z, dtype)
    w, d1, d2 = pbi_weights(view.losses.astype(dtype), r, theta, ref)
    return base.RuleOutput(state=inner, weights=w, diagnostics={"d1": d1, "d2": d2})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
