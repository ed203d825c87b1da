"""Per-task gradients as one stacked pytree (leading axis = task).

``task_grads`` differentiates a vector of m task losses and returns, for every
parameter leaf, an array with a new leading axis of size m whose row i is
∇ losses[i]. ``representation_grads`` and ``representation_update`` implement the
shared-representation mode (gradients w.r.t. the shared features, aggregation
there, one backward pass through the trunk).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import engine as engine_lib

PyTree = Any

MODES = ("jacrev", "vmap")


def outputs_aux(has_aux: bool, has_state: bool) -> bool:
  """Whether ``loss_fn`` returns ``(losses, extra)``: with user aux or a new model state."""
  return has_aux or has_state


def check_state_args(args, has_state: bool, where: str):
  """Trace-time check that a stateful call passes the model state after params."""
  if has_state and not args:
    raise ValueError(f"{where}: has_state=True needs the model state as the first argument "
                     "after params: (loss_fn, params, model_state, *batch).")


def check_state_output(out, has_aux: bool, has_state: bool, where: str) -> bool:
  """Checks a stateful loss's output; returns whether ``out`` is ``(losses, extra)``.

  ``out`` is the (abstract) output of ``loss_fn``: ``(losses, new_model_state)``,
  or ``(losses, (new_model_state, aux))`` with ``has_aux`` as well. Call
  :func:`check_state_args` first, before tracing ``loss_fn``.
  """
  if has_state and not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise ValueError(
        f"{where}: with has_state=True, loss_fn(params, model_state, *batch) must return "
        "(losses, new_model_state)" + (" with has_aux: (losses, (new_model_state, aux))"
                                       if has_aux else "") + f"; got {type(out).__name__}.")
  if has_state and has_aux and not (isinstance(out[1], (tuple, list)) and len(out[1]) == 2):
    raise ValueError(
        f"{where}: with has_state=True and has_aux=True, loss_fn must return "
        "(losses, (new_model_state, aux)).")
  return outputs_aux(has_aux, has_state)


def check_losses_shape(out, has_aux, where):
  losses = out[0] if has_aux else out
  shape = getattr(losses, "shape", None)
  if shape is None or len(shape) != 1:
    raise ValueError(
        f"{where}: loss_fn must return a vector of per-task losses of shape (m,)"
        f"{' as the first element of (losses, aux)' if has_aux else ''}; got shape {shape}.")
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise TypeError(f"{where}: losses must be floating point, got {losses.dtype}.")
  return shape[0]


ChunkSize = Union[int, None, str]


def resolve_chunk_size(chunk_size: ChunkSize, where: str, program=None) -> Optional[int]:
  """Validates ``chunk_size`` and resolves ``"auto"`` for the backend and the program.

  ``"auto"`` is None (all tasks in one vmapped call) on GPU/TPU and, on CPU,
  for programs with a convolution; 1 (tasks in sequence) otherwise. On XLA:CPU
  a backward pass of dense layers vmapped over tasks batches the
  weight-gradient products, which run slower than m sequential passes, while a
  task-batched convolution backward is 2-4x faster than m sequential ones
  (``benchmarks/engine_choice.py``; a small BatchNorm CNN at batch 64: 142 vs
  546 ms per step).

  Args:
    chunk_size: a positive int, None or "auto".
    where: the caller's name, for error messages.
    program: the loss's jaxpr, or a zero-argument callable returning it (only
      called for "auto" on CPU); None: no program-dependent choice.
  """
  if isinstance(chunk_size, str):
    if chunk_size != "auto":
      raise ValueError(f"{where}: chunk_size must be a positive int, None or 'auto', "
                       f"got {chunk_size!r}.")
    if callable(program) and jax.default_backend() == "cpu":
      program = program()
    return engine_lib.auto_chunk_size(program)
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"{where}: chunk_size must be a positive int, None or 'auto', "
                     f"got {chunk_size!r}.")
  return chunk_size


def loss_jaxpr(loss_fn, params, args=(), kwargs=None):
  """A zero-argument callable tracing ``loss_fn(params, *args, **kwargs)`` to its jaxpr."""
  return lambda: jax.make_jaxpr(lambda p: loss_fn(p, *args, **(kwargs or {})))(params).jaxpr


def map_over_tasks(fn, xs, chunk_size: Optional[int]):
  """``fn`` over the leading (task) axis of ``xs``: one vmap, or chunks in sequence.

  ``chunk_size`` must already be resolved (:func:`resolve_chunk_size`).
  """
  m = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if chunk_size is None or chunk_size >= m:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=None if chunk_size == 1 else chunk_size)


def task_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args,
    mode: str = "jacrev",
    chunk_size: ChunkSize = "auto",
    has_aux: bool = False,
    has_state: bool = False,
    **kwargs,
):
  """Losses and stacked per-task gradients of a vector-valued loss function.

  ``grads[leaf][i] = ∂ losses[i] / ∂ leaf``.

  Model state (BatchNorm statistics, dropout keys, any Flax collection
  that is not ``params``). With ``has_state=True`` the first positional
  argument after ``params`` is the model state, passed to ``loss_fn`` unchanged
  and never differentiated, and ``loss_fn(params, model_state, *args)`` returns
  ``(losses, new_model_state)`` — ``(losses, (new_model_state, aux))`` with
  ``has_aux`` as well — the way Flax training steps return the collections of
  ``model.apply(..., mutable=["batch_stats"])``. The new state comes from the
  single forward pass at θ on the whole batch, so statistics advance once per
  step however many tasks there are, and a dropout mask drawn from a key in the
  state is shared by every task's gradient. In mode "vmap" every task runs its
  own forward pass with the same state (same batch statistics, same dropout
  key, hence the same masks) and the new state of the first is returned.
  For example, a Linen model with BatchNorm and dropout::

    def loss_fn(params, state, images, labels):
      key, dropout_key = jax.random.split(state["key"])
      (logits_a, logits_b), updates = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_key})
      losses = jnp.stack([ce(logits_a, labels[:, 0]), ce(logits_b, labels[:, 1])])
      return losses, {"batch_stats": updates["batch_stats"], "key": key}

    (losses, new_state), grads = mo.task_grads(loss_fn, params, state, images, labels,
                                               has_state=True)

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> losses`` of shape (m,), or
      ``(losses, aux)`` when ``has_aux`` (with ``has_state``: see above).
    params: parameter pytree.
    *args: positional arguments passed to ``loss_fn`` (the model state with
      ``has_state``, then the batch, ...).
    mode: "jacrev" (default): one forward pass, then m vector-Jacobian products
      of the same linearisation, vmapped (the cost of 1 forward + m backward).
      "vmap": ``jax.vmap(jax.grad)`` over one-hot task weightings; every task
      runs its own forward pass (more compute, sometimes less memory, and it
      works with functions that are not reverse-differentiable as a whole).
    chunk_size: differentiate at most this many tasks at once
      (``jax.lax.map(..., batch_size=chunk_size)``) to bound the memory of the
      backward passes; None does all m at once (one vmapped call); "auto"
      (default) is None on GPU/TPU and for convolutional models on CPU, 1 for
      other models on CPU (:func:`resolve_chunk_size`: sequential dense-layer
      passes are faster on XLA:CPU). Same mathematics either way.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    has_state: whether ``args[0]`` is a model state that ``loss_fn`` updates
      (see above; default False).
    **kwargs: keyword arguments passed to ``loss_fn``.

  Returns:
    ``(losses, grads)``, or ``((losses, aux), grads)`` when ``has_aux``, or
    ``((losses, new_model_state), grads)`` with ``has_state`` (and
    ``((losses, (new_model_state, aux)), grads)`` with both). ``grads`` has the
    structure of ``params`` with a leading task axis on every leaf.
  """
  if mode not in MODES:
    raise ValueError(f"task_grads: mode must be one of {MODES}, got {mode!r}.")
  resolve_chunk_size(chunk_size, "task_grads")       # validate before tracing
  check_state_args(args, has_state, "task_grads")   # before tracing loss_fn
  f = lambda p: loss_fn(p, *args, **kwargs)
  if chunk_size == "auto":   # the choice looks at the program (convolutions)
    closed, shapes = jax.make_jaxpr(f, return_shape=True)(params)
    chunk_size = resolve_chunk_size(chunk_size, "task_grads", closed.jaxpr)
  else:
    chunk_size = resolve_chunk_size(chunk_size, "task_grads")
    shapes = jax.eval_shape(f, params)
  has_aux = check_state_output(shapes, has_aux, has_state, "task_grads")
  m = check_losses_shape(shapes, has_aux, "task_grads")
  out_dtype = (shapes[0] if has_aux else shapes).dtype
  eye = jnp.eye(m, dtype=out_dtype)

  if mode == "jacrev":
    if has_aux:
      losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
    else:
      losses, vjp_fn = jax.vjp(f, params)
    grads = map_over_tasks(lambda e: vjp_fn(e)[0], eye, chunk_size)
  else:
    def one(e):
      def weighted(p):
        out = f(p)
        ls, ax = out if has_aux else (out, None)
        return jnp.dot(e, ls), (ls, ax)
      return jax.grad(weighted, has_aux=True)(params)

    grads, (all_losses, all_aux) = map_over_tasks(one, eye, chunk_size)
    # Every task ran the same forward pass; take the first copy.
    losses = all_losses[0]
    aux = jax.tree_util.tree_map(lambda a: a[0], all_aux)
  return ((losses, aux), grads) if has_aux else (losses, grads)


def representation_grads(
    trunk_fn: Callable[..., Any],
    heads_loss_fn: Callable[..., Any],
    trunk_params: PyTree,
    head_params: PyTree,
    trunk_args: tuple = (),
    head_args: tuple = (),
    chunk_size: ChunkSize = "auto",
):
  """Per-task gradients w.r.t. the shared representation z = trunk(θ_sh, ...).

  Args:
    trunk_fn: ``trunk_fn(trunk_params, *trunk_args) -> z`` (any pytree).
    heads_loss_fn: ``heads_loss_fn(head_params, z, *head_args) -> losses (m,)``.
    trunk_params, head_params: the two parameter pytrees.
    trunk_args, head_args: extra positional arguments (batch inputs, targets).
    chunk_size: as in :func:`task_grads`.

  Returns:
    ``(losses, rep_grads, head_grads, trunk_vjp)``: ``rep_grads`` stacks
    ∂L_i/∂z (leading task axis), ``head_grads`` stacks ∂L_i/∂θ_heads and
    ``trunk_vjp(cotangent_z)`` returns the trunk gradient for a combined
    cotangent (one backward pass through the trunk).
  """
  z, trunk_vjp = jax.vjp(lambda tp: trunk_fn(tp, *trunk_args), trunk_params)
  (losses, (head_grads, rep_grads)) = task_grads(
      lambda hz: heads_loss_fn(hz[0], hz[1], *head_args), (head_params, z),
      chunk_size=chunk_size)
  return losses, rep_grads, head_grads, lambda ct: trunk_vjp(ct)[0]


def representation_update(
    aggregator,
    state,
    trunk_fn: Callable[..., Any],
    heads_loss_fn: Callable[..., Any],
    trunk_params: PyTree,
    head_params: PyTree,
    trunk_args: tuple = (),
    head_args: tuple = (),
    chunk_size: ChunkSize = "auto",
    allow_invalid: bool = False,
    **extra,
):
  """One aggregation step in shared-representation mode.

  The per-task gradients are taken w.r.t. the shared features z (size
  batch × features instead of the number of trunk parameters), the aggregator
  combines them into one cotangent d_z, and a single backward pass through the
  trunk gives its update (∂z/∂θ)ᵀ d_z. Each head receives its own gradient
  (or the weighted one, following the aggregator's head policy).

  When is it exact? For every method whose weights do not depend on the
  gradients (``sum``, ``mean``, ``linear_scalarization`` and the loss-based
  weightings), Σ w_i ∇_θ L_i = (∂z/∂θ)ᵀ Σ w_i ∇_z L_i, so the update is the
  same as with parameter gradients (``AggregatorInfo.representation ==
  "exact"``). For ``mgda`` it is the published variant MGDA-UB (Sener & Koltun
  2018, whose bound makes it a valid approximation; "variant"). For every other
  gradient-based method the weights computed from representation gradients
  define a different, unpublished method — LibMTL's ``rep_grad`` silently runs
  such variants — so this function raises unless ``allow_invalid=True``.

  Args:
    aggregator: an mtl_optax aggregator (built with the default all-shared
      partition: z has no head leaves).
    state: its state.
    trunk_fn, heads_loss_fn, trunk_params, head_params, trunk_args, head_args, chunk_size: as
      in :func:`representation_grads`.
    allow_invalid: run a method whose representation variant is not
      established (at your own risk).
    **extra: extra arguments for the aggregator (``losses`` are passed
      automatically).

  Returns:
    ``(losses, (trunk_update, head_update), new_state)``.
  """
  info = base.aggregator_info(aggregator)
  if info.representation == "invalid" and not allow_invalid:
    raise ValueError(
        f"{info.name} is not exact in shared-representation mode and has no published "
        "representation variant: its weights would be computed from ∂L/∂z instead of "
        "∂L/∂θ, a different method. Use task_grads on the parameters, or pass "
        "allow_invalid=True to run the (unvalidated) variant anyway.")
  losses, rep_grads, head_grads, trunk_vjp = representation_grads(
      trunk_fn, heads_loss_fn, trunk_params, head_params, trunk_args, head_args, chunk_size)
  d_z, new_state = aggregator.update(rep_grads, state, None, losses=losses, **extra)
  weights = base.diagnostics(new_state).get("weights") if info.weight_heads else None
  if weights is not None:
    head_update = jax.tree_util.tree_map(
        lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), head_grads)
  else:
    head_update = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), head_grads)
  return losses, (trunk_vjp(d_z), head_update), new_state
