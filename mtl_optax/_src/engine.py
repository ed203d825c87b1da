"""``mode="auto"``: which per-task gradient engine a training step uses.

Two decisions, both made at trace time from the program itself (no timing at
run time, no Python state):

* **Stacked or factored rows.** :func:`mtl_optax.factored_task_grads` keeps
  the Jacobian block of a dense weight W (y = a·W) as factors (A, Δ_i) when its
  Gram block is cheaper than the m weight gradients (N²K + m·N²D < m·N·K·D).
  That saves flops only if the aggregator reads nothing but the Gram matrix
  and the combination Jᵀw: a method that reads the rows themselves (ConFIG,
  GradDrop, GradVac, MoCo, ...) makes the engine form them again from the
  factors. The flat (sharpness-aware) step needs stacked SAM gradients.
* **Tasks in sequence or vmapped** (``chunk_size`` 1 or None). On XLA:CPU a
  backward pass of dense layers vmapped over tasks turns the weight-gradient
  products into batched products that run slower than m sequential passes, but
  convolutions are the opposite: a task-batched convolution backward is 2–4×
  faster than m sequential ones (the cost of a convolution pass is dominated by
  its im2col-style layout work, shared by the batched call). On GPU/TPU the
  batched call is always preferred.

The rule (:func:`resolve_engine`) was measured on MLPs (widths 256 and 1024,
m = 2 and 8), the multi-MNIST LeNet, a BatchNorm + dropout CNN and the
BatchNorm ResNet at batch 32–256 with a Gram-only and a row-reading aggregator:
``python -m benchmarks.engine_choice`` (table in benchmarks/README.md). Its
thresholds were fitted to that one run (2-core CPU): treat them as a measured
default, not a law; pass ``mode=``/``chunk_size=`` to override.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Optional

import jax

from mtl_optax._src import base

PyTree = Any
_LOG = logging.getLogger("mtl_optax")

# Primitives whose task-batched backward is faster than sequential ones on CPU.
_BATCH_FRIENDLY = ("conv_general_dilated",)
# Thresholds measured with benchmarks/engine_choice.py (README table). "extra" is
# N(K + mD)/(mKD), the factored Gram's flops over the m weight gradients' (small when
# the batch is small for the layer widths); "coverage" the share of the parameters
# that are factored.
# Below this coverage the factored layers are a detail (a ResNet's dense head): the
# factored engine's overhead is not repaid.
_MIN_COVERAGE = 0.5
# Gram-only aggregators: the factored engine's cotangent passes are vmapped when the
# model is (nearly) all dense layers and extra < 0.4 (1.0-1.7x faster than sequential
# passes on the MLPs; the LeNet, extra 0.34 but 10 % of its parameters in
# convolutions, was 1.7x slower vmapped).
_WHOLE_COVERAGE = 0.95
_VMAP_MAX_EXTRA = 0.4
# Row-reading aggregators use the factored engine (vmapped) when extra < 0.25: at
# 4-15 % it was 1.0-1.9x faster than stacked rows, at 28-38 % 1.1-1.2x slower.
_ROWS_MAX_EXTRA = 0.25



class EngineChoice(NamedTuple):
  """The engine of a training step, as resolved by :func:`resolve_engine`.

  Attributes:
    mode: "factored" (:func:`mtl_optax.factored_task_grads`) or "jacrev"
      (:func:`mtl_optax.task_grads`, stacked rows).
    chunk_size: 1 (tasks in sequence) or None (all tasks in one vmapped call).
    reason: one line saying why, for logs.
  """
  mode: str
  chunk_size: Optional[int]
  reason: str


def _sub_jaxprs(eqn):
  """The jaxprs nested in an equation's parameters (jit, scan, cond, remat, ...)."""
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        yield inner


