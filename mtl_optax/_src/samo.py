"""SAMO: sharpness-aware MTL with a joint global–local perturbation (Ban et al., ICCV 2025).

The per-task SAM of Phan et al. (:mod:`mtl_optax._src.sharpness`) perturbs task
i along its own gradient g_i, which costs m backward passes at θ before the m
SAM passes. SAMO perturbs task i along a mix of the GLOBAL gradient
g_0 = ∇ (1/m) Σ_j L_j (one backward pass) and a LOCAL, per-task part estimated
from forward passes only (a two-point zeroth-order estimate along one random
direction), normalised layer by layer to the global gradient's scale:

    ĝ_i   = (L_i(θ + μ z_i) − L_i(θ − μ z_i)) / (2μ) · z_i,     z_i ~ N(0, I) (shared leaves),
    d_i^ℓ = α g_0^ℓ + (1 − α) ‖g_0^ℓ‖ ĝ_i^ℓ / ‖ĝ_i^ℓ‖           (every shared leaf ℓ),
    ε_i   = ρ T² d_i / ‖T d_i‖                                  (over all shared leaves),

(T = 1, or |θ| for the adaptive / ASAM variant) and each head is perturbed along
its own task's exact gradient, normalised separately. The per-task gradients
∇L_i(θ + ε_i) at the perturbed points then go to ANY aggregator in place of the
plain per-task gradients (the authors' ``<method>withsamo``: MGDA, PCGrad,
CAGrad, FairGrad, ... on the SAM gradients)::

    perturb = mo.samo_perturbation(rho=1e-3, alpha=0.5, task_specific=is_head)
    pstate = perturb.init(params)
    losses, grads, pstate = mo.samo_task_grads(loss_fn, params, batch,
                                               perturbation=perturb, perturbation_state=pstate)
    updates, state = tx.update(grads, state, params, losses=losses)

or ``mo.make_train_step(loss_fn, tx, perturbation=perturb)`` (the optimizer
state is then the pair ``(tx.init(params), perturb.init(params))``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import jacobian as jacobian_lib
from mtl_optax._src import linalg
from mtl_optax._src import sharpness as sharpness_lib
from mtl_optax._src import task_grads as task_grads_lib

PyTree = Any


class SamoState(NamedTuple):
  """State of :func:`samo_perturbation`: the key of the next step's random directions z_i."""
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class SamoInfo:
  """Static hyper-parameters of a :func:`samo_perturbation` (attached to its ``update``)."""
  rho: float
  rho_task: float
  alpha: float
  layerwise: bool
  adaptive: bool
  zo_eps: float
  task_specific: Any
  eps: float

  @property
  def is_zero(self) -> bool:
    """Whether every offset is identically zero (ρ = ρ_task = 0)."""
    return self.rho == 0 and self.rho_task == 0


def samo_info(perturbation) -> Optional[SamoInfo]:
  """The :class:`SamoInfo` of a :func:`samo_perturbation` (None for other transformations)."""
  return getattr(getattr(perturbation, "update", None), "mtl_samo", None)


def _leaf_norms(leaf: jax.Array, m: int, acc) -> jax.Array:
  # One group per leaf: the layer-wise norms, overflow-safe like the SAM norms.
  return sharpness_lib._group_norms([leaf], m, acc)  # pylint: disable=protected-access


