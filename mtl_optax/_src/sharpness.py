"""Sharpness-aware multi-task learning: per-task perturbations and SAM gradients.

Phan et al. (ICCV 2025) apply sharpness-aware minimisation (SAM; Foret et al.,
ICLR 2021) to every task separately. For task i with loss gradient g_i (shared
part g_sh^i, head part g_ns^i) the worst-case offset inside a ball is

    ε_sh^i = ρ_sh · T² g_sh^i / ‖T g_sh^i‖,   ε_ns^i = ρ_ns · T² g_ns^i / ‖T g_ns^i‖,

(T = 1, or T = |θ| for the adaptive / ASAM variant of Kwon et al., ICML 2021),
and the task's SAM gradient is taken at its own perturbed point,
g_i^SAM = ∇L_i(θ + ε_i). This module provides

* :func:`task_perturbation` — the optax transformation stacked loss gradients
  (and params) → stacked offsets ε (one per task);
* :func:`sharpness_aware_task_grads` — losses, loss gradients at θ and the SAM
  gradients at θ + ε_i, the latter for all tasks in ONE vmapped call (task i
  evaluates only its own loss at its own point: m forward + backward passes,
  not m²);
* :func:`sharpness` (``mo.metrics.sharpness``) — the sharpness measure
  L_i(θ + ε_i) − L_i(θ) per task, and optionally ‖g_i^SAM − g_i‖, at one
  perturbation or for several radii (the evaluation of the FS-MTL code).

The SAM gradients feed :func:`mtl_optax.flat`, which turns any aggregator into
its flat (F-) version::

    perturb = mo.task_perturbation(rho_shared=0.05, rho_task=0.05)
    tx = optax.chain(mo.flat(mo.cagrad(), task_specific=is_head), optax.adam(1e-3))
    losses, grads, sam = mo.sharpness_aware_task_grads(loss_fn, params, batch,
                                                       perturbation=perturb)
    updates, state = tx.update(grads, state, params, losses=losses, sam_grads=sam)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src import task_grads as task_grads_lib

PyTree = Any

NORMS = ("separate", "joint")


@dataclasses.dataclass(frozen=True)
class PerturbationInfo:
  """Static hyper-parameters of a :func:`task_perturbation` (attached to its ``update``)."""
  rho_shared: float
  rho_task: float
  adaptive: bool
  norm: str
  eps: float

  @property
  def is_zero(self) -> bool:
    """Whether every offset is identically zero (ρ_sh = ρ_ns = 0)."""
    return self.rho_shared == 0 and self.rho_task == 0


def _check_rho(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      value >= 0 and value != float("inf")):
    raise ValueError(
        f"task_perturbation: {name} must be a finite non-negative number (the radius of "
        f"the perturbation ball), got {value!r}.")
  return float(value)


def _group_norms(leaves: Sequence[jax.Array], m: int, dtype) -> jax.Array:
  """Per-task Euclidean norm over a group of stacked leaves, ``(m,)``, overflow-safe.

  Rows are divided by a power of two close to their largest entry before
  squaring (exact), so gradients up to the dtype's maximum neither overflow
  nor underflow in the sum of squares.
  """
  if not leaves:
    return jnp.zeros((m,), dtype)
  scale = linalg.power_of_two_scale(linalg.rows_max_abs(leaves)).astype(dtype)
  total = jnp.zeros((m,), dtype)
  for leaf in leaves:
    rows = leaf.reshape(m, -1).astype(dtype) / scale[:, None]
    total = total + jnp.sum(rows * rows, axis=1)
  return jnp.sqrt(total) * scale


def task_perturbation(
    rho_shared: float = 0.05,
    rho_task: float = 0.05,
    adaptive: bool = False,
    task_specific=None,
    eps: float = 1e-12,
    *,
    norm: str = "separate",
) -> optax.GradientTransformationExtraArgs:
  """Per-task SAM offsets ε_i from stacked per-task gradients.

  For every task i (row i of each stacked leaf), with T = |θ| if ``adaptive``
  else 1 (elementwise),

      ε_sh^i = ρ_sh · T² g_sh^i / (‖T g_sh^i‖ + eps)     on the shared leaves,
      ε_ns^i = ρ_ns · T² g_ns^i / (‖T g_ns^i‖ + eps)     on the task-specific leaves,

  the norms being taken over all shared leaves of row i, and separately over
  all task-specific leaves of row i (Phan et al., Algorithm 1; the FS-MTL
  NYUv2/CelebA/Cityscapes code). A head leaf that task i's loss does not touch
  has a zero gradient row, hence a zero offset: each task perturbs the shared
  parameters and its own head only. Zero gradients give zero offsets (the
  ``eps`` in the denominator, as in the reference SAM code).

  ``norm="joint"`` takes ONE norm over the shared and task-specific leaves of
  row i with radius ρ_sh (the FS-MTL multi-MNIST code, i.e. plain SAM applied
  to each task's loss over all of its parameters); it then requires
  ``rho_task == rho_shared``.

  The transformation is stateless: ``update(grads, state, params)`` returns
  ``(offsets, state)``, where ``offsets`` has the stacked structure of
  ``grads`` (row i = ε_i) in the gradients' dtype.

  Args:
    rho_shared: radius ρ_sh for the shared parameters (default 0.05; the
      FS-MTL multi-MNIST runs use adaptive with ρ = 2). Must be ≥ 0.
    rho_task: radius ρ_ns for the task-specific parameters (default 0.05).
    adaptive: scale by T = |θ| (ASAM, Kwon et al. 2021, without their η offset,
      as in the FS-MTL code); ``update`` then needs ``params``.
    task_specific: None (every leaf shared), a boolean mask pytree or
      ``callable(path, leaf) -> bool`` marking the task-specific leaves (the
      same convention as the aggregators).
    eps: added to each norm (default 1e-12, as in the reference code).
    norm: "separate" (default) or "joint" (see above).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update.mtl_perturbation``
    is a :class:`PerturbationInfo`.

  References:
    Phan et al., "Beyond Losses Reweighting: Empowering Multi-Task Learning via
    the Generalization Perspective", ICCV 2025 (arXiv 2211.13723);
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021; Kwon et al., "ASAM: Adaptive Sharpness-Aware
    Minimization", ICML 2021.
  """
  rho_shared = _check_rho("rho_shared", rho_shared)
  rho_task = _check_rho("rho_task", rho_task)
  if norm not in NORMS:
    raise ValueError(f"task_perturbation: norm must be one of {NORMS}, got {norm!r}.")
  if norm == "joint" and rho_task != rho_shared:
    raise ValueError(
        "task_perturbation: norm='joint' uses one radius for all of a task's parameters; "
        f"pass rho_task=rho_shared (got rho_shared={rho_shared}, rho_task={rho_task}).")
  if not isinstance(adaptive, bool):
    raise ValueError(f"task_perturbation: adaptive must be a bool, got {adaptive!r}.")
  base.check_nonnegative("task_perturbation", eps=eps)
  info = PerturbationInfo(rho_shared, rho_task, adaptive, norm, float(eps))

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    del extra
    m = base.num_tasks_of(updates, "task_perturbation")
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    if adaptive:
      if params is None:
        raise ValueError("task_perturbation(adaptive=True) needs the parameters: call "
                         "update(grads, state, params).")
      try:
        p_leaves = treedef.flatten_up_to(params)
      except (ValueError, TypeError) as e:
        raise ValueError("task_perturbation: params must have the structure of the "
                         f"gradients without the task axis: {e}") from None
      for p, g in zip(p_leaves, leaves):
        if jnp.shape(p) != g.shape[1:]:
          raise ValueError(
              f"task_perturbation: a parameter of shape {jnp.shape(p)} does not match its "
              f"stacked gradient of shape {g.shape} (expected (m,) + param shape).")
      scales = [jnp.abs(jnp.asarray(p)).astype(g.dtype) for p, g in zip(p_leaves, leaves)]
    else:
      scales = [None] * len(leaves)
    heads = base.resolve_task_specific(task_specific, updates, params)
    if norm == "joint":
      heads = [False] * len(leaves)
    acc = linalg.accumulation_dtype(jnp.result_type(*leaves))
    # T g (for the norms) and T² g (the direction), per leaf.
    tg = [g if t is None else g * t for g, t in zip(leaves, scales)]
    t2g = [g if t is None else g * (t * t) for g, t in zip(leaves, scales)]
    out = list(leaves)
    for is_head, rho in ((False, rho_shared), (True, rho_task)):
      idx = [k for k, h in enumerate(heads) if h == is_head]
      if not idx:
        continue
      norms = _group_norms([tg[k] for k in idx], m, acc)
      coef = linalg.safe_div(jnp.asarray(rho, acc), norms + jnp.asarray(eps, acc))  # (m,)
      for k in idx:
        c = coef.reshape((m,) + (1,) * (leaves[k].ndim - 1))
        out[k] = (t2g[k].astype(acc) * c).astype(leaves[k].dtype)
    return jax.tree_util.tree_unflatten(treedef, out), state

  update_fn.mtl_perturbation = info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def perturbation_info(perturbation) -> Optional[PerturbationInfo]:
  """The :class:`PerturbationInfo` of a :func:`task_perturbation` (None for others)."""
  return getattr(getattr(perturbation, "update", None), "mtl_perturbation", None)


# ---------------------------------------------------------------------------
# Per-task losses and gradients at per-task points.
# ---------------------------------------------------------------------------

def _single_task_loss(loss_fn, task_loss_fn, has_aux, args, kwargs):
  """``(params, i) -> L_i(params)`` for a traced task index ``i``."""
  if task_loss_fn is not None:
    def f(p, i):
      out = task_loss_fn(p, i, *args, **kwargs)
      if jnp.ndim(out) != 0:
        raise ValueError(
            "task_loss_fn(params, task_index, *args) must return the scalar loss of task "
            f"task_index; got shape {jnp.shape(out)}.")
      return out
    return f

  def f(p, i):
    out = loss_fn(p, *args, **kwargs)
    losses = out[0] if has_aux else out  # aux of perturbed passes is discarded
    return jax.lax.dynamic_index_in_dim(losses, i, keepdims=False)
  return f


def perturbed_task_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    offsets: PyTree,
    *args,
    has_aux: bool = False,
    has_state: bool = False,
    chunk_size: task_grads_lib.ChunkSize = "auto",
    task_loss_fn: Optional[Callable[..., Any]] = None,
    **kwargs,
):
  """Losses and gradients of each task at its own point: L_i and ∇L_i at θ + ε_i.

  All tasks are differentiated in one ``jax.vmap`` over the task axis of
  ``offsets`` (or ``jax.lax.map`` in chunks of ``chunk_size`` tasks); task i
  differentiates only its own loss. See :func:`sharpness_aware_task_grads` for
  ``loss_fn`` / ``task_loss_fn``, the model state and the cost. The aux and
  the new model state of the perturbed passes are discarded.

  Returns:
    ``(perturbed_losses, grads)``: ``(m,)`` and the stacked gradients (the
    structure of ``params`` with a leading task axis).
  """
  chunk_size = task_grads_lib.resolve_chunk_size(
      chunk_size, "perturbed_task_grads", task_grads_lib.loss_jaxpr(loss_fn, params, args, kwargs))
  task_grads_lib.check_state_args(args, has_state, "perturbed_task_grads")
  m = base.num_tasks_of(offsets, "perturbed_task_grads")
  f = _single_task_loss(loss_fn, task_loss_fn, task_grads_lib.outputs_aux(has_aux, has_state),
                        args, kwargs)

  def one(i, eps_i):
    point = jax.tree_util.tree_map(lambda p, e: p + e.astype(jnp.result_type(p)), params, eps_i)
    return jax.value_and_grad(f)(point, i)

  return task_grads_lib.map_over_tasks(lambda x: one(*x), (jnp.arange(m), offsets), chunk_size)


def sharpness_aware_task_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args,
    perturbation: optax.GradientTransformation,
    has_aux: bool = False,
    has_state: bool = False,
    chunk_size: task_grads_lib.ChunkSize = "auto",
    mode: str = "jacrev",
    task_loss_fn: Optional[Callable[..., Any]] = None,
    perturbation_groups: Optional[int] = None,
    **kwargs,
):
  """Losses, loss gradients at θ and per-task SAM gradients at θ + ε_i.

  1. ``losses, loss_grads = mo.task_grads(loss_fn, params, *args, mode=mode)``;
  2. ``offsets = perturbation.update(loss_grads, perturbation.init(params), params)``
     (one ε_i per task; :func:`task_perturbation`);
  3. ``sam_grads[i] = ∇ L_i(θ + ε_i)``, for all tasks in ONE vmapped call over
     the task axis (``chunk_size`` bounds how many tasks run at once, with
     ``jax.lax.map(..., batch_size=chunk_size)``). Each task differentiates
     only its own loss at its own point, so step 3 costs about m forward and m
     backward passes of the model (not m²).

  Cost of the heads. With ``loss_fn`` returning all m losses, task i's pass
  evaluates the whole model at θ + ε_i — every head — and keeps L_i
  (``lax.dynamic_index_in_dim``): the other heads are computed and
  back-propagated with a zero cotangent. That waste is (m − 1) heads per task,
  small when the trunk dominates (see ``benchmarks/flat_speed.py``). To avoid
  it, pass ``task_loss_fn(params, task_index, *args, **kwargs) -> L_i`` with a
  traced int ``task_index``: e.g. index stacked, identically-shaped heads with
  ``task_index`` (a gather: only head i is computed). Note that under
  ``jax.vmap`` a ``lax.switch`` over heterogeneous heads becomes a select
  that computes every branch; with ``chunk_size=1`` the tasks run
  sequentially (``lax.map``) and ``lax.switch`` really branches.

  vmap or sequence? On accelerators the single vmapped call is the fast path.
  On XLA:CPU, vmapping a convolutional model over tasks makes its weights
  batched, and the resulting batched matrix products are slow: for the
  multi-MNIST LeNet (batch 256, m = 2) ``chunk_size=1`` (tasks in sequence,
  same maths) was about 1.5–2× faster for both passes
  (``benchmarks/flat_speed.py``). Hence the default ``chunk_size="auto"``:
  1 on CPU, None (one vmapped call) on GPU/TPU.

  Model state (``has_state``: BatchNorm statistics, dropout keys; see
  :func:`mtl_optax.task_grads`). ``loss_fn(params, model_state, *batch)``
  returns ``(losses, new_model_state)``. The new state comes from the
  unperturbed pass at θ only. Every perturbed pass at θ + ε_i starts from the
  same input state and its new state is discarded, as google-research/sam and
  the FS-MTL code (``disable_running_stats`` during the second pass) do:
  running statistics are never updated at perturbed weights, while a
  normalisation layer in training mode still normalises with the statistics
  of the batch at θ + ε_i. A dropout key in the state gives the perturbed
  passes the masks of the unperturbed pass (the same sub-network is
  perturbed and evaluated). ``aux`` (``has_aux``) likewise comes from the
  unperturbed pass.

  If ``perturbation`` is a :func:`task_perturbation` with ρ_sh = ρ_ns = 0 the
  SAM gradients ARE the loss gradients (returned as such, with no extra pass),
  so a flat aggregator reproduces its vanilla version exactly.

  Global or per-replica perturbation. By default ε_i is computed from the
  gradients of the whole batch — under ``jax.jit`` with a batch-sharded mesh,
  the globally reduced gradients — so a sharded step equals the one-device
  step. ``perturbation_groups=k`` splits the batch (axis 0 of every positional
  argument in ``args``) into k equal, contiguous groups; each group computes
  its own losses, gradients, ε_i^(r) and SAM gradients, and the three results
  are averaged over the groups:

      sam_grads[i] = (1/k) Σ_r ∇ L_i^(r)(θ + ε_i^(r)),

  the per-replica ("m-sharpness") SAM of Foret et al. (2021, §4), which some
  SAM variants use in data-parallel training. With k equal to the number of
  data-parallel replicas and the batch sharded contiguously over them, each
  group is one replica's local batch: its perturbation depends on local data
  only, and the averages over groups are the step's collectives.
  The returned losses and loss gradients are the group means, which equal
  the whole-batch ones when every loss is a mean over the batch. ``kwargs``
  and the model state are passed to every group unchanged (never split);
  ``aux`` (``has_aux``) gets a leading group axis of size k. With
  ``has_state`` each group's forward pass normalises with its own batch
  statistics (per-replica BatchNorm) and the new state is the mean of the
  groups' new states, as google-research/sam averages the replicas' BatchNorm
  statistics (for a running mean this equals the whole-batch update). A state
  with non-floating leaves (dropout keys, RNG counters) is refused with groups:
  every group would draw the same masks.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> losses`` of shape (m,)
      (``(losses, aux)`` with ``has_aux``).
    params: parameter pytree.
    *args: positional arguments of ``loss_fn`` (the batch).
    perturbation: the (stateless) transformation giving the offsets, usually
      :func:`task_perturbation`.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    has_state: whether ``args[0]`` is a model state (see above; default False).
    chunk_size: at most this many tasks at once, in both the loss-gradient
      (``task_grads``) and the SAM-gradient passes; None = all at once;
      "auto" (default) = 1 on CPU, None elsewhere.
    mode: ``task_grads`` mode for the loss gradients ("jacrev" or "vmap").
    task_loss_fn: optional ``(params, task_index, *args, **kwargs) -> L_i`` used
      for the perturbed passes instead of ``loss_fn`` (see above).
    perturbation_groups: None (default: one perturbation from the whole batch)
      or k ≥ 1, the number of batch groups perturbed separately (see above).
    **kwargs: keyword arguments of ``loss_fn`` / ``task_loss_fn``.

  Returns:
    ``(losses, loss_grads, sam_grads)`` — or ``((losses, aux), loss_grads,
    sam_grads)`` with ``has_aux``, ``((losses, new_model_state), ...)`` with
    ``has_state`` and ``((losses, (new_model_state, aux)), ...)`` with both —
    the gradients stacked over tasks.

  Reference:
    Phan et al., "Beyond Losses Reweighting: Empowering Multi-Task Learning via
    the Generalization Perspective", ICCV 2025, Algorithm 1.
  """
  if perturbation is None or not hasattr(perturbation, "update"):
    raise ValueError("sharpness_aware_task_grads: pass perturbation=mo.task_perturbation(...).")
  chunk_size = task_grads_lib.resolve_chunk_size(
      chunk_size, "sharpness_aware_task_grads",
      task_grads_lib.loss_jaxpr(loss_fn, params, args, kwargs))
  if perturbation_groups is not None:
    return _grouped_sharpness_aware_task_grads(
        loss_fn, params, args, kwargs, perturbation=perturbation, has_aux=has_aux,
        has_state=has_state, chunk_size=chunk_size, mode=mode, task_loss_fn=task_loss_fn,
        groups=perturbation_groups)
  out, loss_grads = task_grads_lib.task_grads(
      loss_fn, params, *args, mode=mode, chunk_size=chunk_size, has_aux=has_aux,
      has_state=has_state, **kwargs)
  info = perturbation_info(perturbation)
  if info is not None and info.is_zero:
    return out, loss_grads, loss_grads
  offsets, _ = perturbation.update(loss_grads, perturbation.init(params), params)
  _, sam_grads = perturbed_task_grads(loss_fn, params, offsets, *args, has_aux=has_aux,
                                      has_state=has_state, chunk_size=chunk_size,
                                      task_loss_fn=task_loss_fn, **kwargs)
  return out, loss_grads, sam_grads


def _grouped_sharpness_aware_task_grads(loss_fn, params, args, kwargs, *, groups, has_aux,
                                        has_state, **options):
  """``sharpness_aware_task_grads`` with one perturbation per batch group, averaged."""
  where = "sharpness_aware_task_grads"
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f"{where}: perturbation_groups must be a positive int or None, "
                     f"got {groups!r}.")
  task_grads_lib.check_state_args(args, has_state, where)
  model_state, args = (args[0], args[1:]) if has_state else (None, args)
  if has_state:
    for leaf in jax.tree_util.tree_leaves(model_state):
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise ValueError(
            f"{where}: perturbation_groups runs one forward pass per batch group, and the "
            f"model state has a non-floating leaf ({jnp.result_type(leaf)}: a dropout key or "
            "RNG counter) that every group would use alike (the same dropout masks in every "
            "group). Use perturbation_groups=None, or a model without random layers.")
  leaves, treedef = jax.tree_util.tree_flatten(args)
  if not leaves:
    raise ValueError(f"{where}: perturbation_groups splits the batch (axis 0 of the "
                     "positional arguments), but no positional array argument was given.")
  split = []
  for leaf in leaves:
    shape = jnp.shape(leaf)
    if not shape or shape[0] % groups:
      raise ValueError(
          f"{where}: perturbation_groups={groups} must divide the batch axis (axis 0) of "
          f"every positional argument; got an argument of shape {tuple(shape)}.")
    split.append(jnp.reshape(leaf, (groups, shape[0] // groups) + tuple(shape[1:])))
  grouped_args = jax.tree_util.tree_unflatten(treedef, split)

  state_args = (model_state,) if has_state else ()

  def one_group(group_args):
    return sharpness_aware_task_grads(loss_fn, params, *state_args, *group_args,
                                      has_aux=has_aux, has_state=has_state, **options, **kwargs)

  out, loss_grads, sam_grads = jax.vmap(one_group)(grouped_args)
  mean = lambda t: jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), t)
  if has_state:
    # The groups' new states are averaged (per-replica statistics, synchronised); the
    # user's aux keeps its group axis.
    new_state, aux = out[1] if has_aux else (out[1], None)
    new_state = jax.tree_util.tree_map(
        lambda x, old: jnp.mean(x, axis=0).astype(jnp.result_type(old)), new_state, model_state)
    out = (mean(out[0]), (new_state, aux) if has_aux else new_state)
  elif has_aux:
    out = (mean(out[0]), out[1])
  else:
    out = mean(out)
  return out, mean(loss_grads), mean(sam_grads)


class SharpnessReport(NamedTuple):
  """Both sharpness measures of :func:`sharpness` (``grad_diff_norm=True``).

  Attributes:
    loss_increase: L_i(θ + ε_i) − L_i(θ), ``(m,)`` or ``(R, m)``.
    grad_diff_norm: ‖g_i^SAM − g_i‖ over the shared parameters, same shape.
  """
  loss_increase: jax.Array
  grad_diff_norm: jax.Array


def sharpness(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args,
    rhos: Optional[Sequence[float]] = None,
    rho_shared: Optional[float] = None,
    rho_task: Optional[float] = None,
    adaptive: bool = False,
    task_specific=None,
    norm: str = "separate",
    has_aux: bool = False,
    has_state: bool = False,
    mode: str = "jacrev",
    chunk_size: task_grads_lib.ChunkSize = "auto",
    task_loss_fn: Optional[Callable[..., Any]] = None,
    eps: float = 1e-12,
    grad_diff_norm: bool = False,
    **kwargs,
):
  """Per-task sharpness: the loss increase of each task at its own SAM offset.

  For every task i, with ε_i the offset of :func:`task_perturbation` (computed
  from the loss gradients g_i at θ, T = |θ| if ``adaptive`` else 1),

      S_i = L_i(θ + ε_i) − L_i(θ),
      ε_sh^i = ρ_sh · T² g_sh^i / (‖T g_sh^i‖ + eps),
      ε_ns^i = ρ_ns · T² g_ns^i / (‖T g_ns^i‖ + eps),

  i.e. the first-order worst-case loss increase of task i inside its
  perturbation ball: the sharpness the flat method minimises and the FS-MTL
  code logs (``--rho_eval``; its multi-MNIST script uses ``norm="joint"``).
  Beyond first order S_i can be negative (e.g. for a large radius), so it is
  not clipped.

  Two forms (give exactly one of ``rho_shared`` and ``rhos``):

  * ``rho_shared=ρ_sh, rho_task=ρ_ns`` (ρ_ns defaults to ρ_sh): ε_i is exactly
    the output of ``task_perturbation(ρ_sh, ρ_ns, adaptive, task_specific,
    eps, norm=norm)`` — the perturbation used in training; returns ``(m,)``.
  * ``rhos=[ρ_1, ..., ρ_R]``: ρ_sh = ρ_ns = ρ_r for each radius (the offsets
    are linear in ρ, so the loss gradients and the unit offsets are computed
    once; ``rhos`` may be traced); returns ``(R, m)``, row r at ``rhos[r]``.

  Cost: one ``task_grads`` pass, then m forward passes per radius (one vmapped
  call over tasks, or chunks of ``chunk_size``; radii in sequence).

  With ``grad_diff_norm=True`` the same call also reports, per task and
  radius, the norm of the change of the task's gradient across its ball,

      D_i = ‖g_i^SAM − g_i‖,   g_i^SAM = ∇L_i(θ + ε_i),  g_i = ∇L_i(θ),

  over the shared parameters (the leaves not marked by ``task_specific``;
  all leaves when it is None) — the ``grad_norm`` the FS-MTL code logs next
  to the loss increase (``train.py``, ``--rho_eval``): the gradient-norm
  term its bound controls. The perturbed passes then also run backward (m
  forward + backward passes per radius); the norm is overflow-safe (rows
  rescaled by a power of two).

  Args:
    loss_fn, params, *args, has_aux, has_state, mode, chunk_size, task_loss_fn, **kwargs:
      as for :func:`sharpness_aware_task_grads` (``loss_fn(params, *args) ->
      losses (m,)``; the model state of every pass is discarded).
    rhos: several radii (finite, non-negative), or None.
    rho_shared: the shared radius ρ_sh of a single perturbation, or None.
    rho_task: the task-specific radius ρ_ns (default None: ρ_sh).
    adaptive, task_specific, norm, eps: as for :func:`task_perturbation`
      (defaults False, None, "separate", 1e-12).
    grad_diff_norm: also return D_i (default False: the loss increase only,
      as before).

  Returns:
    ``(m,)`` with ``rho_shared=``; ``(len(rhos), m)`` with ``rhos=``. With
    ``grad_diff_norm=True`` a :class:`SharpnessReport` ``(loss_increase,
    grad_diff_norm)`` of two arrays of that shape.

  References:
    Phan et al., "Beyond Losses Reweighting: Empowering Multi-Task Learning via
    the Generalization Perspective", ICCV 2025 (arXiv 2211.13723);
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021 (the sharpness max_{‖ε‖≤ρ} L(θ + ε) − L(θ)).
  """
  if (rhos is None) == (rho_shared is None):
    raise ValueError("sharpness: pass exactly one of rho_shared= (one perturbation, as "
                     "task_perturbation) and rhos= (a list of radii).")
  if rhos is None and rho_task is None:
    rho_task = rho_shared
  if rhos is not None and rho_task is not None:
    raise ValueError("sharpness: rho_task= goes with rho_shared=; with rhos= every radius "
                     "applies to the shared and the task-specific leaves alike.")
  chunk_size = task_grads_lib.resolve_chunk_size(
      chunk_size, "sharpness", task_grads_lib.loss_jaxpr(loss_fn, params, args, kwargs))
  if rhos is None:
    pert = task_perturbation(rho_shared, rho_task,  # type: ignore[arg-type]  # set above
                             adaptive=adaptive,
                             task_specific=task_specific, eps=eps, norm=norm)
  else:
    rho_arr = jnp.atleast_1d(jnp.asarray(rhos))
    if rho_arr.ndim != 1 or rho_arr.shape[0] == 0:
      raise ValueError(f"sharpness: rhos must be a non-empty 1-D sequence, got {rhos!r}.")
    try:
      concrete = [float(r) for r in rho_arr]
    except jax.errors.ConcretizationTypeError:
      concrete = None
    if concrete is not None and not all(r >= 0 and r != float("inf") for r in concrete):
      raise ValueError(f"sharpness: every radius must be finite and non-negative, got {rhos!r}.")
    pert = task_perturbation(1.0, 1.0, adaptive=adaptive, task_specific=task_specific, eps=eps,
                             norm=norm)
  out, grads = task_grads_lib.task_grads(loss_fn, params, *args, mode=mode,
                                         chunk_size=chunk_size, has_aux=has_aux,
                                         has_state=has_state, **kwargs)
  has_aux = task_grads_lib.outputs_aux(has_aux, has_state)
  losses = out[0] if has_aux else out
  directions, _ = pert.update(grads, pert.init(params), params)
  m = losses.shape[0]
  f = _single_task_loss(loss_fn, task_loss_fn, has_aux, args, kwargs)
  if grad_diff_norm:
    shared = [not h for h in base.resolve_task_specific(task_specific, grads, params)]
    if not any(shared):
      raise ValueError("sharpness: grad_diff_norm measures ‖g^SAM − g‖ over the shared "
                       "parameters, and every leaf is marked task-specific.")
    norm_dtype = linalg.accumulation_dtype(jnp.result_type(*jax.tree_util.tree_leaves(grads)))

  def at_radius(rho):
    def one(i, d_i, g_i):
      if rho is None:  # d_i is the offset itself
        point = jax.tree_util.tree_map(lambda p, d: p + d.astype(jnp.result_type(p)), params, d_i)
      else:
        point = jax.tree_util.tree_map(
            lambda p, d: p + (rho * d).astype(jnp.result_type(p)), params, d_i)
      if not grad_diff_norm:
        return f(point, i)
      value, g_sam = jax.value_and_grad(f)(point, i)
      diffs = [(a - b)[None] for a, b, s in zip(jax.tree_util.tree_leaves(g_sam),
                                                jax.tree_util.tree_leaves(g_i), shared) if s]
      return value, _group_norms(diffs, 1, norm_dtype)[0]
    # The loss gradients travel along only when they are needed.
    row_grads = grads if grad_diff_norm else jnp.zeros((m,))
    return task_grads_lib.map_over_tasks(lambda x: one(*x),
                                         (jnp.arange(m), directions, row_grads), chunk_size)

  if rhos is None:
    out = at_radius(None)
    base_losses = losses
  else:
    out = jax.lax.map(at_radius, rho_arr.astype(losses.dtype))
    base_losses = losses[None, :]
  if not grad_diff_norm:
    return out - base_losses
  return SharpnessReport(out[0] - base_losses, out[1].astype(norm_dtype))
