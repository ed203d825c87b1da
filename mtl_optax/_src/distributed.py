"""Scale-out helpers: sharding layouts, Explicit-axes meshes, gradient accumulation.

mtl_optax needs no communication code of its own. Every aggregator is a pure
function of the stacked per-task gradients, so under ``jax.jit`` with
``NamedSharding`` inputs XLA's SPMD partitioner inserts the collectives:

* **data parallel** (batch sharded over a mesh axis, parameters replicated):
  each task loss is a mean over the *global* batch, so the per-task gradients
  returned by :func:`mtl_optax.task_grads` are already reduced across replicas
  (an all-reduce inserted by XLA) before the aggregator sees them. The Gram
  matrix, the solver and the task weights are therefore computed from the
  global gradients, identically on every replica;
* **model sharded** (large shared leaves split over a mesh axis): the stacked
  gradient of a leaf sharded as ``P(None, "model")`` is sharded as
  ``P(None, None, "model")``; the Gram matrix contracts the sharded axis
  (partial products plus an all-reduce of an m × m matrix), the weights are
  replicated and d = Jᵀw keeps the leaf's sharding.

The helpers below only build ``NamedSharding`` layouts, place arrays with
``jax.device_put``, run an update with a mesh's Explicit axes treated as Auto
(:func:`auto_axes`), and accumulate stacked gradients with ``optax.MultiSteps``
(:func:`accumulate_task_grads`). See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


# ---------------------------------------------------------------------------
# Layouts.
# ---------------------------------------------------------------------------

def replicated(mesh: Mesh) -> NamedSharding:
  """A ``NamedSharding`` that keeps a full copy of an array on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: Union[str, Sequence[str]] = "data") -> NamedSharding:
  """A ``NamedSharding`` that splits an array's leading (batch) axis over ``axis``.

  Args:
    mesh: the device mesh.
    axis: a mesh axis name, or a tuple of names (the batch is then split over
      their product, e.g. ``("data", "fsdp")``).
  """
  return NamedSharding(mesh, P(axis))


def shard_batch(batch: PyTree, mesh: Mesh, axis: Union[str, Sequence[str]] = "data") -> PyTree:
  """Places every leaf of ``batch`` with its leading axis split over ``axis``.

  Only for single-process use (every leaf is a full host array). On several
  hosts, build the global batch from per-host pieces with
  ``jax.make_array_from_process_local_data(batch_sharding(mesh, axis), local)``.
  """
  sharding = batch_sharding(mesh, axis)
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)


def _largest_divisible_dim(shape, n):
  best = None
  for d, size in enumerate(shape):
    if size % n == 0 and size >= n and (best is None or size >= shape[best]):
      best = d
  return best


