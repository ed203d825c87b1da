"""One-jitted-step training helpers: loss function → task_grads → aggregator → optimizer.

``make_train_step`` works on any parameter pytree (Flax Linen ``model.apply``,
Equinox-free functional code, ...); ``make_nnx_train_step`` wraps a Flax NNX
module. Flax is imported lazily: it is an optional dependency.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from mtl_optax._src import factored as factored_lib
from mtl_optax._src import task_grads as task_grads_lib

PyTree = Any


def _sharpness():
  # Imported lazily so the core does not depend on the sharpness module's import order.
  from mtl_optax._src import sharpness  # pylint: disable=g-import-not-at-top
  return sharpness


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformationExtraArgs,
    *,
    mode: str = "jacrev",
    chunk_size: task_grads_lib.ChunkSize = "auto",
    has_aux: bool = False,
    perturbation: Optional[optax.GradientTransformation] = None,
    perturbation_groups: Optional[int] = None,
    jit: bool = True,
):
  """Builds ``step(params, opt_state, *batch) -> (params, opt_state, losses, aux)``.

  One step computes the stacked per-task gradients of ``loss_fn`` (with
  :func:`mtl_optax.task_grads`), hands them to ``tx`` (an aggregator, usually
  chained with an optax optimizer, e.g. ``optax.chain(mo.cagrad(), optax.adam(1e-3))``)
  together with ``losses=``, and applies the update.

  Sharpness-aware (flat) training: pass ``perturbation=mo.task_perturbation(...)``
  and a ``tx`` containing ``mo.flat(aggregator)``; the step then computes the
  SAM gradients with :func:`mtl_optax.sharpness_aware_task_grads` and passes
  them as ``sam_grads=``.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> losses (m,)`` (or ``(losses, aux)``
      with ``has_aux``). For Flax Linen: ``lambda p, x, y: task_losses(model.apply(p, x), y)``.
    tx: the optax transformation (aggregator chained with an optimizer).
    mode: as in :func:`mtl_optax.task_grads` ("jacrev", "vmap"), or
      "factored": :func:`mtl_optax.factored_task_grads` (dense-layer blocks of
      the Jacobian kept as factors; same update, fewer flops when the batch is
      not much larger than the layer widths; not with ``perturbation``).
    chunk_size, has_aux: as in :func:`mtl_optax.task_grads`.
    perturbation: optional ``mo.task_perturbation`` for flat aggregators.
    perturbation_groups: None (default: one perturbation from the globally
      reduced gradients) or the number of batch groups (e.g. data-parallel
      replicas) perturbed separately; see
      :func:`mtl_optax.sharpness_aware_task_grads`.
    jit: compile the step with ``jax.jit`` (default True).

  Returns:
    The step function; ``aux`` is None without ``has_aux``.
  """

  if perturbation_groups is not None and perturbation is None:
    raise ValueError("make_train_step: perturbation_groups needs "
                     "perturbation=mo.task_perturbation(...).")

  if mode == "factored" and perturbation is not None:
    raise ValueError("make_train_step: mode='factored' does not combine with "
                     "perturbation= (flat aggregators need stacked gradients).")

  def step(params, opt_state, *batch):
    extra = {}
    if mode == "factored":
      out, grads = factored_lib.factored_task_grads(
          loss_fn, params, *batch, chunk_size=chunk_size, has_aux=has_aux)
    elif perturbation is None:
      out, grads = task_grads_lib.task_grads(
          loss_fn, params, *batch, mode=mode, chunk_size=chunk_size, has_aux=has_aux)
    else:
      out, grads, sam_grads = _sharpness().sharpness_aware_task_grads(
          loss_fn, params, *batch, perturbation=perturbation, mode=mode,
          chunk_size=chunk_size, has_aux=has_aux, perturbation_groups=perturbation_groups)
      extra["sam_grads"] = sam_grads
    losses, aux = out if has_aux else (out, None)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses, **extra)
    return optax.apply_updates(params, updates), opt_state, losses, aux

  return jax.jit(step) if jit else step


def make_nnx_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformationExtraArgs,
    **kwargs,
):
  """Builds ``step(model, opt_state, *batch) -> (opt_state, losses, aux)`` for Flax NNX.

  The model's ``nnx.Param`` variables are differentiated and updated in place
  (``nnx.update``); other variables (BatchNorm statistics, RNG counters) are
  carried along unchanged by the gradient computation. Initialise the
  optimizer state with ``tx.init(nnx.state(model, nnx.Param))``.

  Args:
    loss_fn: ``loss_fn(model, *batch) -> losses (m,)`` (or ``(losses, aux)``).
    tx: the optax transformation (aggregator chained with an optimizer).
    **kwargs: as for :func:`make_train_step` (``mode``, ``chunk_size``,
      ``has_aux``, ``perturbation``, ``perturbation_groups``).

  Returns:
    The jitted step function.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  kwargs = dict(kwargs, jit=False)

  @nnx.jit
  def step(model, opt_state, *batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    functional = lambda p, *b: loss_fn(nnx.merge(graphdef, p, rest), *b)
    inner = make_train_step(functional, tx, **kwargs)
    new_params, opt_state, losses, aux = inner(params, opt_state, *batch)
    nnx.update(model, new_params)
    return opt_state, losses, aux

  return step