def samo_perturbation(
    rho: float = 1e-3,
    alpha: float = 0.5,
    *,
    rho_task: Optional[float] = None,
    layerwise: bool = True,
    adaptive: bool = False,
    zo_eps: float = 1e-2,
    task_specific=None,
    seed: int = 0,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  """SAMO's joint global–local per-task perturbations ε_i.

  ``update(local_grads, state, params, global_grads=g_0)`` maps the stacked
  local gradients (row i: the zeroth-order estimate ĝ_i on the shared leaves,
  task i's exact gradient on its head leaves) and the global gradient g_0 (no
  task axis) to the stacked offsets. On every shared leaf ℓ,

      d_i^ℓ = α g_0^ℓ + (1 − α) ‖g_0^ℓ‖ ĝ_i^ℓ / ‖ĝ_i^ℓ‖     (layerwise=True, default),
      d_i^ℓ = α g_0^ℓ + (1 − α) ĝ_i^ℓ                         (layerwise=False),

  on the head leaves d_i = g_i^head, and then, exactly as
  :func:`mtl_optax.task_perturbation` (which this calls; T = |θ| if
  ``adaptive`` else 1),

      ε_sh^i = ρ T² d_sh^i / (‖T d_sh^i‖ + eps),   ε_ns^i = ρ_task T² d_ns^i / (‖T d_ns^i‖ + eps).

  The layer-wise rescaling gives the local estimate, whose scale is that of a
  random vector, the magnitude of the global gradient in every layer: ``‖local
  part of d_i^ℓ‖ = (1 − α) ‖g_0^ℓ‖``. α = 1 is SAM on the average loss (the
  same shared offset for every task); α = 0 is the local part alone. In the
  authors' code the mixing weight is ``beta = 1 − α`` (``--beta 0.5``, i.e.
  α = 0.5, in all their runs; ρ = 1e-3, μ = 0.01); the NYUv2 script uses the
  ``layerwise=False`` mix.

  Edge cases (documented results, never NaN): a leaf whose ĝ_i^ℓ or g_0^ℓ is
  zero gets no local part; a task whose row of ``d`` is not finite (its
  perturbed losses overflowed, or its head gradient is NaN) gets a zero offset
  (its SAM gradient is then its plain gradient, left to the aggregator's
  non-finite policy); a non-finite g_0 is replaced by 0.

  The state holds the PRNG key of the random directions, which
  :func:`samo_task_grads` consumes and advances (``update`` itself returns the
  state unchanged).

  Args:
    rho: radius ρ of the shared perturbation (default 1e-3, the authors' runs).
    alpha: weight α ∈ [0, 1] of the global gradient (default 0.5).
    rho_task: radius of the head perturbations (default None: ρ, as the code).
    layerwise: rescale the local estimate layer by layer (default True).
    adaptive: ASAM scaling T = |θ| (the code's ``--adaptive``; default False).
    zo_eps: step μ > 0 of the two-point estimate (default 0.01).
    task_specific: None (every leaf shared), a boolean mask pytree or
      ``callable(path, leaf) -> bool`` marking the head leaves.
    seed: seed of the PRNG key in the state (default 0).
    eps: added to the norms (default 1e-12, as the code).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update.mtl_samo`` is a
    :class:`SamoInfo`.

  Reference:
    Ban, Subramani and Ji, "SAMO: A Lightweight Sharpness-Aware Approach for
    Multi-Task Optimization with Joint Global-Local Perturbation", ICCV 2025
    (arXiv 2507.07883); code: github.com/OptMN-Lab/SAMO.
  """
  where = "samo_perturbation"
  rho = sharpness_lib._check_rho("rho", rho)  # pylint: disable=protected-access
  rho_task = rho if rho_task is None else sharpness_lib._check_rho("rho_task", rho_task)  # pylint: disable=protected-access
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
    raise ValueError(f"{where}: alpha must be a number in [0, 1] (the weight of the global "
                     f"gradient), got {alpha!r}.")
  base.check_positive(where, zo_eps=zo_eps)
  base.check_nonnegative(where, eps=eps)
  for name, flag in (("layerwise", layerwise), ("adaptive", adaptive)):
    if not isinstance(flag, bool):
      raise ValueError(f"{where}: {name} must be a bool, got {flag!r}.")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"{where}: seed must be an int, got {seed!r}.")
  alpha = float(alpha)
  info = SamoInfo(rho, rho_task, alpha, layerwise, adaptive, float(zo_eps), task_specific,
                  float(eps))
  normalise = sharpness_lib.task_perturbation(rho, rho_task, adaptive=adaptive,
                                              task_specific=task_specific, eps=eps)

  def init_fn(params):
    del params
    return SamoState(key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None, **extra):
    global_grads = extra.pop("global_grads", None)
    if global_grads is None:
      raise ValueError(
          f"{where}: update needs global_grads= (the gradient of the mean loss); compute the "
          "SAMO gradients with mo.samo_task_grads(loss_fn, params, *batch, perturbation=..., "
          "perturbation_state=...) or mo.make_train_step(..., perturbation=...).")
    m = base.num_tasks_of(updates, where)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    try:
      g0_leaves = treedef.flatten_up_to(global_grads)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: global_grads must have the structure of the local "
                       f"gradients without the task axis: {e}") from None
    for g0, g in zip(g0_leaves, leaves):
      if jnp.shape(g0) != g.shape[1:]:
        raise ValueError(f"{where}: a global gradient leaf of shape {jnp.shape(g0)} does not "
                         f"match its stacked local gradient of shape {g.shape}.")
    heads = base.resolve_task_specific(task_specific, updates, params)
    acc = linalg.accumulation_dtype(jnp.result_type(*leaves))
    g0_leaves = [jnp.asarray(g0, acc) for g0 in g0_leaves]
    g0_finite = jacobian_lib.rows_finite([g0[None] for g0, h in zip(g0_leaves, heads) if not h], 1)
    g0_leaves = [jnp.where(g0_finite[0], g0, jnp.zeros((), acc)) for g0 in g0_leaves]
    mixed = []
    for g, g0, is_head in zip(leaves, g0_leaves, heads):
      g = g.astype(acc)
      if is_head:
        mixed.append(g)
        continue
      local = g
      if layerwise:
        norms = _leaf_norms(jnp.concatenate([g0[None], g]), m + 1, acc)  # ‖g_0^ℓ‖, ‖ĝ_i^ℓ‖
        scale = linalg.safe_div(norms[:1], norms[1:])  # (m,)
        local = g * scale.reshape((m,) + (1,) * (g.ndim - 1))
      mixed.append(alpha * g0[None] + (1.0 - alpha) * local)
    finite = jacobian_lib.rows_finite(mixed, m)
    mixed = [jacobian_lib.zero_rows(d, finite).astype(g.dtype) for d, g in zip(mixed, leaves)]
    offsets, _ = normalise.update(jax.tree_util.tree_unflatten(treedef, mixed),
                                  normalise.init(params), params)
    return offsets, state

  update_fn.mtl_samo = info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _directions(key, leaves, heads):
  """z_i: one standard normal vector over all shared entries, split into the shared leaves.

  ``jax.random.normal(key, (n,), dtype)`` with n the number of shared entries and
  dtype their common type, cut in ``jax.tree_util`` leaf order, reshaped and cast
  to each leaf's dtype (one draw: one random-bits kernel, whatever the number of
  leaves); None on the head leaves.
  """
  shared = [p for p, h in zip(leaves, heads) if not h]
  dtype = jnp.result_type(*shared)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"samo_task_grads: parameters must be floating point, got {dtype}.")
  flat = jax.random.normal(key, (sum(int(jnp.size(p)) for p in shared),), dtype)
  out, start = [], 0
  for p, h in zip(leaves, heads):
    if h:
      out.append(None)
      continue
    size = int(jnp.size(p))
    out.append(flat[start:start + size].reshape(jnp.shape(p)).astype(jnp.result_type(p)))
    start += size
  return out


