"""The flat (sharpness-aware) wrapper: F-MGDA, F-PCGrad, F-CAGrad, ... for any aggregator.

Phan et al. (ICCV 2025) split each task's SAM gradient into its loss gradient
and a "flat" gradient, g_i^SAM = g_i^loss + g_i^flat, and aggregate the two
families separately with the same gradient aggregator A:

    shared update  d_sh = A(g_sh^{1..m, loss}) + A(g_sh^{1..m, flat}),
    g_sh^{i, flat} = g_sh^{i, SAM} − g_sh^{i, loss},
    head i update  = g_ns^{i, SAM}   (its own SAM gradient).

:func:`flat` wraps any mtl_optax aggregator into that update; the SAM gradients
come from :func:`mtl_optax.sharpness_aware_task_grads`. For aggregators whose
update does not scale linearly with the gradients (Nash-MTL, MGDA with "l2"
normalisation, FairGrad, ...) the flat term is rescaled so that the update
tends to the vanilla one as ρ → 0 (see :func:`flat`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import jacobian as jacobian_lib
from mtl_optax._src import linalg

PyTree = Any

VARIANTS = ("decomposed", "direct", "each", "second")
FLAT_TERMS = ("auto", "sum", "rescaled")

# Beyond r = ‖h‖/‖g‖ = 2^±200 one of the two families is negligible against
# the other (and 2^±r overflows float32): the rescaled flat term is then 0.
_MAX_LOG2_RATIO = 200.0


class FlatState(NamedTuple):
  """State of :func:`flat`: independent states of the inner aggregations.

  Attributes:
    loss: the aggregator's state for the loss gradients ("decomposed",
      "second"), the SAM gradients ("direct") or the final aggregation over
      tasks ("each"). ``mo.diagnostics`` / ``mo.task_weights`` read this one.
    flat: its state for the flat gradients ("decomposed", "second"), else ().
    pair: its state for the aggregations of 2-row stacks ("each": the m
      per-task [loss, flat] pairs, in sequence; "second": [A(loss), A(flat)]),
      else ().
  """
  loss: Any
  flat: Any
  pair: Any


def _stack_shapes(params, rows):
  return jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct((rows,) + jnp.shape(p), jnp.result_type(p)), params)


def _filled_init(aggregator, params_sub, rows, kwargs):
  """``aggregator.init`` with the diagnostics already built for ``rows``-row inputs.

  Keeps the state's structure constant across updates (scan/jit friendly), as
  ``make_aggregator(num_tasks=...)`` does.
  """
  state = aggregator.init(params_sub)
  if not isinstance(state, base.AggregatorState):
    return state
  _, shapes = jax.eval_shape(lambda g, s, p, kw: aggregator.update(g, s, p, **kw),
                             _stack_shapes(params_sub, rows), state, params_sub, kwargs)
  diag = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.diagnostics)
  return state._replace(diagnostics=diag)


def _cast_like(new, old):
  """Casts the leaves of ``new`` to the dtypes of ``old`` (constant scan carry)."""
  def cast(n, o):
    return n if n.dtype == o.dtype else n.astype(o.dtype)
  return jax.tree_util.tree_map(cast, new, old)


def _keep_inner_if(bad, new, old):
  """On a skipped step: advance nothing but the counters (as ``make_aggregator`` does)."""
  if isinstance(new, base.AggregatorState) and isinstance(old, base.AggregatorState):
    inner = jax.tree_util.tree_map(lambda n, o: jnp.where(bad, o, n), new.inner, old.inner)
    return new._replace(inner=inner)
  return new


def _log2_norm(leaves):
  """log₂ of the Frobenius norm of stacked leaves (−inf if all zero), overflow-safe."""
  acc = linalg.accumulation_dtype(leaves[0].dtype)
  top = jnp.max(jnp.stack([jnp.max(jnp.abs(l)).astype(acc) for l in leaves]))
  p = linalg.power_of_two_scale(top)
  sq = sum(jnp.sum(jnp.square(l.astype(acc) / p)) for l in leaves)
  return jnp.log2(p) + 0.5 * jnp.log2(sq)


def _times_exp2(leaves, log2_factor, dtypes):
  """Each leaf times 2^log2_factor, cast to ``dtypes``.

  Two half-size factors: neither overflows when the product is representable,
  even for |log2_factor| > 128 in float32.
  """
  out = []
  for leaf, dt in zip(leaves, dtypes):
    acc = linalg.accumulation_dtype(leaf.dtype)
    half = jnp.floor(0.5 * log2_factor).astype(acc)
    out.append((leaf.astype(acc) * jnp.exp2(half) * jnp.exp2(log2_factor.astype(acc) - half))
               .astype(dt))
  return out


def flat(aggregator, variant: str = "decomposed", *, flat_term: str = "auto",
         task_specific=None):
  """Sharpness-aware (flat) version of an aggregator: F-MGDA, F-CAGrad, F-anything.

  With loss gradients g_i (``updates``) and SAM gradients g_i^SAM = ∇L_i(θ + ε_i)
  (``sam_grads=``, from :func:`mtl_optax.sharpness_aware_task_grads`), shared
  leaves receive, with h_i = g_i^SAM − g_i the flat gradients and A the
  wrapped aggregator,

  * ``"decomposed"`` (default; the paper's method): d = A(g) + T(h), two
    independent aggregations (independent states for stateful methods), T(h)
    the flat term below (A(h) for MGDA, PCGrad, CAGrad, IMTL, mean, ...);
  * ``"direct"``: d = A(g^SAM) (the ablation "aggregate the SAM gradients";
    ``a-cagrad`` etc. in the FS-MTL code);
  * ``"each"``: v_i = A([g_i, h_i]) for each task (A on the 2-row stack of the
    task's loss and flat gradients), then d = A(v_1, ..., v_m);
  * ``"second"``: d = A([A(g), T(h)]) (the two aggregates aggregated again,
    with A on a 2-row stack).

  The flat term. A(h) is O(ρ) only for aggregators of degree 1 in the
  gradients' scale (A(sJ) = s·A(J)); for degree k
  (``AggregatorInfo.scale_degree``) it is O(ρ^k): Nash-MTL or MGDA with "l2"
  normalisation (k = 0) would add an O(1) term at ρ = 1e-6, FairGrad with
  α > 1 (k < 0) a diverging one. We aggregate the flat gradients brought to
  the size of the loss gradients and scale the result back:

      T(h) = r · A(h / r),     r = ‖h‖_F / ‖g‖_F   (shared rows),

  which is A(h) for degree 1, r^{1−k} A(h) for degree k, and O(ρ) for any
  aggregator finite at the gradients' scale, homogeneous or not: d → A(g) as
  ρ → 0, and F-A keeps A's degree. ``flat_term="auto"`` (default) takes
  T(h) = A(h) literally, as the authors' code (F-MGDA, F-PCGrad, F-CAGrad,
  F-IMTL, F-EW, bit for bit), for aggregators declaring ``scale_degree == 1``,
  and r · A(h/r) for all others, including those declaring nothing;
  ``"sum"`` forces A(h) (the authors' formula for any method, e.g. their NYUv2
  F-MGDA with normalised rows), ``"rescaled"`` forces r · A(h/r) (a stateful
  flat aggregation then tracks h/r). T = 0 when h = 0 (ρ = 0 gives exactly the
  vanilla update); the rescaled T is also 0 when g = 0 or r is beyond 2^±200.
  ``"direct"`` is continuous for any continuous A; ``"each"`` is not (A on
  [g_i, h_i] rows of different sizes).

  Each task-specific (head) leaf receives its tasks' SAM gradients: Σ_i g_i^SAM
  (each head its own SAM gradient) for gradient methods; for methods that weight
  the heads (``mean``, ``sum``, loss weightings: ``AggregatorInfo.weight_heads``)
  Σ_i w_i g_i^SAM with the weights w of the ``loss`` aggregation — so
  ``flat(mean)`` is exactly the gradient of (1/m) Σ_i L_i(θ + ε_i), SAM applied to
  every task separately.

  Partition. The wrapper owns the shared / task-specific partition
  (``task_specific=``): the inner aggregator only ever sees the shared leaves
  (head leaves are replaced by ``None`` in the pytrees it receives, key paths
  unchanged), so build it WITHOUT ``task_specific`` (a callable partition on
  it is harmless; a mask pytree no longer matches and raises). With
  ``task_specific=None`` every leaf is shared for the wrapper and the inner
  aggregator's own partition, if any, applies to the loss and the flat
  aggregations separately (heads then get A's head rule applied to g_i and to
  h_i, whose sum is g_i^SAM up to rounding for unweighted heads).

  Non-finite values. If any loss, loss gradient or SAM gradient is NaN/inf,
  the step is skipped: zero update, inner states not advanced (their counts
  are), ``diagnostics["nonfinite_tasks"]`` of the ``loss`` state counts the
  affected tasks.

  Diagnostics. ``mo.diagnostics(state)`` / ``mo.task_weights(state)`` return
  those of the ``loss`` aggregation (see :class:`FlatState`); the flat
  aggregation's are in ``state.flat.diagnostics`` (norms of the flat
  gradients, their weights, ...).

  Args:
    aggregator: any mtl_optax aggregator (``mo.cagrad(c=0.4)``, ...). Build it
      with ``num_tasks=m`` for a state whose structure never changes.
    variant: "decomposed" (default), "direct", "each" or "second". "each" and
      "second" run A on 2-row stacks, so A must not need task losses and must
      not be built with ``num_tasks`` other than 2.
    flat_term: "auto" (default), "sum" or "rescaled": the flat term T(h)
      above ("decomposed" and "second" only).
    task_specific: None (default), a boolean mask pytree or
      ``callable(path, leaf) -> bool`` marking the head leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    ``update(loss_grads, state, params, losses=..., sam_grads=...)``.

  Reference:
    Phan et al., "Beyond Losses Reweighting: Empowering Multi-Task Learning via
    the Generalization Perspective", ICCV 2025 (arXiv 2211.13723), Algorithm 1
    and the ablation of the aggregation strategies.
  """
  inner_info = base.aggregator_info(aggregator)
  if variant not in VARIANTS:
    raise ValueError(f"flat: variant must be one of {VARIANTS}, got {variant!r}.")
  if flat_term not in FLAT_TERMS:
    raise ValueError(f"flat: flat_term must be one of {FLAT_TERMS}, got {flat_term!r}.")
  if flat_term != "auto" and variant not in ("decomposed", "second"):
    raise ValueError(f"flat: flat_term={flat_term!r} only applies to the 'decomposed' and "
                     f"'second' variants, not {variant!r}.")
  # Only the paper's A(h) is kept for methods of degree 1; anything else (other
  # degrees, undeclared) gets the rescaled term, continuous for every method.
  rescaled = (flat_term == "rescaled"
              or (flat_term == "auto" and inner_info.scale_degree != 1))
  if variant in ("each", "second") and inner_info.needs_losses:
    raise ValueError(
        f"flat(variant={variant!r}) aggregates 2-row stacks of gradients that have no task "
        f"losses, but {inner_info.name} needs losses=; use 'decomposed' or 'direct', or a "
        "gradient-based aggregator.")
  name = f"flat_{inner_info.name}"
  info = dataclasses.replace(inner_info, name=name)

  def heads_of(tree_stacked, params):
    return base.resolve_task_specific(task_specific, tree_stacked, params)

  def subtree(treedef, leaves, heads):
    return jax.tree_util.tree_unflatten(treedef, [None if h else l for l, h in zip(leaves, heads)])

  def call(tx_update, grads, state, params, kwargs):
    try:
      return tx_update(grads, state, params, **kwargs)
    except ValueError as e:
      if task_specific is not None and "task_specific" in str(e):
        raise ValueError(
            f"{name}: the wrapped aggregator has its own task_specific mask, but the flat "
            "wrapper owns the partition and hands it the shared leaves only: build the "
            f"aggregator without task_specific= ({e})") from None
      raise

  def init_fn(params):
    shapes = _stack_shapes(params, 1)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    heads = heads_of(shapes, params) if leaves else []
    if leaves and all(heads):
      raise ValueError(f"{name}: every leaf is marked task-specific; nothing to aggregate.")
    p_sub = subtree(treedef, leaves, heads)
    loss_state = aggregator.init(p_sub)
    flat_state = aggregator.init(p_sub) if variant in ("decomposed", "second") else ()
    pair_state = ()
    if variant in ("each", "second"):
      try:
        pair_state = _filled_init(aggregator, p_sub, 2, {})
      except ValueError as e:
        raise ValueError(
            f"{name}: variant {variant!r} runs the aggregator on 2-row stacks, which failed "
            f"({e}); build it without num_tasks (or with num_tasks=2).") from None
    return FlatState(loss=loss_state, flat=flat_state, pair=pair_state)

  def update_fn(updates, state, params=None, **extra):
    if not isinstance(state, FlatState):
      raise TypeError(f"{name}: state must come from this transformation's init.")
    sam_grads = extra.pop("sam_grads", None)
    if sam_grads is None:
      raise ValueError(
          f"{name} needs the SAM gradients: call update(loss_grads, state, params, "
          "losses=losses, sam_grads=sam_grads) with the output of "
          "mo.sharpness_aware_task_grads(loss_fn, params, *batch, perturbation=...).")
    if isinstance(updates, jacobian_lib.FactoredJacobian):
      raise TypeError(f"{name}: flat aggregators need the stacked gradients of "
                      "mo.sharpness_aware_task_grads, not a FactoredJacobian.")
    m = base.num_tasks_of(updates, name)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    try:
      sam_leaves = treedef.flatten_up_to(sam_grads)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{name}: sam_grads must have the structure of the loss gradients: "
                       f"{e}") from None
    for g, s in zip(leaves, sam_leaves):
      if jnp.shape(s) != g.shape:
        raise ValueError(f"{name}: sam_grads leaf of shape {jnp.shape(s)} does not match "
                         f"the loss gradient leaf of shape {g.shape}.")
    losses = base.check_losses(extra.pop("losses", None), m, name, inner_info.needs_losses)
    heads = heads_of(updates, params)
    if all(heads):
      raise ValueError(f"{name}: every leaf is marked task-specific; nothing to aggregate.")

    # Non-finite inputs: skip the step (rows zeroed so the solvers stay finite).
    finite = jacobian_lib.rows_finite(leaves + list(sam_leaves), m)
    if losses is not None:
      finite = finite & jnp.isfinite(losses)
    n_bad = jnp.sum(~finite).astype(jnp.int32)
    bad = n_bad > 0

    leaves = [jacobian_lib.zero_rows(l, finite) for l in leaves]
    sam_leaves = [jacobian_lib.zero_rows(jnp.asarray(s, l.dtype), finite)
                  for s, l in zip(sam_leaves, leaves)]
    if losses is not None:
      losses = jnp.where(finite, losses, jnp.ones((), losses.dtype))
    kwargs = dict(extra)
    if losses is not None:
      kwargs["losses"] = losses
    p_sub = None
    if params is not None:
      p_sub = subtree(treedef, treedef.flatten_up_to(params), heads)

    loss_sub = subtree(treedef, leaves, heads)
    sam_sub = subtree(treedef, sam_leaves, heads)
    flat_sub = subtree(treedef, [s - l for s, l in zip(sam_leaves, leaves)], heads)
    add = lambda a, b: jax.tree_util.tree_map(lambda x, y: x + y, a, b)
    new_flat, new_pair = state.flat, state.pair

    def flat_term_of(flat_state):
      if not rescaled:
        return call(aggregator.update, flat_sub, flat_state, p_sub, kwargs)
      # T(h) = r · A(h / r), r = ‖h‖/‖g‖, in log₂ (no overflow for any r).
      g_sh = [l for l, h in zip(leaves, heads) if not h]
      h_sh = jax.tree_util.tree_leaves(flat_sub)
      log_g, log_h = _log2_norm(g_sh), _log2_norm(h_sh)
      log_r = log_h - log_g
      ok = jnp.abs(log_r) <= _MAX_LOG2_RATIO   # False for h = 0 or g = 0 (and NaN)
      log_r = jnp.where(ok, log_r, 0.0)
      h_tilde = _times_exp2(h_sh, -log_r, [l.dtype for l in h_sh])
      h_tilde = [jnp.where(ok, x, jnp.zeros((), x.dtype)) for x in h_tilde]
      h_tilde = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(flat_sub), h_tilde)
      d_tilde, new_state = call(aggregator.update, h_tilde, flat_state, p_sub, kwargs)
      d_leaves, d_def = jax.tree_util.tree_flatten(d_tilde)
      t = _times_exp2(d_leaves, log_r, [d.dtype for d in d_leaves])
      t = [jnp.where(ok, x, jnp.zeros((), x.dtype)) for x in t]
      return jax.tree_util.tree_unflatten(d_def, t), new_state

    if variant == "decomposed":
      d_loss, new_loss = call(aggregator.update, loss_sub, state.loss, p_sub, kwargs)
      d_flat, new_flat = flat_term_of(state.flat)
      shared = add(d_loss, d_flat)
    elif variant == "direct":
      shared, new_loss = call(aggregator.update, sam_sub, state.loss, p_sub, kwargs)
    elif variant == "second":
      d_loss, new_loss = call(aggregator.update, loss_sub, state.loss, p_sub, kwargs)
      d_flat, new_flat = flat_term_of(state.flat)
      pair = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), d_loss, d_flat)
      shared, new_pair = call(aggregator.update, pair, state.pair, p_sub, extra_kw(kwargs))
      new_pair = _cast_like(new_pair, state.pair)
    else:  # "each"
      def body(pair_state, rows):
        g_i, h_i = rows
        pair = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g_i, h_i)
        v_i, pair_state_new = call(aggregator.update, pair, pair_state, p_sub, extra_kw(kwargs))
        return _cast_like(pair_state_new, pair_state), v_i

      new_pair, per_task = jax.lax.scan(body, state.pair, (loss_sub, flat_sub))
      shared, new_loss = call(aggregator.update, per_task, state.loss, p_sub, kwargs)

    # Heads: their tasks' SAM gradients (weighted like the inner method weights heads).
    head_w = None
    if inner_info.weight_heads and isinstance(new_loss, base.AggregatorState):
      head_w = new_loss.diagnostics.get("weights")
    if head_w is None:
      head_w = jnp.ones((m,), linalg.accumulation_dtype(leaves[0].dtype))
    shared_leaves = iter(jax.tree_util.tree_leaves(shared))
    out = []
    for leaf, s, h in zip(leaves, sam_leaves, heads):
      u = linalg.combine(head_w, s) if h else next(shared_leaves).astype(leaf.dtype)
      out.append(jnp.where(bad | ~jnp.isfinite(u), jnp.zeros((), u.dtype), u))

    new_loss = _keep_inner_if(bad, new_loss, state.loss)
    if isinstance(new_loss, base.AggregatorState) and "nonfinite_tasks" in new_loss.diagnostics:
      new_loss = new_loss._replace(diagnostics={**new_loss.diagnostics, "nonfinite_tasks": n_bad})
    new_state = FlatState(loss=new_loss, flat=_keep_inner_if(bad, new_flat, state.flat),
                          pair=_keep_inner_if(bad, new_pair, state.pair))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  def extra_kw(kwargs):
    # Extra keyword arguments for the aggregations whose rows are not tasks
    # (no task losses there).
    return {k: v for k, v in kwargs.items() if k != "losses"}

  update_fn.mtl_info = info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
