"""MOML: multi-objective meta learning of the task weights (Ye et al., NeurIPS 2021).

Calling convention (as :func:`mtl_optax.auto_lambda`): the transformation is
built with the validation loss function, and every ``update`` receives the
parameters and a validation batch:

    tx = optax.chain(mo.moml(loss_fn, num_tasks=m), optax.sgd(0.1))
    losses, grads = mo.task_grads(loss_fn, params, *train_batch)
    updates, state = tx.update(grads, state, params, losses=losses,
                               val_batch=val_batch)

or ``mo.make_train_step(loss_fn, tx)(params, state, *train_batch,
val_batch=val_batch)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src import task_grads as task_grads_lib
from mtl_optax._src.methods import _common
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype

Array = jax.Array
_META_GRAD = "_moml_meta_grad"


class MOMLState(NamedTuple):
  """Task logits α (weights softmax(α)), their optimizer state, step count."""
  logits: Array
  opt_state: Any
  step: Array


def moml_hypergradients(val_loss_fn: Callable[..., Array], grads: Any, params: Any,
                        logits: Array, inner_lr: Array, val_batch: tuple) -> Array:
  """Per-task hypergradients ∂L_i^val(θ'(α))/∂α after one virtual SGD step.

  With s = softmax(α) and θ' = θ − η Σ_j s_j ∇L_j(θ) (all parameters),

      H[i, :] = −η ∇L_i^val(θ')ᵀ [∇L_1(θ) … ∇L_m(θ)] J_softmax(α),

  an ``(m, m)`` matrix (row i: the gradient of task i's validation loss with
  respect to α).
  """
  s = jax.nn.softmax(logits)
  look_ahead = jax.tree_util.tree_map(
      lambda p, g: p - (inner_lr * linalg.combine(s, g)).astype(p.dtype), params, grads)
  _, val_grads = task_grads_lib.task_grads(val_loss_fn, look_ahead, *val_batch)
  cross = linalg.cross_gram(jax.tree_util.tree_leaves(val_grads),
                            jax.tree_util.tree_leaves(grads))
  s = s.astype(cross.dtype)
  jac_softmax = jnp.diag(s) - jnp.outer(s, s)
  return -inner_lr.astype(cross.dtype) * cross @ jac_softmax


def moml(val_loss_fn: Callable[..., Array], inner_lr: Union[float, optax.Schedule] = 0.1, *,
         meta_lr: float = 1e-3, meta_optimizer: Optional[optax.GradientTransformation] = None,
         task_specific=None, weight_heads: Optional[bool] = None,
         num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """MOML: task weights softmax(α) updated by a multi-objective hypergradient.

  The bilevel problem min_α (L_1^val(θ*(α)), …, L_m^val(θ*(α))) s.t.
  θ*(α) = argmin_θ Σ_i softmax_i(α) L_i(θ) is solved with one inner step:

      θ' = θ − η Σ_j s_j ∇L_j(θ),                       s = softmax(α)
      h_i = ∂L_i^val(θ')/∂α = −η J_softmax(α) [∇L_j(θ)ᵀ ∇L_i^val(θ')]_j
      ĥ_i = h_i / ‖h_i‖,   γ = argmin_{γ∈Δ} ‖Σ_i γ_i ĥ_i‖²   (MGDA, l2-normalised)
      α ← meta_optimizer(α, Σ_i γ_i ĥ_i)                  (Adam, lr 1e-3)

  then the update is d = Σ_i softmax_i(α) g_i with the *new* α (heads
  weighted: the model is trained on Σ_i s_i L_i), as in LibMTL's training loop.
  α starts at 0 (uniform weights). Cost per step: one Jacobian of the
  validation losses at θ' (m backward passes). Diagnostics: ``meta_grad``
  (Σ γ_i ĥ_i) and ``mgda_weights`` (γ).

  Differences from LibMTL (``Trainer.bacth_forward_MOML``): the inner
  gradients ∇L_j(θ) are the ``grads`` passed to ``update`` (the training
  batch), where LibMTL draws a separate half-size inner batch and updates the
  model on a third batch; the virtual step is plain SGD with step
  ``inner_lr`` (one inner step, as LibMTL supports). A zero hypergradient row
  stays zero after normalisation (LibMTL divides by zero). A non-finite
  validation gradient skips the step (zero update, state kept).

  Args:
    val_loss_fn: ``val_loss_fn(params, *val_batch) -> losses (m,)``.
    inner_lr: η of the virtual step (default 0.1, LibMTL's ``--inner_lr``), a
      float or a schedule of the step count.
    meta_lr: Adam learning rate of α (default 1e-3, LibMTL's ``--outer_lr``).
    meta_optimizer: an optax transformation for α replacing Adam(meta_lr).
    task_specific, nonfinite: see :func:`mtl_optax.make_aggregator`.
    weight_heads: default True (weighted-loss convention).
    num_tasks: m, required.

  Reference:
    Ye et al., "Multi-Objective Meta Learning", NeurIPS 2021
    (implementation: LibMTL, median-research-group/LibMTL, ``trainer.py``).
  """
  name = "moml"
  if not callable(val_loss_fn):
    raise ValueError(f"{name}: val_loss_fn must be callable, got {val_loss_fn!r}.")
  if not callable(inner_lr):
    base.check_positive(name, inner_lr=inner_lr)
  if meta_optimizer is None:
    base.check_positive(name, meta_lr=meta_lr)
    meta_optimizer = optax.adam(meta_lr)
  m = require_num_tasks(name, num_tasks, "the task logits")
  weight_heads = True if weight_heads is None else bool(weight_heads)
  # Degree 1 in order: Jᵀw with bounded weights (softmax of meta-learned logits).
  info = base.AggregatorInfo(name=name, scale_degree=1)

  def init_inner(params, _):
    logits = jnp.zeros((m,), state_dtype(params))
    return MOMLState(logits, meta_optimizer.init(logits), jnp.zeros((), jnp.int32))

  def rule(view, st):
    extra = view.extra.get(_META_GRAD)
    if extra is None:  # only while init() traces the state's shape
      extra = (jnp.zeros_like(st.logits), jnp.full((m,), 1.0 / m, st.logits.dtype),
               jnp.ones((), bool))
    meta_grad, gamma = (x.astype(st.logits.dtype) for x in extra[:2])
    upd, opt_state = meta_optimizer.update(meta_grad, st.opt_state, st.logits)
    logits = optax.apply_updates(st.logits, upd)
    ok = extra[2] & jnp.all(jnp.isfinite(logits))
    keep = lambda new, old: jnp.where(ok, new, old)
    new_state = MOMLState(keep(logits, st.logits),
                          jax.tree_util.tree_map(keep, opt_state, st.opt_state),
                          st.step + ok.astype(jnp.int32))
    weights = jnp.where(ok, jax.nn.softmax(new_state.logits), 0.0).astype(view.gram.dtype)
    return base.RuleOutput(state=new_state, weights=weights,
                           diagnostics={"meta_grad": meta_grad, "mgda_weights": gamma})

  tx = base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                            weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError(f"{name} needs the parameters for its virtual step: "
                       "call update(grads, state, params, val_batch=batch).")
    if not isinstance(state, base.AggregatorState):
      raise TypeError(f"{name}: state must come from this transformation's init.")
    _common.stacked_leaves(name, updates)
    val_batch = _common.batch_arg(name, extra, "val_batch", "a validation batch")
    if base.num_tasks_of(updates, name) != m:
      raise ValueError(f"{name}: the gradients have m={base.num_tasks_of(updates, name)} "
                       f"tasks but num_tasks={m}.")
    _common.check_task_losses_fn(name, val_loss_fn, params, val_batch, m)
    st = state.inner
    eta = inner_lr(st.step) if callable(inner_lr) else inner_lr
    hyper = moml_hypergradients(val_loss_fn, updates, params, st.logits,
                                jnp.asarray(eta, st.logits.dtype), val_batch)
    norms = jnp.linalg.norm(hyper, axis=1)
    unit = linalg.safe_div(hyper, norms[:, None])
    gamma = linalg.min_norm_on_simplex(unit @ unit.T).x
    extra[_META_GRAD] = (gamma @ unit, gamma, jnp.all(jnp.isfinite(hyper)))
    return tx.update(updates, state, params, **extra)

  update_fn.mtl_info = tx.update.mtl_info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
