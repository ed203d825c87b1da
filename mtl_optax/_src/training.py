"""One-jitted-step training helpers: loss function → task_grads → aggregator → optimizer.

``make_train_step`` works on any parameter pytree (Flax Linen ``model.apply``,
Equinox-free functional code, ...); ``make_nnx_train_step`` wraps a Flax NNX
module. Flax is imported lazily: it is an optional dependency.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import jax
import optax

from mtl_optax._src import engine as engine_lib
from mtl_optax._src import factored as factored_lib
from mtl_optax._src import task_grads as task_grads_lib

PyTree = Any


def _sharpness():
  # Imported lazily so the core does not depend on the sharpness module's import order.
  from mtl_optax._src import sharpness  # pylint: disable=g-import-not-at-top
  return sharpness


_RESERVED_STEP_KWARGS = ("losses", "sam_grads")


def _check_step_kwargs(tx, grads, opt_state, params, kwargs, step_kwargs):
  """Raises at trace time if ``tx.update`` does not use a keyword argument of the step.

  optax silently drops keyword arguments no transformation reads (``optax.chain``
  forwards every one to every member), so a misspelt ``val_batch=`` would train
  without it. Traced once per compilation: an argument none of whose leaves
  reaches an operation or an output of ``tx.update`` is not used.
  """
  clash = sorted(set(step_kwargs) & set(_RESERVED_STEP_KWARGS))
  if clash:
    raise ValueError(f"make_train_step: step(..., {clash[0]}=...) is computed by the step "
                     "itself; it cannot be passed.")
  leaves, treedef = jax.tree_util.tree_flatten(step_kwargs)

  def update(*flat):
    extra = jax.tree_util.tree_unflatten(treedef, flat)
    return tx.update(grads, opt_state, params, **kwargs, **extra)

  jaxpr = jax.make_jaxpr(update)(*leaves).jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  it = iter(jaxpr.invars)
  for key in step_kwargs:
    ins = [next(it) for _ in jax.tree_util.tree_leaves(step_kwargs[key])]
    if ins and not any(id(v) in used for v in ins):
      raise ValueError(
          f"make_train_step: step(..., {key}=...) was passed but the transformation does "
          f"not use it (its update ignores {key!r}); check the name, or that the method "
          "that takes it (e.g. mo.auto_lambda for val_batch=) is part of tx.")


def _samo():
  from mtl_optax._src import samo  # pylint: disable=g-import-not-at-top
  return samo


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformationExtraArgs,
    *,
    mode: str = "auto",
    chunk_size: task_grads_lib.ChunkSize = "auto",
    has_aux: bool = False,
    has_state: bool = False,
    perturbation: Optional[optax.GradientTransformation] = None,
    perturbation_groups: Optional[int] = None,
    jit: bool = True,
):
  """Builds ``step(params, opt_state, *batch, **kw) -> (params, opt_state, losses, aux)``.

  One step computes the stacked per-task gradients of ``loss_fn`` (with
  :func:`mtl_optax.task_grads`), hands them to ``tx`` (an aggregator, usually
  chained with an optax optimizer, e.g. ``optax.chain(mo.cagrad(), optax.adam(1e-3))``)
  together with ``losses=``, and applies the update.

  Sharpness-aware (flat) training: pass ``perturbation=mo.task_perturbation(...)``
  and a ``tx`` containing ``mo.flat(aggregator)``; the step then computes the
  SAM gradients with :func:`mtl_optax.sharpness_aware_task_grads` and passes
  them as ``sam_grads=``. With ``perturbation=mo.samo_perturbation(...)``
  (SAMO) the step computes :func:`mtl_optax.samo_task_grads` and hands the
  per-task SAM gradients to ``tx`` as its gradients (use a plain aggregator,
  not ``mo.flat``); ``opt_state`` is then the pair ``(tx.init(params),
  perturbation.init(params))`` (the perturbation's PRNG key advances every
  step) and ``mode`` does not apply.

  Models with state (BatchNorm, dropout): with ``has_state=True`` the step is
  ``step(params, opt_state, model_state, *batch) -> (params, opt_state,
  model_state, losses, aux)`` and ``loss_fn(params, model_state, *batch)``
  returns ``(losses, new_model_state)`` (``(losses, (new_model_state, aux))``
  with ``has_aux``), as a Flax Linen step returns the collections of
  ``model.apply(..., mutable=["batch_stats"])``. ``model_state`` is any pytree
  that is not optimised (``{"batch_stats": ..., "key": ...}``); the new state
  is that of the one forward pass at θ on the whole batch (statistics advance
  once per step, not once per task; every task's gradient sees the same
  dropout mask; the SAM passes leave the state alone), see
  :func:`mtl_optax.task_grads` and :func:`mtl_optax.sharpness_aware_task_grads`.
  Evaluate with the returned state (``use_running_average=True``).

  Extra inputs of the transformation: keyword arguments of ``step`` are passed
  on to ``tx.update`` (as ``losses=`` is), e.g. the validation batch of the
  bilevel methods, ``step(params, opt_state, x, y, val_batch=(xv, yv))`` with
  ``mo.auto_lambda`` / ``mo.moml`` (``mo.forum`` also takes
  ``train_batch=(x, y)``). They are traced with the step (arrays, or pytrees
  of arrays). A keyword that ``tx.update`` does not use raises a ValueError at
  trace time (optax would otherwise drop it silently); ``losses`` and
  ``sam_grads`` are computed by the step and cannot be passed.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> losses (m,)`` (or ``(losses, aux)``
      with ``has_aux``). For Flax Linen: ``lambda p, x, y: task_losses(model.apply(p, x), y)``.
    tx: the optax transformation (aggregator chained with an optimizer).
    mode: "auto" (default): the engine :func:`mtl_optax.resolve_engine`
      picks for this loss, batch and ``tx`` when the step is traced — the
      factored engine for Gram-only aggregators when a dense layer is cheaper
      as factors, stacked rows otherwise; tasks vmapped for convolutional
      models and on GPU/TPU, in sequence for dense models on CPU (measured:
      ``benchmarks/engine_choice.py``). The choice is logged on the
      ``"mtl_optax"`` logger (level INFO). Or as in :func:`mtl_optax.task_grads`
      ("jacrev", "vmap"), or "factored": :func:`mtl_optax.factored_task_grads`
      (dense-layer blocks of the Jacobian kept as factors; same update, fewer
      flops when the batch is not much larger than the layer widths; not with
      ``perturbation``).
    chunk_size: as in :func:`mtl_optax.task_grads`; with ``mode="auto"`` and
      ``chunk_size="auto"`` both are chosen together.
    has_aux: as in :func:`mtl_optax.task_grads`.
    has_state: the step carries a model state (see above; default False).
    perturbation: optional ``mo.task_perturbation`` for flat aggregators, or
      ``mo.samo_perturbation`` (SAMO, see above).
    perturbation_groups: None (default: one perturbation from the globally
      reduced gradients) or the number of batch groups (e.g. data-parallel
      replicas) perturbed separately; see
      :func:`mtl_optax.sharpness_aware_task_grads`.
    jit: compile the step with ``jax.jit`` (default True).

  Returns:
    The step function; ``aux`` is None without ``has_aux``.
  """
  options = dict(chunk_size=chunk_size, has_aux=has_aux, has_state=has_state)

  if perturbation_groups is not None and perturbation is None:
    raise ValueError("make_train_step: perturbation_groups needs "
                     "perturbation=mo.task_perturbation(...).")

  samo = perturbation is not None and _samo().samo_info(perturbation) is not None
  if samo and (perturbation_groups is not None or mode == "factored"):
    raise ValueError("make_train_step: perturbation=mo.samo_perturbation(...) combines with "
                     "neither perturbation_groups nor mode='factored'.")

  if mode == "factored" and perturbation is not None:
    raise ValueError("make_train_step: mode='factored' does not combine with "
                     "perturbation= (flat aggregators need stacked gradients).")

  if mode not in ("auto", "factored") + task_grads_lib.MODES:
    raise ValueError(f"make_train_step: mode must be 'auto', 'factored', 'jacrev' or 'vmap', "
                     f"got {mode!r}.")

  def step(params, opt_state, *batch, **step_kwargs):
    extra = {}
    if has_state and not batch:
      raise ValueError("make_train_step(has_state=True): call step(params, opt_state, "
                       "model_state, *batch).")
    if samo:
      if not (isinstance(opt_state, tuple) and len(opt_state) == 2
              and isinstance(opt_state[1], _samo().SamoState)):
        raise ValueError("make_train_step(perturbation=mo.samo_perturbation(...)): opt_state "
                         "must be the pair (tx.init(params), perturbation.init(params)).")
      tx_state, p_state = opt_state
      out, grads, p_state = _samo().samo_task_grads(
          loss_fn, params, *batch, perturbation=perturbation, perturbation_state=p_state,
          **options)
      losses, aux = out if task_grads_lib.outputs_aux(has_aux, has_state) else (out, None)
      updates, tx_state = apply_tx(grads, tx_state, params, losses, extra, step_kwargs)
      return finish(optax.apply_updates(params, updates), (tx_state, p_state), losses, aux)
    step_mode, step_options = mode, options
    if mode == "auto":   # resolved at trace time, from the program and tx
      choice = engine_lib.resolve_engine(
          loss_fn, params, *batch, tx=tx, opt_state=opt_state, has_aux=has_aux,
          has_state=has_state, perturbation=perturbation is not None, tx_kwargs=step_kwargs)
      engine_lib.log_choice(choice)
      step_mode = choice.mode
      if chunk_size == "auto":
        step_options = dict(options, chunk_size=choice.chunk_size)
    if step_mode == "factored":
      out, grads = factored_lib.factored_task_grads(loss_fn, params, *batch, **step_options)
    elif perturbation is None:
      out, grads = task_grads_lib.task_grads(loss_fn, params, *batch, mode=step_mode,
                                             **step_options)
    else:
      out, grads, sam_grads = _sharpness().sharpness_aware_task_grads(
          loss_fn, params, *batch, perturbation=perturbation, mode=step_mode,
          perturbation_groups=perturbation_groups, **step_options)
      extra["sam_grads"] = sam_grads
    losses, aux = out if task_grads_lib.outputs_aux(has_aux, has_state) else (out, None)
    updates, opt_state = apply_tx(grads, opt_state, params, losses, extra, step_kwargs)
    return finish(optax.apply_updates(params, updates), opt_state, losses, aux)

  def apply_tx(grads, tx_state, params, losses, extra, step_kwargs):
    extra = dict(extra, losses=losses)
    if step_kwargs:
      _check_step_kwargs(tx, grads, tx_state, params, extra, step_kwargs)
    return tx.update(grads, tx_state, params, **extra, **step_kwargs)

  def finish(params, opt_state, losses, aux):
    if has_state:
      new_state, aux = aux if has_aux else (aux, None)
      return params, opt_state, new_state, losses, aux
    return params, opt_state, losses, aux

  return jax.jit(step) if jit else step


def make_nnx_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformationExtraArgs,
    **kwargs,
):
  """Builds ``step(model, opt_state, *batch, **kw) -> (opt_state, losses, aux)`` for Flax NNX.

  The model's ``nnx.Param`` variables are differentiated and updated in place
  (``nnx.update``), like ``nnx.Optimizer.update`` does after ``nnx.grad``.
  Every other variable — ``nnx.BatchStat`` running statistics, the
  ``nnx.Rngs`` streams of ``nnx.Dropout``, any custom ``nnx.Variable`` — is the
  model state of :func:`make_train_step` (``has_state=True``): it is updated in
  place from the one forward pass at θ on the whole batch, so BatchNorm
  statistics advance once per step (not once per task, and never at the
  perturbed points of a flat step) and the dropout RNG counter advances once
  per step (fresh masks every step, the same mask for every task's gradient
  within a step). Keep the ``nnx.Rngs`` inside the model, as the Flax examples
  do. ``model.eval()`` / ``model.train()`` switch BatchNorm and dropout as
  usual. Initialise the optimizer state with
  ``tx.init(nnx.state(model, nnx.Param))``. Keyword arguments of ``step`` go
  to ``tx.update`` as in :func:`make_train_step` (e.g. ``val_batch=``; the
  method's validation loss function then receives the ``nnx.State`` of the
  Params, as ``tx.update`` does).

  Args:
    loss_fn: ``loss_fn(model, *batch) -> losses (m,)`` (or ``(losses, aux)``
      with ``has_aux``).
    tx: the optax transformation (aggregator chained with an optimizer).
    **kwargs: as for :func:`make_train_step` (``mode``, ``chunk_size``,
      ``has_aux``, ``perturbation``, ``perturbation_groups``).

  Returns:
    The jitted step function (``nnx.jit``).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if "has_state" in kwargs:
    raise ValueError("make_nnx_train_step: the model state is taken from the model's "
                     "non-Param variables; do not pass has_state.")
  has_aux = kwargs.get("has_aux", False)
  kwargs = dict(kwargs, jit=False, has_state=True)
  not_params = nnx.Not(nnx.Param)
  # flax >= 0.11 merges into the given Variable objects unless copy=True; older
  # versions always build new ones (and have no copy argument).
  copy = {"copy": True} if "copy" in inspect.signature(nnx.merge).parameters else {}

  def functional(graphdef):
    def run(params, rest, *batch):
      # A fresh module per trace: its variables belong to this trace, so layers
      # may write their statistics and RNG counters.
      model = nnx.merge(graphdef, params, rest, **copy)
      out = loss_fn(model, *batch)
      new_rest = nnx.state(model, not_params)
      if has_aux:
        losses, aux = out
        return losses, (new_rest, aux)
      return out, new_rest
    return run

  @nnx.jit
  def step(model, opt_state, *batch, **step_kwargs):
    graphdef, params, rest = nnx.split(model, nnx.Param, not_params)
    inner = make_train_step(functional(graphdef), tx, **kwargs)
    new_params, opt_state, new_rest, losses, aux = inner(params, opt_state, rest, *batch,
                                                         **step_kwargs)
    nnx.update(model, new_params, new_rest)
    return opt_state, losses, aux

  return step
