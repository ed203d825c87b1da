"""FORUM: a first-order multi-gradient method for multi-objective bilevel learning.

Ye et al., ECAI 2024. The loss weights softmax(α) (upper-level variable) and
the model θ (lower level) are updated together from the validation gradients
and a value-function constraint estimated by a few inner SGD steps:

    tx = optax.chain(mo.forum(loss_fn, num_tasks=m), optax.sgd(0.1))
    losses, grads = mo.task_grads(loss_fn, params, *train_batch)
    updates, state = tx.update(grads, state, params, losses=losses,
                               train_batch=train_batch, val_batch=val_batch)

or ``mo.make_train_step(loss_fn, tx)(params, state, *train_batch,
train_batch=train_batch, val_batch=val_batch)``. ``train_batch`` must be the
batch ``grads`` and ``losses`` come from (the inner steps re-evaluate it).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

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
_PROPOSAL = "_forum_proposal"
# LibMTL stops the inner loop once the weighted loss exceeds this (a diverging inner lr).
_INNER_LOSS_LIMIT = 1e5
# The 1e-8 LibMTL adds to ‖∇q‖² in π and in the linear term.
_Q_EPS = 1e-8


class FORUMState(NamedTuple):
  """Loss logits α, their optimizer state, the averaged QP weights λ̄, step count."""
  logits: Array
  opt_state: Any
  lam: Array
  step: Array


def forum_qp(unit_gram: Array, unit_q: Array, q_sq: Array, phi: float,
             iters: int = 30) -> tuple[Array, Array, Array]:
  """FORUM's direction-finding QP, in the lifted form LibMTL solves with cvxpy.

      min_{λ∈Δ, ν≥0}  ‖Σ_i λ_i ĝ_i + ν ∇q‖² − φ(‖∇q‖² + ε) ν   s.t.  ν ≥ Σ_i λ_i π_i,
      π_i = φ − ⟨ĝ_i, ∇q⟩ / (‖∇q‖² + ε)

  with ĝ_i the unit validation gradients and ∇q the gradient of the
  value-function gap. Solved by :func:`linalg.dense_qp` in ν' = ν‖∇q‖ (the
  data are then O(1)); for ∇q = 0 the ν term is void and λ is the min-norm
  point of the ĝ_i (the QP is unbounded in ν there).

  Args:
    unit_gram: ``(m, m)`` Gram matrix of the ĝ_i.
    unit_q: ``(m,)`` inner products ⟨ĝ_i, ∇q⟩.
    q_sq: ‖∇q‖².
    phi: φ.
    iters: interior-point iterations.

  Returns:
    ``(λ, π, residual)``.
  """
  m = unit_gram.shape[0]
  dtype = unit_gram.dtype
  pi = phi - unit_q / (q_sq + _Q_EPS)
  degenerate = q_sq <= linalg.TINY
  q_norm = jnp.sqrt(jnp.where(degenerate, 1.0, q_sq))
  cross = unit_q / q_norm
  quad = jnp.zeros((m + 1, m + 1), dtype)
  quad = quad.at[:m, :m].set(unit_gram).at[:m, m].set(cross).at[m, :m].set(cross)
  quad = 2.0 * quad.at[m, m].set(1.0)
  lin = jnp.zeros((m + 1,), dtype).at[m].set(-phi * (q_sq + _Q_EPS) / q_norm)
  ineq = jnp.concatenate([-jnp.eye(m + 1, dtype=dtype),
                          jnp.concatenate([q_norm * pi, -jnp.ones((1,), dtype)])[None]])
  eq = jnp.concatenate([jnp.ones((m,), dtype), jnp.zeros((1,), dtype)])[None]
  sol = linalg.dense_qp(quad, lin, ineq, jnp.zeros((m + 2,), dtype), eq,
                        jnp.ones((1,), dtype), iters=iters)
  lam = jnp.maximum(sol.x[:m], 0.0)
  lam = linalg.safe_div(lam, jnp.sum(lam), fill=1.0 / m)
  fallback = linalg.min_norm_on_simplex(unit_gram)
  lam = jnp.where(degenerate, fallback.x, lam)
  residual = jnp.where(degenerate, fallback.residual, sol.residual)
  return lam, pi, residual


def forum(loss_fn: Callable[..., Array], inner_lr: float = 0.1, inner_steps: int = 5,
          phi: float = 0.1, *, meta_lr: float = 1e-3,
          meta_optimizer: Optional[optax.GradientTransformation] = None,
          ema_schedule: Optional[Callable[[Array], Array]] = None,
          val_loss_fn: Optional[Callable[..., Array]] = None,
          qp_iters: int = 30, num_tasks: Optional[int] = None):
  """FORUM: first-order multi-objective bilevel optimisation of the loss weights.

  Lower level: θ*(α) = argmin_θ f(α, θ) = Σ_i s_i L_i(θ), s = softmax(α).
  Upper level: min_{α,θ} (L_1^val(θ), …, L_m^val(θ)) s.t. q(α, θ) ≤ 0, with
  the value-function gap q(α, θ) = f(α, θ) − f(α, θ_T), θ_T after
  ``inner_steps`` SGD steps of f from θ (step ``inner_lr``). Each step:

      ∇q = (J_softmax(α)ᵀ (L(θ) − L(θ_T)),  Σ_i s_i g_i)          (w.r.t. (α, θ))
      ĝ_i = ∇L_i^val(θ) / ‖∇L_i^val(θ)‖                          (no α component)
      (λ̃, ν̃) = the QP of :func:`forum_qp`,   π_i = φ − ⟨ĝ_i, ∇q⟩ / (‖∇q‖² + ε)
      λ̄ ← λ̄ + ρ_k (λ̃ − λ̄),   ρ_k = (k + 1)^(−3/4)   (λ̄₀ = 0)
      ν = max(Σ_i λ̄_i π_i, 0)
      d = Σ_i λ̄_i ĝ_i + ν Σ_i s_i g_i,   α ← meta_optimizer(α, ν ∂q/∂α)

  ``d`` covers every parameter (heads included, as LibMTL updates the whole
  model with it). The exposed ``weights`` are ν s (the coefficients of the
  training gradients); ``lambda`` (λ̄), ``val_coefficients`` (λ̄_i / ‖∇L_i^val‖),
  ``nu``, ``pi``, ``value_gap`` (L(θ) − L(θ_T)) and ``qp_residual`` are in the
  diagnostics. Cost per step: ``inner_steps`` + 1 gradients of the weighted
  training loss and one Jacobian of the validation losses.

  Differences from LibMTL (``Trainer.bacth_forward_FORUM``): the QP is solved
  in the graph (:func:`mtl_optax.linalg.dense_qp`) instead of by cvxpy; ρ_k
  counts steps (LibMTL counts epochs: pass ``ema_schedule=lambda k: (k //
  steps_per_epoch + 1.0) ** -0.75``); the inner and outer batches are the ones
  passed (LibMTL draws two half-size batches). A non-finite validation
  gradient or QP solution skips the step (zero update, state kept).

  Args:
    loss_fn: ``loss_fn(params, *batch) -> losses (m,)``, used on
      ``train_batch`` for the inner steps (and on ``val_batch`` unless
      ``val_loss_fn`` is given).
    inner_lr: step of the inner SGD steps (default 0.1, LibMTL ``--inner_lr``).
    inner_steps: T (default 5, LibMTL ``--inner_step``).
    phi: φ (default 0.1, LibMTL ``--FORUM_phi``).
    meta_lr: Adam learning rate of α (default 1e-3, LibMTL ``--outer_lr``).
    meta_optimizer: an optax transformation for α replacing Adam(meta_lr).
    ema_schedule: ρ as a function of the step count (default (k+1)^(−3/4)).
    val_loss_fn: loss function of the upper level (default ``loss_fn``).
    qp_iters: interior-point iterations of the QP (default 30).
    num_tasks: m, required.

  Reference:
    Ye et al., "A First-Order Multi-Gradient Algorithm for Multi-Objective
    Bi-Level Optimization", ECAI 2024 (implementation: LibMTL,
    median-research-group/LibMTL, ``trainer.py``).
  """
  name = "forum"
  val_loss_fn = loss_fn if val_loss_fn is None else val_loss_fn
  for key, fn in (("loss_fn", loss_fn), ("val_loss_fn", val_loss_fn)):
    if not callable(fn):
      raise ValueError(f"{name}: {key} must be callable, got {fn!r}.")
  base.check_positive(name, inner_lr=inner_lr, phi=phi)
  if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
    raise ValueError(f"{name}: inner_steps must be a positive int, got {inner_steps!r}.")
  if not isinstance(qp_iters, int) or qp_iters < 1:
    raise ValueError(f"{name}: qp_iters must be a positive int, got {qp_iters!r}.")
  if meta_optimizer is None:
    base.check_positive(name, meta_lr=meta_lr)
    meta_optimizer = optax.adam(meta_lr)
  if ema_schedule is None:
    ema_schedule = lambda k: (k + 1.0) ** -0.75
  elif not callable(ema_schedule):
    raise ValueError(f"{name}: ema_schedule must be callable, got {ema_schedule!r}.")
  m = require_num_tasks(name, num_tasks, "the loss logits and the averaged QP weights")
  info = base.AggregatorInfo(name=name, needs_losses=True)

  def init_inner(params, _):
    dtype = state_dtype(params)
    logits = jnp.zeros((m,), dtype)
    return FORUMState(logits, meta_optimizer.init(logits), jnp.zeros((m,), dtype),
                      jnp.zeros((), jnp.int32))

  def rule(view, st):
    dtype = st.logits.dtype
    prop = view.extra.get(_PROPOSAL)
    if prop is None:  # only while init() traces the state's shape
      zeros = jnp.zeros((m,), dtype)
      prop = dict(lam=zeros, nu=jnp.zeros((), dtype), meta_grad=zeros, pi=zeros,
                  value_gap=zeros, val_coefficients=zeros, qp_residual=jnp.zeros((), dtype),
                  ok=jnp.ones((), bool))
    prop = {k: v.astype(dtype) if k != "ok" else v for k, v in prop.items()}
    upd, opt_state = meta_optimizer.update(prop["meta_grad"], st.opt_state, st.logits)
    logits = optax.apply_updates(st.logits, upd)
    ok = prop["ok"] & jnp.all(jnp.isfinite(logits))
    keep = lambda new, old: jnp.where(ok, new, old)
    new_state = FORUMState(keep(logits, st.logits),
                           jax.tree_util.tree_map(keep, opt_state, st.opt_state),
                           keep(prop["lam"], st.lam), st.step + ok.astype(jnp.int32))
    weights = jnp.where(ok, prop["nu"] * jax.nn.softmax(st.logits), 0.0)
    diag = {k: v for k, v in prop.items() if k not in ("ok", "meta_grad")}
    diag["lambda"] = diag.pop("lam")
    diag["meta_grad"] = prop["meta_grad"]
    diag["val_finite"] = prop["ok"]
    return base.RuleOutput(state=new_state, weights=weights.astype(view.gram.dtype),
                           diagnostics=diag)

  tx = base.make_aggregator(rule, info, init_inner=init_inner, weight_heads=True,
                            num_tasks=num_tasks)

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError(f"{name} needs the parameters for its inner steps: call "
                       "update(grads, state, params, losses=..., train_batch=..., "
                       "val_batch=...).")
    if not isinstance(state, base.AggregatorState):
      raise TypeError(f"{name}: state must come from this transformation's init.")
    train_leaves = _common.stacked_leaves(name, updates)
    if base.num_tasks_of(updates, name) != m:
      raise ValueError(f"{name}: the gradients have m={base.num_tasks_of(updates, name)} "
                       f"tasks but num_tasks={m}.")
    losses = base.check_losses(extra.get("losses"), m, name, True)
    train_batch = _common.batch_arg(name, extra, "train_batch",
                                    "the training batch of the gradients")
    val_batch = _common.batch_arg(name, extra, "val_batch", "a validation batch")
    _common.check_task_losses_fn(name, loss_fn, params, train_batch, m)
    _common.check_task_losses_fn(name, val_loss_fn, params, val_batch, m)
    st = state.inner
    dtype = st.logits.dtype
    s = jax.nn.softmax(st.logits)

    # Inner loop: T SGD steps on Σ s_i L_i (s fixed), stopped on divergence.
    weighted = lambda p: jnp.dot(s.astype(dtype), loss_fn(p, *train_batch).astype(dtype))

    def inner(_, carry):
      p, stopped = carry
      value, g = jax.value_and_grad(weighted)(p)
      stopped = stopped | ~(value <= _INNER_LOSS_LIMIT)
      p = jax.tree_util.tree_map(
          lambda x, gx: jnp.where(stopped, x, x - jnp.asarray(inner_lr, x.dtype) * gx), p, g)
      return p, stopped

    theta_t, _ = jax.lax.fori_loop(0, inner_steps, inner, (params, jnp.zeros((), bool)))
    value_gap = losses.astype(dtype) - loss_fn(theta_t, *train_batch).astype(dtype)
    q_alpha = linalg.softmax_vjp(s, value_gap)

    _, val_grads = task_grads_lib.task_grads(val_loss_fn, params, *val_batch)
    val_leaves = jax.tree_util.tree_leaves(val_grads)
    val_gram = linalg.gram_matrix(val_leaves)
    cross = linalg.cross_gram(val_leaves, train_leaves)     # ⟨∇L_i^val, g_j⟩
    train_gram = linalg.gram_matrix(train_leaves)
    acc = val_gram.dtype
    s_acc, q_alpha_acc = s.astype(acc), q_alpha.astype(acc)
    val_norms = linalg.safe_norms(val_gram)
    inv = linalg.safe_div(jnp.ones_like(val_norms), val_norms)
    unit_gram = val_gram * inv[:, None] * inv[None, :]
    unit_q = cross @ s_acc * inv
    q_sq = jnp.dot(q_alpha_acc, q_alpha_acc) + s_acc @ train_gram @ s_acc
    lam_new, pi, residual = forum_qp(unit_gram, unit_q, q_sq, phi, qp_iters)
    rho = jnp.asarray(ema_schedule(st.step.astype(acc)), acc)
    lam = st.lam.astype(acc) + rho * (lam_new - st.lam.astype(acc))
    nu = jnp.maximum(jnp.dot(lam, pi), 0.0)
    val_coef = lam * inv
    prop = dict(lam=lam, nu=nu, meta_grad=nu * q_alpha_acc, pi=pi, value_gap=value_gap,
                val_coefficients=val_coef, qp_residual=residual)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in prop.values()]))
    ok = ok & jnp.all(jnp.isfinite(val_gram))
    prop["ok"] = ok
    extra[_PROPOSAL] = prop
    out, new_state = tx.update(updates, state, params, **extra)
    apply_val = ok & (new_state.diagnostics["nonfinite_tasks"] == 0)
    coef = jnp.where(apply_val, val_coef, 0.0)
    out = jax.tree_util.tree_map(
        lambda u, v: u + jnp.where(apply_val, linalg.combine(coef, v), 0.0).astype(u.dtype),
        out, val_grads)
    return out, new_state

  update_fn.mtl_info = tx.update.mtl_info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
