"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg


class NashMTLState(NamedTuple):
  """Nash-MTL state: the last solved (unclipped) weights and the step counter."""
  weights: jax.Array
  step: jax.Array


def _row_units(w, log2_row_scales):
  """a_i = w_i · 2^{s_i}: weights of the per-row-scaled rows (Σ w_i g_i = Σ a_i r_i)."""
  pos = w > 0
  return jnp.where(pos, jnp.exp2(jnp.where(pos, jnp.log2(jnp.where(pos, w, 1.0)), 0.0)
                                 + log2_row_scales), 0.0)


def _solve(gram, log2_s, prev, optim_niter, tol):
  """The bargaining solution from the warm start ``prev``: (weights, residual, iterations)."""
  sol = linalg.nash_system(gram, 1.0, log2_row_scales=log2_s, w0=prev,
                           max_iters=optim_niter, tol=tol)
  return sol.x, sol.residual, sol.iterations


# Jitted: an eager update compiles this branch once (see base._gram_and_finite).
@functools.partial(jax.jit, static_argnames=("optim_niter", "tol"))
def _solve_or_reuse(update, gram, log2_s, prev, optim_niter, tol):
  """The bargaining solution when ``update``, else ``prev`` (one branch executes)."""
  return jax.lax.cond(
      update, lambda: _solve(gram, log2_s, prev, optim_niter, tol),
      lambda: (prev, nash_residual(prev, gram, log2_s), jnp.zeros((), jnp.int32)))


def nash_residual(w, row_gram, log2_row_scales):
  """max_i |w_i (Gw)_i − 1| over the non-zero gradients (0 at the Nash solution)."""
  a = _row_units(w, log2_row_scales)
  nz = jnp.diagonal(row_gram) > 0
  return jnp.max(jnp.where(nz, jnp.abs(a * (row_gram @ a) - 1.0), 0.0))


def nash_mtl(max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20, *,
             tol: Optional[float] = None, task_specific=None,
             weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
             nonfinite: str = "skip"):
  """Nash-MTL: the Nash bargaining solution of the tasks.

  The update d = Jᵀw maximises Σ_i log(g_iᵀd) over a ball; its weights are
  the positive solution of

      G w = 1 / w      (elementwise; g_iᵀd = 1/w_i > 0 for every task),

  so d is non-conflicting and invariant to the scale of each task gradient.
  Solved in JAX inside jit by damped Newton on the equivalent strictly convex
  problem min ½wᵀGw − Σ log w_i (:func:`mtl_optax.linalg.nash_system`, warm
  started from the previous weights), instead of the paper's sequence of
  cvxpy/ECOS problems on the host. Then ‖d‖ is clipped to ``max_norm``.

  Conventions (checked against the peers): the paper's code, LibMTL and
  TorchJD divide G by its Frobenius norm before calling cvxpy, but the
  factor cancels in their constraints, so their weights solve the equations
  for the *true* G, as ours do: ‖Jᵀw‖ = √m before clipping, i.e. with
  max_norm = 1 and m ≥ 2 the update always has norm 1 (TorchJD's published
  value on [[−4, 1, 1], [6, 1, 1]], [0.0542, 0.7061, 0.7061], is this
  solution clipped to norm 1). Clipping uses the current gradients, also when
  the weights are reused (``update_weights_every`` > 1), as the paper's
  ``clip_grad_norm_`` and TorchJD do. Differences: our solver converges to
  the exact solution (residual in the diagnostics; the peers stop their
  convex-concave iterations after ``optim_niter`` problems or when the
  weights move by < 1e-6); zero gradients get weight 0; when no solution
  exists (Pareto-stationary gradients: Jᵀz = 0 for some z ≥ 0, z ≠ 0; the
  peers' ECOS then fails and they keep the previous weights) w = 0 and d = 0
  (no update improves every task: the disagreement point), flagged by the
  residual; the next solve starts cold.

  Args:
    max_norm: clip ‖d‖ to this value; 0 disables clipping (default 1.0).
    update_weights_every: solve every k steps, reuse the last weights in
      between (default 1).
    optim_niter: Newton-step budget of the solver (default 20, the paper's
      number of convex iterations; 5–10 Newton steps are typical).
    tol: relative residual max_i |w_i (Gw)_i − 1| at which the solver stops
      (default 100·eps of the dtype).
    task_specific, nonfinite: see :func:`mtl_optax.make_aggregator`.
    weight_heads: False/None (default): each head gets its own task gradient;
      True: head i gets α_i g_i with the unclipped weights α (``max_norm``
      clips the shared update only), as the authors' code and LibMTL's
      ``Nash_MTL`` (which back-propagate Σ α_i L_i, then clip the shared
      parameters' gradient).
    num_tasks: m (required: the state keeps the last weights).

  Diagnostics: ``residual`` (of the weights used, against the current
  gradients), ``iterations`` (0 when the weights were reused), ``updated``.

  Reference:
    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
  """
  base.check_nonnegative("nash_mtl", max_norm=max_norm)
  for k, v in (("update_weights_every", update_weights_every), ("optim_niter", optim_niter)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"nash_mtl: {k} must be a positive int, got {v!r}.")
  if tol is not None:
    base.check_positive("nash_mtl", tol=tol)
  if num_tasks is None:
    raise ValueError("nash_mtl: pass num_tasks=m (its state keeps the last task weights).")
  # ‖Jᵀw‖ = √m before the clip whatever the gradients' scale: degree 0.
  info = base.AggregatorInfo(name="nash_mtl", scale_degree=0)

  def init_inner(params, m):
    leaves = jax.tree_util.tree_leaves(params)
    dtype = linalg.accumulation_dtype(leaves[0].dtype if leaves else jnp.float32)
    return NashMTLState(weights=jnp.ones((m,), dtype), step=jnp.zeros((), jnp.int32))

  def rule(view, inner):
    gram = view.row_gram
    dtype = gram.dtype
    log2_s = jnp.log2(view.row_scales).astype(dtype)
    prev = inner.weights.astype(dtype)

    update = (inner.step % update_weights_every) == 0
    if update_weights_every == 1:
      w, residual, iterations = _solve(gram, log2_s, prev, optim_niter, tol)
    else:
      w, residual, iterations = _solve_or_reuse(update, gram, log2_s, prev, optim_niter, tol)
    scale = jnp.ones((), dtype)
    if max_norm > 0:
      a = _row_units(w, log2_s)
      norm = jnp.sqrt(jnp.maximum(a @ gram @ a, 0.0))
      scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    new_inner = NashMTLState(weights=w.astype(inner.weights.dtype), step=inner.step + 1)
    # The clip is a clip of the shared update only: heads weighted by the method get
    # α_i g_i (the authors' code and LibMTL back-propagate Σ α_i L_i, then clip the
    # shared parameters' gradient).
    return base.RuleOutput(state=new_inner, weights=w * scale,
                           head_weights=w.astype(dtype) if weight_heads else None,
                           diagnostics={"residual": residual, "iterations": iterations,
                                        "updated": update})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)