def samo_task_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args,
    perturbation: optax.GradientTransformation,
    perturbation_state: SamoState,
    has_aux: bool = False,
    has_state: bool = False,
    chunk_size: task_grads_lib.ChunkSize = "auto",
    task_loss_fn: Optional[Callable[..., Any]] = None,
    **kwargs,
):
  """Losses and SAMO's per-task SAM gradients ∇L_i(θ + ε_i), ready for any aggregator.

  1. One forward and one backward pass at θ: the losses L(θ) and the global
     gradient g_0 = ∇ (1/m) Σ_j L_j; the head leaves' per-task gradients come
     from the same linearisation (vmapped over tasks; under ``jax.jit`` XLA
     drops the unused trunk part, so only the heads are back-propagated m times).
  2. Local parts from forward passes only: for each task, with a fresh direction
     z_i on the shared leaves (heads unperturbed), two losses and

         ĝ_i = (L_i(θ + μ z_i) − L_i(θ − μ z_i)) / (2μ) · z_i

     (2m forward passes; the authors' ``GradEstimator`` with q = 1 direction).
     Directions: with ``k, sub = jax.random.split(state.key)`` and
     ``keys = jax.random.split(sub, m)``, z_i is
     ``jax.random.normal(keys[i], (n,), dtype)`` (n shared entries, dtype their
     common type) cut into the shared leaves in ``jax.tree_util`` order; the
     returned state holds ``k``.
  3. ε_i = ``perturbation.update(ĝ, state, params, global_grads=g_0)`` (see
     :func:`samo_perturbation`), and ∇L_i(θ + ε_i) for all tasks in one vmapped
     call (or chunks; :func:`mtl_optax._src.sharpness.perturbed_task_grads`).

  Cost: 1 forward + 1 backward, 2m forward, m forward + m backward passes
  (per-task SAM: 1 forward + m backward, then m forward + m backward). What
  SAMO saves is the m per-task backward passes at θ, not those at θ + ε_i.
  ρ = ρ_task = 0 returns ``mo.task_grads``'s output exactly (no extra pass; the
  key still advances).

  Model state (``has_state``; BatchNorm, dropout keys): as
  :func:`mtl_optax.sharpness_aware_task_grads`. The new state comes from the
  pass at θ only; the 2m zeroth-order passes and the m SAM passes start from the
  same input state and their new states are discarded, so running statistics
  never move at perturbed weights. (The authors evaluate the zeroth-order
  losses with the model in eval mode; here a training-mode normalisation layer
  uses the statistics of the batch at θ ± μ z_i, like the SAM passes.)

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> losses (m,)`` (``(losses,
      aux)`` with ``has_aux``; ``(losses, new_model_state)`` with ``has_state``).
    params: parameter pytree (floating-point leaves).
    *args: positional arguments of ``loss_fn`` (the model state first with
      ``has_state``, then the batch).
    perturbation: a :func:`samo_perturbation`.
    perturbation_state: its state (``perturbation.init(params)``, then the
      state returned by the previous call).
    has_aux, has_state: as for :func:`mtl_optax.task_grads`.
    chunk_size: tasks at once in the zeroth-order and SAM passes (None = all
      in one vmap; "auto" = 1 on CPU, None elsewhere).
    task_loss_fn: optional ``(params, task_index, *args, **kwargs) -> L_i`` for
      the per-task passes (see :func:`mtl_optax.sharpness_aware_task_grads`).
    **kwargs: keyword arguments of ``loss_fn`` / ``task_loss_fn``.

  Returns:
    ``(losses, sam_grads, new_perturbation_state)``, with ``losses`` replaced
    by ``(losses, aux)`` / ``(losses, new_model_state)`` /
    ``(losses, (new_model_state, aux))`` as in :func:`mtl_optax.task_grads`;
    ``sam_grads`` is stacked over tasks like ``task_grads``'s gradients.

  Reference:
    Ban, Subramani and Ji, "SAMO: A Lightweight Sharpness-Aware Approach for
    Multi-Task Optimization with Joint Global-Local Perturbation", ICCV 2025
    (arXiv 2507.07883), and the authors' ``trainer_samo.py``.
  """
  where = "samo_task_grads"
  info = samo_info(perturbation)
  if info is None:
    raise ValueError(f"{where}: perturbation must be a mo.samo_perturbation(...); for the "
                     "per-task SAM of Phan et al. use mo.sharpness_aware_task_grads.")
  if not isinstance(perturbation_state, SamoState):
    raise ValueError(f"{where}: perturbation_state must come from perturbation.init(params) "
                     f"(a SamoState), got {type(perturbation_state).__name__}.")
  chunk_size = task_grads_lib.resolve_chunk_size(chunk_size, where)
  task_grads_lib.check_state_args(args, has_state, where)
  key, sub = jax.random.split(perturbation_state.key)
  new_pstate = perturbation_state._replace(key=key)
  if info.is_zero:
    out, grads = task_grads_lib.task_grads(loss_fn, params, *args, chunk_size=chunk_size,
                                           has_aux=has_aux, has_state=has_state, **kwargs)
    return out, grads, new_pstate

  f = lambda p: loss_fn(p, *args, **kwargs)
  shapes = jax.eval_shape(f, params)
  out_aux = task_grads_lib.check_state_output(shapes, has_aux, has_state, where)
  m = task_grads_lib.check_losses_shape(shapes, out_aux, where)
  if out_aux:
    losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
  else:
    (losses, vjp_fn), aux = jax.vjp(f, params), None
  g0 = vjp_fn(jnp.full((m,), 1.0 / m, losses.dtype))[0]

  leaves, treedef = jax.tree_util.tree_flatten(params)
  stacked_shapes = jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct((m,) + jnp.shape(p), jnp.result_type(p)), params)
  heads = base.resolve_task_specific(info.task_specific, stacked_shapes, params)
  if all(heads):
    raise ValueError(f"{where}: every leaf is marked task-specific; SAMO perturbs shared "
                     "parameters.")

  head_rows = [None] * len(leaves)
  if any(heads):
    def head_grads(e):
      g = treedef.flatten_up_to(vjp_fn(e)[0])
      return [x if h else None for x, h in zip(g, heads)]
    head_rows = jax.vmap(head_grads)(jnp.eye(m, dtype=losses.dtype))

  single = sharpness_lib._single_task_loss(  # pylint: disable=protected-access
      loss_fn, task_loss_fn, out_aux, args, kwargs)
  mu = info.zo_eps

  def zeroth_order(i, key_i):
    z = _directions(key_i, leaves, heads)
    def at(sign):
      point = [p if zk is None else p + (sign * mu) * zk for p, zk in zip(leaves, z)]
      return single(jax.tree_util.tree_unflatten(treedef, point), i)
    plus, minus = at(1.0), at(-1.0)
    acc = linalg.accumulation_dtype(jnp.result_type(plus))
    coef = (plus.astype(acc) - minus.astype(acc)) / (2.0 * mu)
    return [None if zk is None else (coef * zk.astype(acc)).astype(zk.dtype) for zk in z]

  keys = jax.random.split(sub, m)
  zo_rows = task_grads_lib.map_over_tasks(lambda x: zeroth_order(*x), (jnp.arange(m), keys),
                                          chunk_size)
  local = [hr if h else zr for h, hr, zr in zip(heads, head_rows, zo_rows)]
  offsets, _ = perturbation.update(jax.tree_util.tree_unflatten(treedef, local),
                                   perturbation_state, params, global_grads=g0)
  _, sam_grads = sharpness_lib.perturbed_task_grads(
      loss_fn, params, offsets, *args, has_aux=has_aux, has_state=has_state,
      chunk_size=chunk_size, task_loss_fn=task_loss_fn, **kwargs)
  out = (losses, aux) if out_aux else losses
  return out, sam_grads, new_pstate
