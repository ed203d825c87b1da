"""Auto-Lambda: task weights by a one-step look-ahead meta-gradient (Liu et al., TMLR 2022).

Calling convention: the transformation is built with the validation loss
function, and every ``update`` receives the parameters and a validation batch:

    tx = optax.chain(mo.auto_lambda(loss_fn, virtual_lr=0.1, num_tasks=m),
                     optax.sgd(0.1))
    losses, grads = mo.task_grads(loss_fn, params, *train_batch)
    updates, state = tx.update(grads, state, params, losses=losses,
                               val_batch=val_batch)

``val_batch`` is a tuple of positional arguments for ``val_loss_fn`` (a single
non-tuple value is wrapped). The look-ahead costs one extra gradient of the
(primary-weighted) validation loss per step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src.methods import _common
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype

_META_GRAD = "_auto_lambda_meta_grad"


class AutoLambdaState(NamedTuple):
  """Auto-Lambda's inner state: meta-weights λ, their optimizer state, step count."""
  lam: jax.Array
  opt_state: Any
  step: jax.Array


def auto_lambda_meta_grad(val_loss_fn: Callable[..., jax.Array], grads: Any, params: Any,
                          weights: jax.Array, virtual_lr: jax.Array, val_batch: tuple,
                          primary: jax.Array) -> jax.Array:
  """∂/∂λ of the primary validation loss after a virtual SGD step.

  With θ' = θ − α Σ_i λ_i ∇L_i(θ) (all parameters, heads included) and
  L_val = Σ_i p_i L_i^val,  ∂L_val(θ')/∂λ_i = −α ⟨∇L_i(θ), ∇L_val(θ')⟩, computed
  exactly from the stacked gradients (the reference code approximates this
  inner product by a finite difference of the training losses).
  """
  alpha = jnp.asarray(virtual_lr)
  look_ahead = jax.tree_util.tree_map(
      lambda p, g: (p - alpha.astype(p.dtype) * linalg.combine(weights, g).astype(p.dtype)),
      params, grads)

  def val_objective(p):
    losses = val_loss_fn(p, *val_batch)
    return jnp.dot(primary.astype(losses.dtype), losses)

  g_val = jax.grad(val_objective)(look_ahead)
  m = weights.shape[0]
  acc = linalg.accumulation_dtype(weights.dtype)
  inner = jnp.zeros((m,), acc)
  for g, v in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_val)):
    inner = inner + jnp.dot(g.reshape(m, -1).astype(acc), v.reshape(-1).astype(acc),
                            precision=jax.lax.Precision.HIGHEST)
  return -alpha.astype(acc) * inner


