"""SDMGrad: stochastic direction-oriented multi-objective gradient (Xiao et al., NeurIPS 2023).

Also home of the calling convention shared by the *double-sampling* methods
(SDMGrad, MoDo), whose weight update needs two further, independent
stochastic gradients besides the one the update is built from:

    losses, grads, weight_grads = mo.multi_batch_task_grads(
        loss_fn, params, [batch, batch_a, batch_b])
    update, state = tx.update(grads, state, params, losses=losses,
                              weight_grads=weight_grads)

``grads`` (first batch) forms the update, ``weight_grads = (grads_a,
grads_b)`` (two more batches, same structure) only enter the weight update
through their cross Gram matrix J_a J_bᵀ, an unbiased estimate of J Jᵀ when
the batches are independent.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src import task_grads as task_grads_lib
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype

HEAD_MODES = ("mean", "main")


def multi_batch_task_grads(loss_fn: Callable[..., Any], params: Any,
                           batches: Sequence[Any], **task_grads_kwargs):
  """Stacked per-task gradients on a main batch and two independent batches.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> losses (m,)``, as for
      :func:`mtl_optax.task_grads`.
    params: the parameters.
    batches: a sequence of exactly three batches (each a tuple of positional
      arguments for ``loss_fn``, or a single argument): ``(main, a, b)``.
    **task_grads_kwargs: ``mode``, ``chunk_size`` for ``task_grads``.

  Returns:
    ``(losses, grads, (grads_a, grads_b))``: the main batch's losses and
    stacked gradients, and the two extra stacked gradients, ready for
    ``tx.update(grads, state, params, losses=losses, weight_grads=...)`` of
    :func:`mtl_optax.sdmgrad` and :func:`mtl_optax.modo`. The cost is three
    ``task_grads`` calls.
  """
  if task_grads_kwargs.get("has_aux"):
    raise ValueError("multi_batch_task_grads: has_aux is not supported; return the losses only.")
  if task_grads_kwargs.get("has_state"):
    raise ValueError(
        "multi_batch_task_grads: has_state is not supported: its three forward passes (main "
        "batch and two weight batches) would give three new model states. Compute the main "
        "batch with mo.task_grads(..., has_state=True) and the two weight batches with "
        "task_grads on a loss that discards its new state.")
  if len(batches) != 3:
    raise ValueError(
        "multi_batch_task_grads: pass exactly three batches (main, a, b); "
        f"got {len(batches)}.")
  outs = []
  for batch in batches:
    args = batch if isinstance(batch, tuple) else (batch,)
    outs.append(task_grads_lib.task_grads(loss_fn, params, *args, **task_grads_kwargs))
  (losses, grads), (_, grads_a), (_, grads_b) = outs
  return losses, grads, (grads_a, grads_b)


def check_weight_grads(name: str, grads: Any, weight_grads: Any):
  """Validates ``weight_grads=`` against the main stacked gradients (clear errors)."""
  if weight_grads is None:
    raise ValueError(
        f"{name} needs two more independent stochastic gradients for its weight update: "
        "call update(grads, state, params, weight_grads=(grads_a, grads_b)), e.g. from "
        "mo.multi_batch_task_grads(loss_fn, params, [batch, batch_a, batch_b]).")
  if not isinstance(weight_grads, (tuple, list)) or len(weight_grads) != 2:
    length = (f" of length {len(weight_grads)}" if isinstance(weight_grads, (tuple, list))
              else "")
    raise ValueError(
        f"{name}: weight_grads must be a pair (grads_a, grads_b) of stacked per-task "
        f"gradients, got {type(weight_grads).__name__}{length}.")
  ref_def = jax.tree_util.tree_structure(grads)
  ref_shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(grads)]
  for k, wg in enumerate(weight_grads):
    if jax.tree_util.tree_structure(wg) != ref_def or [  # type: ignore[operator]
        jnp.shape(x) for x in jax.tree_util.tree_leaves(wg)] != ref_shapes:
      raise ValueError(
          f"{name}: weight_grads[{k}] must have the structure and shapes of the stacked "
          f"gradients {ref_shapes}; got {[jnp.shape(x) for x in jax.tree_util.tree_leaves(wg)]}.")


def shared_weight_leaves(view: base.TaskGradients, task_specific) -> tuple[list, list]:
  """The shared leaves of the two ``weight_grads`` (or the main ones during init)."""
  weight_grads = view.extra.get("weight_grads")
  if weight_grads is None:  # only reached while init() traces the state's shape
    return list(view.shared), list(view.shared)
  out = []
  for wg in weight_grads:
    mask = base.resolve_task_specific(task_specific, wg, view.params)
    out.append([leaf for leaf, head in zip(jax.tree_util.tree_leaves(wg), mask) if not head])
  return out[0], out[1]


def scaled_cross_gram(leaves_a: list, leaves_b: list) -> tuple[jax.Array, jax.Array]:
  """Cross Gram J_a J_bᵀ divided by s², and the power of two s (overflow-safe)."""
  big = jnp.maximum(jnp.max(linalg.rows_max_abs(leaves_a)), jnp.max(linalg.rows_max_abs(leaves_b)))
  scale = linalg.power_of_two_scale(big)
  return linalg.cross_gram(leaves_a, leaves_b, scale), scale


def with_multi_batch(tx, name: str, task_specific, heads: str):
  """Wraps an aggregator so that ``update`` validates and uses ``weight_grads=``.

  With ``heads="mean"`` the task-specific leaves of ``grads`` are replaced by
  the mean of the three samples' head gradients (each head still gets only
  its own task's gradient).
  """
  inner_update = tx.update

  def update_fn(updates, state, params=None, **extra):
    weight_grads = extra.get("weight_grads")
    check_weight_grads(name, updates, weight_grads)
    extra["weight_grads"] = tuple(weight_grads)
    if heads == "mean" and task_specific is not None:
      mask = base.resolve_task_specific(task_specific, updates, params)
      if any(mask):
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        la = jax.tree_util.tree_leaves(weight_grads[0])
        lb = jax.tree_util.tree_leaves(weight_grads[1])
        leaves = [(x + a.astype(x.dtype) + b.astype(x.dtype)) / 3 if h else x
                  for x, a, b, h in zip(leaves, la, lb, mask)]
        updates = jax.tree_util.tree_unflatten(treedef, leaves)
    return inner_update(updates, state, params, **extra)

  update_fn.mtl_info = inner_update.mtl_info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


class SDMGradState(NamedTuple):
  """SDMGrad's inner state: the simplex weights w, warm-started across steps."""
  w: jax.Array


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@functools.partial(jax.jit, static_argnames=("lam", "niter", "lr", "momentum"))
def sdmgrad_inner_weights(gram: jax.Array, w0: jax.Array, lam: float, niter: int,
                          lr: float = 5.0, momentum: float = 0.5) -> jax.Array:
  """SDMGrad's projected heavy-ball iterations on the simplex.

  Minimises ½ wᵀĜw + λ wᵀĜ1/m over Δ (Ĝ = cross Gram normalised by the squared
  mean of √diag) by ``niter`` steps of SGD with momentum (the buffer starts
  at the first gradient, as in ``torch.optim.SGD``), each followed by a
  Euclidean projection onto the simplex.
  """
  m = gram.shape[0]
  gg = gram @ jnp.full((m,), 1.0 / m, gram.dtype)

  def body(k, carry):
    w, buf = carry
    grad = gram @ w + lam * gg
    buf = jnp.where(k == 0, grad, momentum * buf + grad)
    return linalg.project_simplex(w - lr * buf), buf

  w, _ = jax.lax.fori_loop(0, niter, body, (w0, jnp.zeros_like(w0)))
  return w