def model_sharding(params: PyTree, mesh: Mesh, axis: str = "model",
                   min_size: int = 2 ** 14) -> PyTree:
  """Shardings that split each large parameter leaf over one mesh axis.

  A leaf with at least ``min_size`` elements is split along its largest
  dimension divisible by the size of ``axis`` (the last such dimension on a
  tie); smaller leaves, and leaves with no divisible dimension, are
  replicated. This is a simple "shard the big matrices" layout for shared
  trunks; any other ``NamedSharding`` layout works the same way with the
  aggregators.

  Args:
    params: a parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    mesh: the device mesh.
    axis: the mesh axis to split over (default ``"model"``).
    min_size: leaves smaller than this are replicated (default 16384).

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``params``.
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"model_sharding: mesh has no axis {axis!r} (axes: {mesh.axis_names}).")
  n = mesh.shape[axis]

  def one(leaf):
    shape = tuple(jnp.shape(leaf))
    size = 1
    for s in shape:
      size *= s
    d = _largest_divisible_dim(shape, n) if size >= min_size else None
    if d is None:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[d] = axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map(one, params)


def put_on_mesh(tree: PyTree, mesh: Mesh) -> PyTree:
  """Replicates on ``mesh`` every leaf of ``tree`` that is not laid out on it yet.

  Leaves whose sharding is already a ``NamedSharding`` over ``mesh`` are kept
  as they are. Typical use, for an optimizer state initialised from sharded
  parameters (the moments of Adam follow the parameters' shardings, but leaves
  that do not depend on them — counts, PRNG keys, diagnostics — come out of
  ``jax.jit(tx.init)`` on a single device)::

      state = mo.distributed.put_on_mesh(jax.jit(tx.init)(params), mesh)
  """
  rep = replicated(mesh)

  def one(leaf):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return leaf
    return jax.device_put(leaf, rep)

  return jax.tree_util.tree_map(one, tree)


def bytes_per_device(tree: PyTree) -> dict:
  """Bytes of the arrays of ``tree`` held by each addressable device.

  Sums ``shard.data.nbytes`` over ``addressable_shards`` of every leaf: a
  replicated leaf counts fully on every device, a sharded leaf only its
  shard. Useful where ``device.memory_stats()`` is unavailable (CPU).

  Returns:
    ``{device: bytes}`` for the devices holding a part of ``tree``.
  """
  out: dict = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


# ---------------------------------------------------------------------------
# Explicit-axes meshes.
# ---------------------------------------------------------------------------

def _explicit_mesh_of(tree):
  for leaf in jax.tree_util.tree_leaves(tree):
    try:
      sharding = jax.typeof(leaf).sharding
    except (TypeError, AttributeError):
      continue
    mesh = getattr(sharding, "mesh", None)
    types = getattr(mesh, "axis_types", ())
    if mesh is not None and any(t == jax.sharding.AxisType.Explicit for t in types):
      return mesh
  return None


def _is_arraylike_tree(tree) -> bool:
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(hasattr(x, "__array__") or isinstance(x, jax.Array)
                              for x in leaves)


def auto_axes(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs ``tx.update`` with the mesh's Explicit axes treated as Auto axes.

  ``jax.make_mesh`` builds meshes whose axes are ``AxisType.Explicit`` by
  default: shardings are then part of the array types, and operations whose
  output sharding is ambiguous — flattening a model-sharded leaf into task
  rows for the Gram matrix, for instance — are rejected at trace time. This
  wrapper runs ``tx.update`` inside ``jax.sharding.auto_axes``, so XLA's
  partitioner chooses the layouts inside, and gives each output leaf the
  sharding of the matching input: the parameter's (or the gradient leaf's
  without its task axis) for an update with the shape of the parameters, the
  gradient leaf's for an output with the stacked shape (e.g. the offsets of
  ``mo.task_perturbation``), the old state leaf's for the new state, and
  replicated otherwise. Outside an Explicit-axes mesh it calls ``tx.update``
  unchanged.

  Works for aggregators, chains containing one, ``mo.flat`` and
  ``mo.task_perturbation``. Meshes with Auto axes
  (``jax.sharding.Mesh(devices, names)``, or ``jax.make_mesh(...,
  axis_types=(AxisType.Auto,) * n)``) need no wrapper.

  Args:
    tx: any optax transformation.

  Returns:
    The wrapped ``optax.GradientTransformationExtraArgs`` (same ``init``).
  """
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra):
    mesh = _explicit_mesh_of((updates, state, params, extra))
    if mesh is None:
      return tx.update(updates, state, params, **extra)

    def spec_of(x, drop_leading=False):
      s = tuple(jax.typeof(x).sharding.spec)
      s = s + (None,) * (jnp.ndim(x) - len(s))
      return s[1:] if drop_leading else s

    none = lambda x: x is None
    upd_leaves, upd_def = jax.tree_util.tree_flatten(updates, is_leaf=none)
    prm_leaves = (upd_def.flatten_up_to(params) if params is not None
                  else [None] * len(upd_leaves))
    # Shapes of the outputs, traced without shardings (so without Explicit axes).
    plain = lambda t: jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), t)
    # Array-valued extra arguments go through auto_axes; others (flags) are closed over.
    dyn = {k: v for k, v in extra.items() if _is_arraylike_tree(v)}
    static = {k: v for k, v in extra.items() if k not in dyn}
    out_shapes = jax.eval_shape(lambda u, s, p, e: tx.update(u, s, p, **e, **static),
                                plain(updates), plain(state), plain(params), plain(dyn))

    def update_spec(out, g, p):
      if out is None:
        return None
      if p is not None and tuple(out.shape) == tuple(jnp.shape(p)):
        return NamedSharding(mesh, P(*spec_of(p)))
      if g is not None and tuple(out.shape) == tuple(jnp.shape(g)):
        return NamedSharding(mesh, P(*spec_of(g)))
      if g is not None and tuple(out.shape) == tuple(jnp.shape(g)[1:]):
        return NamedSharding(mesh, P(*spec_of(g, True)))
      return NamedSharding(mesh, P())

    try:
      out_leaves = upd_def.flatten_up_to(out_shapes[0])
      upd_out = upd_def.unflatten(
          [update_spec(o, g, p) for o, g, p in zip(out_leaves, upd_leaves, prm_leaves)])
    except (ValueError, TypeError):  # the update has another structure: replicate it
      upd_out = jax.tree_util.tree_map(lambda o: NamedSharding(mesh, P()), out_shapes[0])
    try:
      state_out = jax.tree_util.tree_map(
          lambda o, s: NamedSharding(mesh, P(*spec_of(s)))
          if tuple(o.shape) == tuple(jnp.shape(s)) else NamedSharding(mesh, P()),
          out_shapes[1], state)
    except (ValueError, TypeError):  # the state changes structure (built without num_tasks)
      state_out = jax.tree_util.tree_map(lambda o: NamedSharding(mesh, P()), out_shapes[1])
    fn = jax.sharding.auto_axes(
        lambda u, s, p, e: tx.update(u, s, p, **e, **static), out_sharding=(upd_out, state_out))
    with jax.sharding.use_abstract_mesh(mesh):
      return fn(updates, state, params, dyn)

  # Keep the static facts attached to the wrapped update (mo.aggregator_info, ...).
  for attr in ("mtl_info", "mtl_perturbation"):
    if hasattr(tx.update, attr):
      setattr(update_fn, attr, getattr(tx.update, attr))
  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


