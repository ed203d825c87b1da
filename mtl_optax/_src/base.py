"""The aggregator protocol: stacked per-task gradients → one optax update.

Every method of the library is an ``optax.GradientTransformationExtraArgs``
whose ``update`` takes the *stacked* per-task gradients (the structure of the
parameters, every leaf with a leading task axis of size m) and returns an update
with the structure of the parameters (no task axis). This module implements
everything the methods share:

* validation of the stacked pytree (the task axis, a consistent m, ``losses=``),
* the shared / task-specific partition (``task_specific=``: a boolean mask pytree
  or ``callable(path, leaf) -> bool``); shared leaves are aggregated, each
  task-specific (head) leaf receives its own task's gradient,
* the Gram matrix of the shared rows (float32 or better, overflow-safe),
* the weighted recombination d = Jᵀw,
* the non-finite policy,
* the state (:class:`AggregatorState`, a pytree of arrays) with diagnostics.

A method only writes a *rule*: a function from a :class:`TaskGradients` view
(the Gram matrix, the shared leaves, the losses, ...) and its own inner state to
a :class:`RuleOutput` holding either task weights ``w`` (then d = Jᵀw) or the
shared update directly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import jacobian as jacobian_lib
from mtl_optax._src import linalg

Array = jax.Array
PyTree = Any
TaskSpecific = Union[None, PyTree, Callable[[tuple, Any], bool]]

NONFINITE_POLICIES = ("skip", "zero_task")


class AggregatorState(NamedTuple):
  """State of an mtl_optax aggregator.

  Attributes:
    inner: the method's own state (learnable weights, EMAs, PRNG key, ...).
    diagnostics: dict of arrays refreshed at every update (``weights`` for
      weighted methods, ``gram``, ``cosines``, ``norms``, ``conflicts``,
      ``nonfinite_tasks`` and method-specific solver residuals).
    count: number of updates applied (int32).
  """
  inner: Any
  diagnostics: dict
  count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count


class TaskGradients(NamedTuple):
  """What a rule sees of one step's per-task gradients.

  Attributes:
    shared: stacked shared leaves, each ``(m, ...)`` (flatten with
      :func:`linalg.task_rows`). From a :class:`FactoredJacobian` these are
      materialised blocks, formed only if the rule reads them.
    gram: ``(m, m)`` Gram matrix of the shared rows divided by ``scale²``
      (float32 or float64).
    scale: the common power-of-two divisor of the rows (so the true Gram
      matrix is ``scale² * gram``). Weights of scale-invariant methods are
      computed from ``gram`` directly.
    row_gram: ``(m, m)`` Gram matrix of the rows r_i = g_i / row_scales_i, each
      divided by its own power of two: always well scaled, even when task
      gradients differ by 1e±30 (use it for per-row normalisations, with
      :func:`linalg.scaled_gram`).
    row_scales: ``(m,)`` those powers of two (g_i = row_scales_i · r_i).
    losses: ``(m,)`` task losses, or None when not passed.
    params: the parameters passed to ``update`` (may be None).
    extra: the other keyword arguments passed to ``update``.
    num_tasks: m (static int).
  """
  shared: list
  gram: Array
  scale: Array
  losses: Optional[Array]
  params: Any
  extra: Mapping[str, Any]
  num_tasks: int
  row_gram: Optional[Array] = None
  row_scales: Optional[Array] = None


class RuleOutput(NamedTuple):
  """What a rule returns.

  Exactly one of ``weights`` (then the shared update is Σ_i w_i g_i) and
  ``shared_update`` (a list like ``TaskGradients.shared`` without task axis)
  is set. ``head_weights`` optionally weights the task-specific leaves
  (default: the method's ``weight_heads`` policy).
  """
  state: Any = ()
  weights: Optional[Array] = None
  shared_update: Optional[list] = None
  head_weights: Optional[Array] = None
  diagnostics: Mapping[str, Array] = {}


Rule = Callable[[TaskGradients, Any], RuleOutput]


@dataclasses.dataclass(frozen=True)
class AggregatorInfo:
  """Static facts about a method, attached to its ``update`` function.

  Attributes:
    name: the method's public name.
    needs_losses: whether ``update`` requires ``losses=``.
    weighted: whether the shared update is Jᵀw with w in the diagnostics.
    stochastic: whether it draws random numbers (PRNG key in the state).
    representation: how the method behaves on shared-representation
      gradients: "exact" (same update as on parameter gradients),
      "variant" (a published different method, e.g. MGDA-UB) or "invalid".
    weight_heads: whether task-specific leaves are multiplied by the task
      weights (resolved per instance by ``make_aggregator``).
    reads_rows: whether the rule reads the gradient rows themselves
      (``TaskGradients.shared``) rather than only the Gram matrix; a rule that
      returns ``shared_update`` reads them whatever this says. Lets
      ``mode="auto"`` keep such methods off the factored engine, where rows
      are formed from the factors at extra cost.
    scale_degree: the degree k of the update in the scale of the gradients:
      multiplying every task gradient by s > 0 (and, for stateful methods,
      the gradients that built the state) multiplies the update by s^k —
      exactly (A(sJ) = s^k A(J)), or at least in order (‖A(sJ)‖ = Θ(s^k) as
      s → 0, e.g. bounded weights that depend on the scale). k = 1 for loss
      weightings and for most gradient methods, 0 for methods whose update
      norm ignores the gradients' scale (Nash-MTL, MGDA with "l2"
      normalisation), (1 − α)/(1 + α) for FairGrad. None (the default):
      unknown, or no single degree (CDTT). :func:`mtl_optax.flat` uses it: only
      methods declaring k = 1 get the paper's flat term A(h) as is.
  """
  name: str
  needs_losses: bool = False
  weighted: bool = True
  stochastic: bool = False
  representation: str = "invalid"
  weight_heads: Optional[bool] = None
  reads_rows: bool = False
  scale_degree: Optional[float] = None


def aggregator_info(tx) -> AggregatorInfo:
  """Returns the :class:`AggregatorInfo` of an mtl_optax aggregator."""
  info = getattr(getattr(tx, "update", None), "mtl_info", None)
  if info is None:
    raise TypeError(f"{tx!r} is not an mtl_optax aggregator (no AggregatorInfo attached).")
  return info


# ---------------------------------------------------------------------------
# Validation and partition.
# ---------------------------------------------------------------------------

def _leaves_with_paths(tree):
  return jax.tree_util.tree_flatten_with_path(tree)


def num_tasks_of(grads: PyTree, name: str = "aggregator") -> int:
  """The common leading size m of all leaves of a stacked pytree (trace-time check)."""
  leaves_paths, _ = _leaves_with_paths(grads)
  if not leaves_paths:
    raise ValueError(f"{name}: the stacked gradient pytree has no leaves.")
  sizes: dict = {}
  for path, leaf in leaves_paths:
    if not hasattr(leaf, "shape") or jnp.ndim(leaf) == 0:
      raise ValueError(
          f"{name}: leaf {jax.tree_util.keystr(path)} is a scalar; stacked per-task "
          "gradients need a leading task axis (did you pass plain gradients instead of "
          "the output of mo.task_grads?).")
    sizes.setdefault(int(leaf.shape[0]), []).append(jax.tree_util.keystr(path))
  if len(sizes) > 1:
    detail = "; ".join(f"m={k} at {v[0]}" for k, v in sizes.items())
    raise ValueError(
        f"{name}: inconsistent task axis across leaves ({detail}). Every leaf of the "
        "stacked gradients must have the same leading size m (number of tasks).")
  return next(iter(sizes))


def resolve_task_specific(task_specific: TaskSpecific, grads: PyTree, params: PyTree = None):
  """Boolean mask (list, one per leaf of ``grads``) marking task-specific leaves.

  ``task_specific`` is None (all shared), a pytree of booleans with the structure
  of the parameters, or ``callable(path, leaf) -> bool`` called with each leaf's
  key path and a ``jax.ShapeDtypeStruct`` of the parameter (the gradient leaf
  without its task axis).
  """
  leaves_paths, treedef = _leaves_with_paths(grads)
  if task_specific is None:
    return [False] * len(leaves_paths)
  if callable(task_specific) and not isinstance(task_specific, (dict, list, tuple)):
    out = []
    for path, leaf in leaves_paths:
      spec = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
      out.append(bool(task_specific(path, spec)))
    return out
  try:
    mask_leaves = treedef.flatten_up_to(task_specific)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "task_specific mask must have the structure of the parameters "
        f"(a pytree of booleans); got a mismatch: {e}") from None
  return [bool(x) for x in mask_leaves]


def check_losses(losses, m: int, name: str, required: bool):
  """Validates ``losses=``: shape (m,), floating; raises a clear error otherwise."""
  if losses is None:
    if required:
      raise ValueError(
          f"{name} is a loss-based method: call update(grads, state, params, "
          "losses=losses) with the (m,) vector of task losses.")
    return None
  losses = jnp.asarray(losses)
  if losses.shape != (m,):
    raise ValueError(
        f"{name}: losses must have shape (m,) = ({m},) to match the task axis of the "
        f"gradients, got {losses.shape}.")
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise TypeError(f"{name}: losses must be floating point, got {losses.dtype}.")
  return losses


# ---------------------------------------------------------------------------
# The generic transformation.
# ---------------------------------------------------------------------------

def base_diagnostics(row_gram: Array, row_scales: Array) -> dict:
  """Diagnostics every method reports: Gram, cosines, norms, conflicting pairs.

  Computed from the per-row-scaled Gram matrix, so cosines and norms are exact
  even for gradients of wildly different magnitudes; the true Gram matrix
  ``gram`` may overflow to inf for gradients beyond ~1e19 in float32.
  """
  cos = linalg.cosine_matrix(row_gram)
  m = row_gram.shape[0]
  off_diag = ~jnp.eye(m, dtype=bool)
  return {
      "gram": row_gram * row_scales[:, None] * row_scales[None, :],
      "cosines": cos,
      "norms": linalg.safe_norms(row_gram) * row_scales,
      "conflicts": jnp.sum((cos < 0) & off_diag).astype(jnp.int32) // 2,
  }


# Bounds on every non-zero ‖g_i‖² for the one-pass Gram path (see _gram_and_finite).
_FAST_MIN_SQ_NORM = 2.0 ** -40
_FAST_MAX_SQ_NORM = 2.0 ** 100


@functools.partial(jax.jit, static_argnums=(1,))
def _gram_and_finite(jac, shared_idx: tuple, heads_finite):
  """Per-row-scaled Gram pair and per-task finiteness, in one pass in the common case.

  G = JJᵀ is the plain Gram matrix of the shared leaves ``shared_idx`` of ``jac`` (a
  stacked or factored Jacobian); the rows themselves are read again only on the rare
  exact path (so a factored Jacobian is not materialised otherwise). When G's
  diagonal is finite and every ‖g_i‖² lies in [2⁻⁴⁰, 2¹⁰⁰], every task row is finite
  (a NaN or inf entry makes ‖g_i‖² non-finite), no product or sum over- or
  underflows beyond round-off (underflowed products total < P·2⁻¹²⁶ ≪ eps·2⁻⁴⁰), and
  the per-row-scaled pair follows exactly from G: s_i = the power of two nearest
  ‖g_i‖, R = diag(1/s) G diag(1/s). Otherwise (non-finite entries; gradients beyond
  ~1e±12 ... 1e15; a zero ‖g_i‖², which is either a zero row or a row of ~1e-23
  whose squares underflowed in float32 and cannot be told apart from G alone) the
  exact path runs instead (``lax.cond``: one branch executes): per-task finiteness,
  non-finite rows zeroed, rows divided by powers of two near their largest entry
  before the products. The common case thus reads the gradients once, not four times
  (finiteness, zeroing, row maxima, Gram).

  Returns ``(row_gram, row_scales, finite)``; ``finite`` is also and-ed with
  ``heads_finite`` (the task-specific leaves and the losses).

  Jitted so that an update run outside ``jax.jit`` compiles this step once per
  shapes: traced afresh at every call, its ``lax.cond`` (whose branches are
  closures) would be compiled again at every eager step.
  """
  m = heads_finite.shape[0]
  gram = jac.gram(shared_idx)
  diag = jnp.diagonal(gram)
  in_range = (diag >= _FAST_MIN_SQ_NORM) & (diag <= _FAST_MAX_SQ_NORM)
  fast = jnp.all(jnp.isfinite(diag) & in_range)

  def one_pass(_):
    scales = linalg.power_of_two_scale(jnp.sqrt(diag))
    inv = 1.0 / scales   # exact: powers of two within [2^-20, 2^50]
    return gram * inv[:, None] * inv[None, :], scales.astype(gram.dtype), jnp.ones((m,), bool)

  def exact(_):
    shared = [jac.leaf(i) for i in shared_idx]
    finite = jacobian_lib.rows_finite(shared, m)
    clean = [jacobian_lib.zero_rows(l, finite) for l in shared]
    scales = linalg.power_of_two_scale(linalg.rows_max_abs(clean))
    row_gram = linalg.gram_matrix(clean, scales[:, None])
    return row_gram.astype(gram.dtype), scales.astype(gram.dtype), finite

  row_gram, row_scales, finite = jax.lax.cond(fast, one_pass, exact, None)
  return row_gram, row_scales, finite & heads_finite


# Stack of trace-time recorders (see row_reading_probe); never touched at run time.
_ROWS_PROBE: list = []


class row_reading_probe:  # pylint: disable=invalid-name
  """Records whether a transformation's aggregators read the gradient rows.

  While a transformation is traced inside the block, one bool per aggregation
  is appended to the list it yields.

  Used by :func:`mtl_optax.resolve_engine` on an abstract trace
  (``jax.eval_shape``): nothing runs and nothing is kept after the block.
  """

  def __enter__(self) -> list:
    _ROWS_PROBE.append([])
    return _ROWS_PROBE[-1]

  def __exit__(self, *exc):
    _ROWS_PROBE.pop()
    return False


def note_reads_rows():
  """Tells an active :class:`row_reading_probe` that the caller needs stacked rows.

  For transformations that wrap an aggregator and read the stacked gradients
  themselves (Auto-Lambda, MOML, FORUM): ``mode="auto"`` then keeps them on
  the stacked engine.
  """
  if _ROWS_PROBE:
    _ROWS_PROBE[-1].append(True)


def make_aggregator(
    rule: Rule,
    info: AggregatorInfo,
    *,
    init_inner: Callable[[Any, Optional[int]], Any] = lambda params, m: (),
    task_specific: TaskSpecific = None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
  """Builds the optax transformation of a method from its rule.

  Args:
    rule: ``(TaskGradients, inner_state) -> RuleOutput``.
    info: static facts about the method.
    init_inner: ``(params, num_tasks) -> inner state``.
    task_specific: partition of the parameters into shared and task-specific
      (head) leaves: None (all shared), a boolean mask pytree, or
      ``callable(path, leaf) -> bool``.
    weight_heads: whether head leaves are multiplied by the task weights. None
      uses our convention: loss weightings weight the heads (as a weighted
      loss would), gradient methods give each head its own unweighted task
      gradient (as TorchJD's ``mtl_backward`` and most of LibMTL's gradient
      methods; LibMTL's ``Nash_MTL``, ``FairGrad`` and ``ExcessMTL``
      back-propagate Σ w_i L_i and so weight the heads: pass True for those).
    num_tasks: m. Optional for stateless methods; when given, ``init`` builds
      the full diagnostics so the state's structure never changes (no
      recompilation of a jitted step, ``lax.scan``-friendly, checkpoint
      templates). Without it the first update fills the diagnostics in.
    nonfinite: policy when a task's gradient or loss has a NaN/inf:
      "skip" (default; the update is zero, the inner state is not advanced,
      as ``optax.apply_if_finite`` does) or "zero_task" (the offending task's
      gradients are zeroed and its loss replaced by the mean of the finite
      losses, then the method runs). Either way ``diagnostics["nonfinite_tasks"]``
      counts the affected tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``update`` takes the
    stacked per-task gradients (:func:`mtl_optax.task_grads`) or a
    :class:`mtl_optax.FactoredJacobian` (:func:`mtl_optax.factored_task_grads`):
    the Gram matrix, the combination Σ_i w_i g_i and the finiteness checks are
    then computed from the factors, and the rows are formed only for rules
    that return ``shared_update`` (or on the rare exact-scaling path).
  """
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}.")
  if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}.")
  heads_weighted = info.needs_losses if weight_heads is None else bool(weight_heads)
  info = dataclasses.replace(info, weight_heads=heads_weighted)

  def update_fn(updates, state, params=None, **extra):
    if not isinstance(state, AggregatorState):
      raise TypeError(f"{info.name}: state must come from this transformation's init.")
    jac = (updates if isinstance(updates, jacobian_lib.FactoredJacobian)
           else jacobian_lib.StackedJacobian(updates))
    m = num_tasks_of(jac.shapes, info.name)
    if num_tasks is not None and m != num_tasks:
      raise ValueError(
          f"{info.name}: the gradients have a task axis of size {m} but the "
          f"transformation was built with num_tasks={num_tasks}.")
    losses = check_losses(extra.pop("losses", None), m, info.name, info.needs_losses)
    leaves, treedef = jac.leaves(), jac.treedef
    heads = resolve_task_specific(task_specific, jac.shapes, params)
    shared_idx = [i for i, h in enumerate(heads) if not h]
    head_idx = [i for i, h in enumerate(heads) if h]
    if not shared_idx:
      raise ValueError(
          f"{info.name}: every leaf is marked task-specific; there is nothing to "
          "aggregate (check task_specific=).")

    heads_finite = jac.task_finite(head_idx)
    if losses is not None:
      heads_finite = heads_finite & jnp.isfinite(losses)
    row_gram, row_scales, finite = _gram_and_finite(jac, tuple(shared_idx), heads_finite)
    n_bad = jnp.sum(~finite).astype(jnp.int32)
    if nonfinite == "zero_task":
      # The method runs on the finite tasks only. (With "skip" the whole step
      # is discarded, so the gradients are not copied: the rule may see
      # non-finite rows, its outputs are replaced below.)
      jac = jac.where_finite(finite)
      leaves = jac.leaves()
    if losses is not None:
      mean_ok = linalg.safe_div(jnp.sum(jnp.where(finite, losses, 0.0)),
                                jnp.sum(finite).astype(losses.dtype), fill=1.0)
      losses = jnp.where(finite, losses, mean_ok)

    shared = [leaves[i] for i in shared_idx]
    scale = jnp.max(row_scales)
    gram = linalg.scaled_gram(row_gram, jnp.log2(row_scales))
    view = TaskGradients(shared=shared, gram=gram, scale=scale, losses=losses,
                         params=params, extra=extra, num_tasks=m, row_gram=row_gram,
                         row_scales=row_scales)
    out = rule(view, state.inner)
    if _ROWS_PROBE:   # trace-time record for mode="auto" (see row_reading_probe)
      _ROWS_PROBE[-1].append(info.reads_rows or out.weights is None)

    diag = base_diagnostics(row_gram, row_scales)
    if out.weights is not None:
      weights = out.weights
      shared_out = [jac.combine(weights, i) for i in shared_idx]
      diag["weights"] = weights.astype(gram.dtype)
    else:
      if out.shared_update is None:
        raise RuntimeError(f"{info.name}: the rule returned neither weights nor an update.")
      shared_out = [u.astype(l.dtype) for u, l in zip(out.shared_update, shared)]
    head_w = out.head_weights
    if head_w is None:
      head_w = (weights if (heads_weighted and out.weights is not None)
                else jnp.ones((m,), gram.dtype))
    diag.update(out.diagnostics)
    diag["nonfinite_tasks"] = n_bad

    new_leaves = list(leaves)
    for i, u in zip(shared_idx, shared_out):
      new_leaves[i] = u
    for i, h in enumerate(heads):
      if h:
        new_leaves[i] = jac.combine(head_w, i)
    new_leaves = [jnp.where(jnp.isfinite(u), u, jnp.zeros((), u.dtype)) for u in new_leaves]
    new_inner = out.state

    if nonfinite == "skip":
      any_bad = n_bad > 0
      new_leaves = [jnp.where(any_bad, jnp.zeros_like(u), u) for u in new_leaves]
      new_inner = jax.tree_util.tree_map(
          lambda new, old: jnp.where(any_bad, old, new), new_inner, state.inner)
      # A skipped step's rule diagnostics may come from non-finite rows: non-finite
      # entries are reported as 0 (the Gram-based ones are computed without them).
      diag = jax.tree_util.tree_map(
          lambda d: jnp.where(any_bad & ~jnp.isfinite(d), jnp.zeros((), d.dtype), d)
          if jnp.issubdtype(d.dtype, jnp.inexact) else d, diag)
    new_state = AggregatorState(inner=new_inner, diagnostics=diag, count=state.count + 1)
    return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

  def init_fn(params):
    inner = init_inner(params, num_tasks)
    state = AggregatorState(inner=inner, diagnostics={}, count=jnp.zeros((), jnp.int32))
    if num_tasks is None:
      return state
    stacked = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct((num_tasks,) + jnp.shape(p), jnp.result_type(p)), params)
    kwargs = ({"losses": jax.ShapeDtypeStruct((num_tasks,), jnp.float32)}
              if info.needs_losses else {})
    _, shapes = jax.eval_shape(lambda g, s, p, kw: update_fn(g, s, p, **kw),
                               stacked, state, params, kwargs)
    diag = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.diagnostics)
    return state._replace(diagnostics=diag)

  update_fn.mtl_info = info  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_states(state):
  return [s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, AggregatorState)) if isinstance(s, AggregatorState)]


def diagnostics(state) -> dict:
  """The diagnostics dict of the (first) mtl_optax aggregator inside ``state``.

  Works on an aggregator's own state and on the state of an ``optax.chain``.
  """
  found = _find_states(state)
  if not found:
    raise ValueError("No mtl_optax aggregator state found in the given optimizer state.")
  return dict(found[0].diagnostics)


def task_weights(state) -> Array:
  """The last task weights w (d = Jᵀw) of the aggregator inside ``state``."""
  diag = diagnostics(state)
  if "weights" not in diag:
    raise ValueError(
        "This aggregator exposes no task weights (it is not a weighted method, or it "
        "was built without num_tasks and has not been updated yet).")
  return diag["weights"]


def check_positive(name: str, **values):
  """Raises ValueError if any hyper-parameter is not a finite positive number."""
  for k, v in values.items():
    if not (isinstance(v, (int, float)) and v > 0 and v == v and v != float("inf")):
      raise ValueError(f"{name}: {k} must be a finite positive number, got {v!r}.")


def check_nonnegative(name: str, **values):
  """Raises ValueError if any hyper-parameter is negative or not finite."""
  for k, v in values.items():
    if not (isinstance(v, (int, float)) and v >= 0 and v != float("inf")):
      raise ValueError(f"{name}: {k} must be a finite non-negative number, got {v!r}.")