def sdmgrad(lamda: float = 0.3, niter: int = 20, *, lr: float = 5.0, momentum: float = 0.5,
            heads: str = "mean", task_specific=None, weight_heads: Optional[bool] = None,
            num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """SDMGrad: a direction-oriented MGDA step with double-sampled Gram matrix.

  With the main stochastic gradients J (rows ζ_i) and two independent ones
  J_a, J_b (``weight_grads=``; see the module docstring for the calling
  convention), Ĝ = J_a J_bᵀ / (mean_i √(Ĝ_ii))² (diagonal clipped at 0), and
  the weights w ∈ Δ are refined by ``niter`` projected SGD-momentum steps on
  ½ wᵀĜw + λ wᵀĜ1/m, warm-started from the previous step's w
  (:func:`sdmgrad_inner_weights`; initially 1/m). The update

      d = (Jᵀw + λ ḡ) / (1 + λ),   ḡ = Jᵀ1/m,

  is d = Jᵀw' with w' = (w + λ/m)/(1 + λ) exposed. λ → ∞ gives the mean
  (linear scalarisation), λ = 0 a stochastic MGDA. The normalisation is exact
  (LibMTL adds 1e-8 to the squared scale); a zero or non-finite Ĝ keeps w.
  Heads: with ``heads="mean"`` (default) each head gets the mean of its
  task's gradients over the three samples, with "main" only the main
  sample's (LibMTL sums the three).

  Args:
    lamda: λ, the pull towards the average gradient (default 0.3).
    niter: inner iterations per step (default 20).
    lr: inner step size (default 5, as the reference code).
    momentum: inner heavy-ball momentum (default 0.5).
    heads: "mean" (default) or "main"; see above.
    task_specific, weight_heads, nonfinite: see :func:`mtl_optax.make_aggregator`.
    num_tasks: m, required (w has shape (m,)).

  Reference:
    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms", NeurIPS 2023 (defaults of LibMTL's
    ``SDMGrad``, from the official code).
  """
  base.check_nonnegative("sdmgrad", lamda=lamda)
  base.check_positive("sdmgrad", lr=lr)
  base.check_nonnegative("sdmgrad", momentum=momentum)
  if not isinstance(niter, int) or niter < 1:
    raise ValueError(f"sdmgrad: niter must be a positive int, got {niter!r}.")
  if heads not in HEAD_MODES:
    raise ValueError(f"sdmgrad: heads must be one of {HEAD_MODES}, got {heads!r}.")
  m_init = require_num_tasks("sdmgrad", num_tasks)
  info = base.AggregatorInfo(name="sdmgrad", scale_degree=1, reads_rows=True)

  def init_inner(params, m):
    return SDMGradState(w=jnp.full((m_init,), 1.0 / m_init, state_dtype(params)))

  def rule(view, state):
    m = view.num_tasks
    leaves_a, leaves_b = shared_weight_leaves(view, task_specific)
    gram, _ = scaled_cross_gram(leaves_a, leaves_b)
    gram = gram.astype(view.gram.dtype)
    diag = jnp.maximum(jnp.diagonal(gram), 0.0)
    norm = jnp.mean(jnp.sqrt(diag))
    gram_n = linalg.safe_div(gram, norm * norm)
    w_old = state.w.astype(gram.dtype)
    w = sdmgrad_inner_weights(gram_n, w_old, lamda, niter, lr, momentum)
    ok = jnp.all(jnp.isfinite(w)) & (norm > 0)
    w = jnp.where(ok, w, w_old)
    weights = (w + lamda / m) / (1.0 + lamda)
    return base.RuleOutput(state=SDMGradState(w=w.astype(state.w.dtype)), weights=weights,
                           diagnostics={"inner_weights": w})

  tx = base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                            weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)
  return with_multi_batch(tx, "sdmgrad", task_specific, heads)