def auto_lambda(val_loss_fn: Callable[..., jax.Array],
                virtual_lr: Union[float, optax.Schedule] = 0.1, *,
                meta_lr: float = 1e-4, init: float = 0.1,
                primary: Optional[Sequence[float]] = None,
                meta_optimizer: Optional[optax.GradientTransformation] = None,
                task_specific=None, weight_heads: Optional[bool] = None,
                num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Auto-Lambda: learn the task weights λ by differentiating through one step.

  Every step first updates the meta-weights with the gradient of the
  validation loss of the *primary* tasks after a virtual SGD step with the
  current weights,

      θ' = θ − α Σ_i λ_i ∇L_i(θ),
      ∂L_val(θ')/∂λ_i = −α ∇L_i(θ)ᵀ ∇L_val(θ')       (see :func:`auto_lambda_meta_grad`),
      λ ← meta_optimizer(λ, ∂L_val/∂λ)                (Adam, lr 1e-4 by default),

  then returns the weighted gradient with the *new* weights, d = Σ_i λ_i g_i
  (heads weighted too: Auto-Lambda trains on the weighted loss Σ λ_i L_i),
  exactly the order of the reference training loop. λ starts at ``init``
  (0.1) and is not constrained.

  Differences from the reference code: the virtual step is plain SGD with
  step α = ``virtual_lr`` (a float or an optax schedule of the step count);
  the reference mirrors the outer SGD optimizer (its current learning rate,
  momentum buffer and weight decay), which this transformation cannot see.
  The meta-gradient's inner product is exact instead of a finite difference.
  The validation batch is any independent batch (the reference uses a second
  shuffled pass over the training set).

  Calling convention (see the module docstring): ``update(grads, state,
  params, val_batch=batch)``; ``params`` are required.

  Args:
    val_loss_fn: ``val_loss_fn(params, *val_batch) -> losses (m,)`` (usually
      the training loss function).
    virtual_lr: α of the virtual step (default 0.1; ideally the outer
      optimizer's learning rate), a float or a schedule.
    meta_lr: Adam learning rate of λ (default 1e-4, the reference's dense
      prediction setting).
    init: initial value of every λ_i (default 0.1).
    primary: weights p_i of the tasks in the validation objective (default:
      all ones, the multi-task setting; a 0/1 vector selects primary tasks
      for auxiliary learning).
    meta_optimizer: an optax transformation for λ replacing Adam(meta_lr).
    task_specific, nonfinite: see :func:`mtl_optax.make_aggregator`.
    weight_heads: default True (weighted-loss convention).
    num_tasks: m, required (λ has shape (m,)).

  Reference:
    Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
    Relationships", TMLR 2022 (code: lorenmt/auto-lambda).
  """
  if not callable(val_loss_fn):
    raise ValueError(f"auto_lambda: val_loss_fn must be callable, got {val_loss_fn!r}.")
  if not callable(virtual_lr):
    base.check_positive("auto_lambda", virtual_lr=virtual_lr)
  if meta_optimizer is None:
    base.check_positive("auto_lambda", meta_lr=meta_lr)
    meta_optimizer = optax.adam(meta_lr)
  if not (isinstance(init, (int, float)) and np.isfinite(init)):
    raise ValueError(f"auto_lambda: init must be a finite number, got {init!r}.")
  m_init = require_num_tasks("auto_lambda", num_tasks)
  if primary is None:
    primary_arr = np.ones((m_init,))
  else:
    primary_arr = np.asarray(primary, dtype=np.float64)
    if primary_arr.shape != (m_init,) or not np.all(np.isfinite(primary_arr)):
      raise ValueError(
          f"auto_lambda: primary must be {m_init} finite task weights, got {primary!r}.")
  weight_heads = True if weight_heads is None else bool(weight_heads)
  info = base.AggregatorInfo(name="auto_lambda", scale_degree=1)

  def init_inner(params, m):
    lam = jnp.full((m_init,), float(init), state_dtype(params))
    return AutoLambdaState(lam=lam, opt_state=meta_optimizer.init(lam),
                           step=jnp.zeros((), jnp.int32))

  def rule(view, state):
    meta_grad = view.extra.get(_META_GRAD)
    if meta_grad is None:  # only while init() traces the state's shape
      meta_grad = jnp.zeros_like(state.lam)
    meta_grad = meta_grad.astype(state.lam.dtype)
    upd, opt_state = meta_optimizer.update(meta_grad, state.opt_state, state.lam)
    lam = optax.apply_updates(state.lam, upd)
    ok = jnp.all(jnp.isfinite(lam))
    new_state = AutoLambdaState(
        lam=jnp.where(ok, lam, state.lam),
        opt_state=jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), opt_state,
                                         state.opt_state),
        step=state.step + 1)
    return base.RuleOutput(state=new_state, weights=new_state.lam.astype(view.gram.dtype),
                           diagnostics={"meta_grad": meta_grad})

  tx = base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                            weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("auto_lambda needs the parameters for its virtual step: "
                       "call update(grads, state, params, val_batch=batch).")
    if "val_batch" not in extra or extra["val_batch"] is None:
      raise ValueError("auto_lambda needs a validation batch: call "
                       "update(grads, state, params, val_batch=batch) (a tuple of the "
                       "positional arguments of val_loss_fn).")
    if not isinstance(state, base.AggregatorState):
      raise TypeError("auto_lambda: state must come from this transformation's init.")
    val_batch = extra.pop("val_batch")
    val_batch = val_batch if isinstance(val_batch, tuple) else (val_batch,)
    _common.stacked_leaves("auto_lambda", updates)
    m = base.num_tasks_of(updates, "auto_lambda")
    if m != m_init:
      raise ValueError(f"auto_lambda: the gradients have m={m} tasks but num_tasks={m_init}.")
    inner = state.inner
    alpha = virtual_lr(inner.step) if callable(virtual_lr) else virtual_lr
    out = jax.eval_shape(lambda p, b: val_loss_fn(p, *b), params, val_batch)
    if getattr(out, "shape", None) != (m,):
      raise ValueError(f"auto_lambda: val_loss_fn must return the ({m},) task losses, got "
                       f"{getattr(out, 'shape', out)}.")
    meta_grad = auto_lambda_meta_grad(val_loss_fn, updates, params, inner.lam,
                                      jnp.asarray(alpha, inner.lam.dtype), val_batch,
                                      jnp.asarray(primary_arr, inner.lam.dtype))
    extra[_META_GRAD] = meta_grad
    return tx.update(updates, state, params, **extra)

  update_fn.mtl_info = tx.update.mtl_info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
