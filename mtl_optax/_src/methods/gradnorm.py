"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype
from mtl_optax._src.methods.dwa import EpochLosses
from mtl_optax._src.methods.dwa import advance_epoch
from mtl_optax._src.methods.dwa import check_steps_per_epoch
from mtl_optax._src.methods.dwa import init_epoch_losses
from mtl_optax._src.methods.uncertainty_weighting import check_eps
from mtl_optax._src.methods.uncertainty_weighting import inner_optimizer
from mtl_optax._src.methods.uncertainty_weighting import inner_step

Array = jax.Array
INITIAL_LOSS = ("first_step", "first_epoch")


class GradNormState(NamedTuple):
  """Weight logits s (w = m·softmax(s)), their optimizer state, the initial losses L(0)."""
  logits: Array
  opt_state: Any
  initial_losses: Array
  has_initial: Array
  epochs: EpochLosses


def gradnorm_logits_grad(logits: Array, norms: Array, losses: Array, initial_losses: Array,
                         alpha: float, eps: float):
  """Gradient of GradNorm's L_grad with respect to the logits s, and L_grad.

  w = m·softmax(s), G_i = w_i ‖g_i‖, Ḡ = mean G, L̃_i = L_i / L_i(0),
  r_i = L̃_i / mean L̃, L_grad = Σ_i |G_i − Ḡ r_i^α| with the target Ḡ r_i^α
  held constant: ∂L_grad/∂w_i = sign(G_i − T_i) ‖g_i‖, chained through the
  softmax.
  """
  m = logits.shape[0]
  z = jax.nn.softmax(logits)
  g_w = z * m * norms
  tilde = jnp.maximum(losses, eps) / jnp.maximum(initial_losses, eps)
  r = tilde / jnp.mean(tilde)
  target = jnp.mean(g_w) * r ** alpha
  d_w = jnp.sign(g_w - target) * norms
  return m * linalg.softmax_vjp(z, d_w), jnp.sum(jnp.abs(g_w - target)), r


def gradnorm(
    alpha: float = 1.5,
    learning_rate: float = 1e-4,
    *,
    optimizer: Union[str, optax.GradientTransformation] = "adam",
    initial_loss: str = "first_step",
    steps_per_epoch: Optional[int] = None,
    eps: float = 1e-8,
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """GradNorm: learn task weights that equalise the weighted gradient norms.

  Task weights w = m·softmax(s) (so Σ w = m, the paper's renormalisation) are
  used for the step (d = Σ_i w_i g_i); then s takes one step of the inner
  optimizer on

      L_grad = Σ_i | w_i ‖g_i‖ − Ḡ · r_i^α |,   Ḡ = mean_j w_j ‖g_j‖,
      r_i = L̃_i / mean_j L̃_j,   L̃_i = L_i / L_i(0),

  with the target Ḡ r_i^α treated as a constant (the paper's and LibMTL's
  choice). ‖g_i‖ is the norm of task i's gradient over all *shared* leaves
  (the paper uses the last shared layer: pass only those leaves as shared, or
  use shared-representation mode as LibMTL's ``rep_grad``).

  L(0): ``initial_loss="first_step"`` (default, the paper) takes the losses of
  the first call; "first_epoch" (LibMTL) uses the mean losses of the first
  epoch, with w = 1 and s frozen during that epoch (epochs delimited by
  ``update(..., epoch=e)`` or ``steps_per_epoch``, as for :func:`dwa`).
  Diagnostics: ``loss_ratios`` (r) and ``gradnorm_loss`` (L_grad).

  Args:
    alpha: asymmetry α (default 1.5, LibMTL's; the paper uses 0.12–1.5).
    learning_rate: learning rate of the inner optimizer (default 1e-4: LibMTL
      trains s with the model's optimizer, Adam with lr 1e-4 by default).
    optimizer: "adam" (default), "sgd" or an optax ``GradientTransformation``.
    initial_loss: "first_step" (default) or "first_epoch".
    steps_per_epoch: for "first_epoch" without ``epoch=``.
    eps: floor of the losses and of L(0) in L̃ (default 1e-8).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. ``num_tasks`` is required. Heads are
      weighted by w by default (weighted-loss convention).

  Differences: the paper parametrises w directly and renormalises after each
  step; like LibMTL we use w = m·softmax(s) (s = 0 initially, w = 1). A
  non-finite s-gradient entry (gradient norms beyond the float range) is
  treated as 0.

  Reference:
    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
  """
  name = "gradnorm"
  m = require_num_tasks(name, num_tasks, "the weight logits and the initial losses")
  base.check_positive(name, alpha=alpha)
  check_eps(name, eps)
  if initial_loss not in INITIAL_LOSS:
    raise ValueError(f"{name}: initial_loss must be one of {INITIAL_LOSS}, got {initial_loss!r}.")
  check_steps_per_epoch(name, steps_per_epoch)
  opt = inner_optimizer(name, optimizer, learning_rate)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="variant",
                             scale_degree=1)

  def init_inner(params, _):
    dtype = state_dtype(params)
    s = jnp.zeros((m,), dtype)
    return GradNormState(s, opt.init(s), jnp.ones((m,), dtype), jnp.zeros((), bool),
                         init_epoch_losses(m, dtype))

  def rule(view, st):
    s = st.logits
    dtype = s.dtype
    losses = view.losses.astype(dtype)
    if initial_loss == "first_step":
      epochs = st.epochs
      capture = ~st.has_initial
      initial = jnp.where(capture, losses, st.initial_losses)
    else:
      epochs = advance_epoch(st.epochs, losses, view.extra.get("epoch"), steps_per_epoch, name)
      capture = (epochs.completed >= 1) & ~st.has_initial
      initial = jnp.where(capture, epochs.last_mean, st.initial_losses)
    active = st.has_initial | capture

    norms = (linalg.safe_norms(view.row_gram) * view.row_scales).astype(dtype)
    grad_s, l_grad, r = gradnorm_logits_grad(s, norms, losses, initial, alpha, eps)
    new_s, new_opt = inner_step(opt, grad_s, st.opt_state, s)
    new_s = jnp.where(active, new_s, s)
    new_opt = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new_opt, st.opt_state)
    w = jnp.where(active, m * jax.nn.softmax(s), jnp.ones((m,), dtype))
    new_state = GradNormState(new_s, new_opt, initial, active, epochs)
    return base.RuleOutput(state=new_state, weights=w,
                           diagnostics={"loss_ratios": jnp.where(active, r, jnp.ones_like(r)),
                                        "gradnorm_loss": jnp.where(active, l_grad, 0.0)})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