def uses_primitive(jaxpr, names) -> bool:
  """Whether ``jaxpr`` (or any jaxpr nested in it) binds one of the primitives ``names``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in names:
      return True
    if any(uses_primitive(inner, names) for inner in _sub_jaxprs(eqn)):
      return True
  return False


def auto_chunk_size(jaxpr=None) -> Optional[int]:
  """``chunk_size="auto"``: None (vmapped) off CPU or for convolutional models, else 1."""
  if jax.default_backend() != "cpu":
    return None
  if jaxpr is not None and uses_primitive(jaxpr, _BATCH_FRIENDLY):
    return None
  return 1


def reads_rows(tx, grads_shape, opt_state, params, losses_shape, tx_kwargs) -> Optional[bool]:
  """Whether ``tx.update`` reads gradient rows (abstract trace; None if unknown)."""
  with base.row_reading_probe() as record:
    try:
      jax.eval_shape(lambda g, s, p, l, kw: tx.update(g, s, p, losses=l, **kw),
                     grads_shape, opt_state, params, losses_shape, tx_kwargs)
    except Exception:  # pylint: disable=broad-except
      # The real call raises the same error with its own message; here we only
      # decline to guess.
      return None
  return any(record) if record else None


def resolve_engine(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args,
    tx=None,
    opt_state=None,
    has_aux: bool = False,
    has_state: bool = False,
    perturbation: bool = False,
    tx_kwargs: Optional[dict] = None,
    **kwargs,
) -> EngineChoice:
  """The engine ``make_train_step(mode="auto")`` uses for this loss, batch and transformation.

  Rule (measured: ``python -m benchmarks.engine_choice``):

  1. A flat (sharpness-aware) step (``perturbation``) uses stacked rows.
  2. The dense products whose factored Gram is cheaper than their m weight
     gradients (the factored engine's own cost rule) are found in the jaxpr;
     with "coverage" the share of the parameters they hold and "extra" =
     Σ N²(K + mD) / Σ mNKD (small when the batch is small for the widths):
     stacked rows if nothing is factored or coverage < 0.5.
  3. ``tx`` is traced abstractly once to find whether it reads the gradient
     rows (a rule returning ``shared_update`` or declaring
     ``AggregatorInfo.reads_rows``). Gram-only: the factored engine, its
     passes vmapped when coverage ≥ 0.95 and extra < 0.4. Row readers: the
     factored engine (vmapped) only when coverage ≥ 0.95 and extra < 0.25
     (the rows then come from the factors in one batched product), else
     stacked rows.
  4. Otherwise tasks are vmapped (``chunk_size=None``) on GPU/TPU and, on CPU,
     when the loss contains a convolution, and run in sequence
     (``chunk_size=1``) for other models on CPU.

  Args:
    loss_fn, params, *args, **kwargs: as for :func:`mtl_optax.task_grads`
      (with ``has_state``, ``args[0]`` is the model state).
    tx: the step's transformation (None: assume it reads only the Gram matrix).
    opt_state: ``tx``'s state (required with ``tx``).
    has_aux, has_state: as for :func:`mtl_optax.task_grads`.
    perturbation: whether the step is a flat (sharpness-aware) step.
    tx_kwargs: extra keyword arguments of ``tx.update`` (e.g. ``val_batch``).

  Returns:
    An :class:`EngineChoice` (mode, chunk_size, reason).
  """
  # Imported here: factored and task_grads import nothing from this module,
  # but keeping the dependency one-way makes the rule easy to find.
  from mtl_optax._src import factored as factored_lib  # pylint: disable=g-import-not-at-top
  from mtl_optax._src import task_grads as task_grads_lib  # pylint: disable=g-import-not-at-top

  where = "resolve_engine"
  task_grads_lib.check_state_args(args, has_state, where)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  flat_fn = lambda *ls: loss_fn(jax.tree_util.tree_unflatten(treedef, ls), *args, **kwargs)
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
  outputs_aux = task_grads_lib.check_state_output(out_shape, has_aux, has_state, where)
  m = task_grads_lib.check_losses_shape(out_shape, outputs_aux, where)
  chunk = auto_chunk_size(closed.jaxpr)
  batching = "vmapped" if chunk is None else "sequential"

  if perturbation:
    return EngineChoice("jacrev", chunk, f"stacked ({batching}): a flat step needs stacked "
                                         "SAM gradients")
  summary = factored_lib.factoring_summary(closed.jaxpr, len(leaves), m)
  if not summary.factored:
    return EngineChoice("jacrev", chunk, f"stacked ({batching}): no dense product is cheaper "
                                         "factored")
  if summary.coverage < _MIN_COVERAGE:
    return EngineChoice("jacrev", chunk, f"stacked ({batching}): the layers cheaper as factors "
                                         f"hold {summary.coverage:.0%} of the parameters")
  rows: Optional[bool] = False
  if tx is not None:
    grads_shape = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct((m,) + jax.numpy.shape(p), jax.numpy.result_type(p)),
        params)
    losses_shape = (out_shape[0] if outputs_aux else out_shape)
    rows = reads_rows(tx, grads_shape, opt_state, params, losses_shape, tx_kwargs or {})
  if rows is None:
    return EngineChoice("jacrev", chunk, f"stacked ({batching}): the transformation could not "
                                         "be traced on stacked gradients")
  # (Nearly) every parameter factored: the m backward passes only propagate cotangents
  # through dense layers, and a task-batched (vmapped) propagation is then the fastest
  # on CPU too.
  # With a batch that is small for the layers (N(K + mD)/(mKD) small) the m sequential
  # passes cost more in loop overhead than they save.
  dense = summary.coverage >= _WHOLE_COVERAGE
  if rows:
    # Rows formed from the factors cost N(K + mD)/(mKD) more flops than the stacked
    # weight gradients, but come in one batched product instead of m small ones.
    if dense and summary.extra < _ROWS_MAX_EXTRA:
      return EngineChoice("factored", None, "factored (vmapped): rows formed from the factors "
                                            f"(+{summary.extra:.0%} flops) in one batched product")
    return EngineChoice("jacrev", chunk, f"stacked ({batching}): the aggregator reads the "
                                         "gradient rows")
  chunk = None if dense and summary.extra < _VMAP_MAX_EXTRA else chunk
  batching = "vmapped" if chunk is None else "sequential"
  return EngineChoice("factored", chunk, f"factored ({batching}): {summary.factored} dense "
                                         f"product(s) ({summary.coverage:.0%} of the parameters) "
                                         "cheaper as factors; Gram-only aggregator")


def log_choice(choice: EngineChoice):
  _LOG.info("mtl_optax step engine: %s", choice.reason)
