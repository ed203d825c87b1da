"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Also home of the small helpers the loss-based methods with learnable weights
share (UW, GradNorm, FAMO, IMTL-L): the inner optax optimizer of the learnable
parameters and the loss floor ``eps`` check.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype

Array = jax.Array
INNER_OPTIMIZERS = ("adam", "sgd")


# ---------------------------------------------------------------------------
# Helpers shared by the loss-based methods.
# ---------------------------------------------------------------------------

def inner_optimizer(name: str, optimizer: Union[str, optax.GradientTransformation],
                    learning_rate: float, weight_decay: float = 0.0
                    ) -> optax.GradientTransformation:
  """The optax optimizer that updates a method's learnable task parameters.

  ``optimizer`` is "adam" (``optax.adam(learning_rate)``, the optimizer of the
  reference implementations), "sgd" (``optax.sgd(learning_rate)``, plain
  gradient descent as written in the papers) or any optax
  ``GradientTransformation`` (then ``learning_rate`` and ``weight_decay`` are
  ignored). ``weight_decay`` > 0 adds γ·p to the gradient first (L2, like
  ``torch.optim.Adam(weight_decay=γ)``).
  """
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  if optimizer not in INNER_OPTIMIZERS:
    raise ValueError(
        f"{name}: optimizer must be one of {INNER_OPTIMIZERS} or an optax "
        f"GradientTransformation, got {optimizer!r}.")
  base.check_positive(name, learning_rate=learning_rate)
  base.check_nonnegative(name, weight_decay=weight_decay)
  opt = optax.adam(learning_rate) if optimizer == "adam" else optax.sgd(learning_rate)
  if weight_decay > 0:
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  return opt


def inner_step(opt: optax.GradientTransformation, grad: Array, opt_state: Any, param: Array):
  """One step of the inner optimizer; a non-finite gradient entry counts as 0."""
  grad = jnp.where(jnp.isfinite(grad), grad, jnp.zeros((), grad.dtype)).astype(param.dtype)
  updates, opt_state = opt.update(grad, opt_state, param)
  new = optax.apply_updates(param, updates).astype(param.dtype)
  return new, opt_state


def check_eps(name: str, eps: float):
  """The positive floor applied to losses before logs and divisions."""
  base.check_positive(name, eps=eps)


# ---------------------------------------------------------------------------
# Uncertainty weighting.
# ---------------------------------------------------------------------------

class UncertaintyWeightingState(NamedTuple):
  """Log-variances s_i = log σ_i² and the state of their optimizer."""
  log_vars: Array
  opt_state: Any


def uncertainty_weighting(
    init_log_var: float = -0.5,
    learning_rate: float = 1e-4,
    *,
    optimizer: Union[str, optax.GradientTransformation] = "adam",
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """Uncertainty weighting (UW): learnable homoscedastic task uncertainties.

  Minimises, jointly in θ and the log-variances s_i = log σ_i²,

      Σ_i  L_i / (2 e^{s_i})  +  s_i / 2,

  so the task weights are w_i = 1 / (2 e^{s_i}) (d = Σ_i w_i g_i) and s follows
  its own gradient ∂/∂s_i = 1/2 − L_i / (2 e^{s_i}) (equilibrium e^{s_i} = L_i).
  At every ``update`` the weights are computed from the current s, then s takes
  one step of the inner optimizer (``optimizer``, default
  ``optax.adam(learning_rate)``) — exactly as when s is a model parameter
  trained by the same backward pass (LibMTL). The state holds s and the inner
  optimizer state; ``mo.diagnostics(state)["log_variances"]`` is the s used
  for the step's weights.

  Args:
    init_log_var: initial s_i (default -0.5, as LibMTL; w_i = e^{0.5}/2 ≈ 0.82).
    learning_rate: learning rate of the inner optimizer (default 1e-4, LibMTL's
      default Adam learning rate, with which it trains s together with the
      model; LibMTL's 1e-5 weight decay on s is not applied).
    optimizer: "adam" (default), "sgd" or an optax ``GradientTransformation``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. ``num_tasks`` is required. Heads are
      weighted by w (weighted-loss convention) by default.

  Differences: Kendall et al. use L/σ² for classification and L/(2σ²) for
  regression losses; like LibMTL we use the 1/2 form for every task.

  Reference:
    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018.
  """
  name = "uncertainty_weighting"
  m = require_num_tasks(name, num_tasks, "one learnable log-variance per task")
  if not (isinstance(init_log_var, (int, float)) and abs(init_log_var) < float("inf")):
    raise ValueError(f"{name}: init_log_var must be a finite number, got {init_log_var!r}.")
  opt = inner_optimizer(name, optimizer, learning_rate)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def init_inner(params, _):
    s = jnp.full((m,), init_log_var, state_dtype(params))
    return UncertaintyWeightingState(s, opt.init(s))

  def rule(view, st):
    s = st.log_vars
    losses = view.losses.astype(s.dtype)
    w = 0.5 * jnp.exp(-s)
    grad_s = 0.5 - losses * w
    new_s, opt_state = inner_step(opt, grad_s, st.opt_state, s)
    return base.RuleOutput(state=UncertaintyWeightingState(new_s, opt_state), weights=w,
                           diagnostics={"log_variances": s})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