# ---------------------------------------------------------------------------
# Gradient accumulation.
# ---------------------------------------------------------------------------

def accumulate_task_grads(
    tx: optax.GradientTransformation,
    every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
    *,
    num_tasks: int,
    stacked_args: Sequence[str] = (),
    use_grad_mean: bool = True,
    accumulator_dtype=jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """Accumulates stacked per-task gradients over micro-batches, then aggregates once.

  Mode "accumulate, then aggregate": for micro-batches b = 1..k with stacked
  gradients J_b and losses L_b, the k-th call applies ``tx`` (an aggregator,
  usually chained with an optimizer) once to

      J̄ = (1/k) Σ_b J_b,     L̄ = (1/k) Σ_b L_b,

  which for equal-sized micro-batches of mean losses are exactly the stacked
  gradients and losses of the full batch: the step equals one step on the k×
  larger batch. The other calls return zero updates. Built on
  ``optax.MultiSteps`` (which provides the schedule, Welford mean and skip
  logic); this wrapper gives it an accumulator with the task axis (plain
  ``optax.MultiSteps(optax.chain(aggregator, opt))`` sizes its accumulator
  like the parameters) and accumulates the losses, so loss-based methods see
  the mean losses instead of the last micro-batch's.

  The other mode, "aggregate every micro-batch", needs no helper:
  ``optax.chain(aggregator, optax.MultiSteps(opt, k))`` aggregates each
  micro-batch (the aggregator's state, e.g. a PRNG key or an EMA, advances k
  times per optimizer step) and averages the aggregated updates.

  Note: ``optax.MultiSteps`` evaluates the wrapped update at every micro-batch
  and keeps its result only at the k-th, so an expensive solver costs k
  evaluations per step in compute (not in state).

  Args:
    tx: the transformation to apply to the accumulated gradients.
    every_k_schedule: k (int) or a schedule ``step -> k``, as in
      ``optax.MultiSteps``.
    num_tasks: m (the accumulator is built at ``init``).
    stacked_args: names of extra keyword arguments of ``update`` that are
      stacked like the gradients and must be averaged too (e.g.
      ``("sam_grads",)`` for ``mo.flat``). Other extra arguments are passed
      through from the last micro-batch.
    use_grad_mean: average (default) or sum the micro-batches.
    accumulator_dtype: dtype of the accumulator (default float32).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    ``optax.MultiStepsState``; its ``update`` takes the stacked gradients and
    ``losses=`` (optional) like an aggregator.
  """
  if not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"accumulate_task_grads: num_tasks must be a positive int, got {num_tasks!r}.")
  stacked_args = tuple(stacked_args)
  if "losses" in stacked_args:
    raise ValueError("accumulate_task_grads: losses are always accumulated; do not list them "
                     "in stacked_args.")
  inner = optax.with_extra_args_support(tx)

  def unpack_update(packed, state, params=None, *, _has_losses, **extra):
    # ``_has_losses`` is a static Python bool (MultiSteps forwards extra
    # arguments unchanged), so a method without losses never sees zeros.
    extra = dict(extra)
    if _has_losses:
      extra["losses"] = packed["losses"]
    for name in stacked_args:
      extra[name] = packed[name]
    return inner.update(packed["grads"], state, params, **extra)

  multi = optax.MultiSteps(
      optax.GradientTransformationExtraArgs(inner.init, unpack_update), every_k_schedule,
      use_grad_mean=use_grad_mean, accumulator_dtype=accumulator_dtype)

  def init_fn(params):
    state = multi.init(params)
    stacked = jax.tree_util.tree_map(
        lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), accumulator_dtype), params)
    acc = {"grads": stacked, "losses": jnp.zeros((num_tasks,), accumulator_dtype)}
    for name in stacked_args:
      acc[name] = stacked
    return state._replace(acc_grads=acc)

  def update_fn(updates, state, params=None, **extra):
    extra = dict(extra)
    losses = extra.pop("losses", None)
    packed = {"grads": updates,
              "losses": (jnp.zeros((num_tasks,), accumulator_dtype) if losses is None
                         else jnp.asarray(losses))}
    for name in stacked_args:
      if name not in extra:
        raise ValueError(
            f"accumulate_task_grads: update needs {name}= (it is listed in stacked_args).")
      packed[name] = extra.pop(name)
    return multi.update(packed, state, params, _has_losses=losses is not None, **extra)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
