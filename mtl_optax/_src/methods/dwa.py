"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019), and epoch-mean bookkeeping.

Methods that use *epoch-mean* training losses (DWA, STCH, GradNorm's LibMTL
variant) accumulate the losses passed to ``update`` into a running mean inside
their state. Epochs are delimited, inside jit, in one of two ways:

* ``update(..., losses=losses, epoch=e)``: the index of the current epoch (an
  int or a traced int32 scalar). When it differs from the previous call's
  index, the running mean is closed as the mean of the epoch just finished and
  a new one starts with this call's losses. Robust to skipped (non-finite)
  steps and to resuming from a checkpoint: the boundary is seen at the next
  applied step.
* ``steps_per_epoch=k`` in the factory: the epoch index is (number of applied
  steps) // k, no extra argument needed.

An explicit ``epoch=`` wins over ``steps_per_epoch``. With neither, the whole
run is one epoch (DWA then keeps w = 1 and STCH stays in its warm-up).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype

Array = jax.Array


class EpochLosses(NamedTuple):
  """Running and completed epoch-mean task losses.

  Attributes:
    epoch: index of the epoch being accumulated (int32).
    completed: number of completed epochs (int32).
    steps: number of applied steps (int32).
    count: steps accumulated into the current epoch (int32).
    running_mean: ``(m,)`` mean loss of the current epoch so far.
    last_mean: ``(m,)`` mean loss of the last completed epoch (L̄(e−1)).
    prev_mean: ``(m,)`` mean loss of the epoch before it (L̄(e−2)).
  """
  epoch: Array
  completed: Array
  steps: Array
  count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count
  running_mean: Array
  last_mean: Array
  prev_mean: Array


def init_epoch_losses(m: int, dtype) -> EpochLosses:
  """Empty bookkeeping for m tasks.

  Every field gets its own buffer: a state whose leaves share one array cannot
  be donated (``jax.jit(..., donate_argnums=...)`` donates each leaf).
  """
  zero = lambda: jnp.zeros((), jnp.int32)
  vec = lambda: jnp.zeros((m,), dtype)
  return EpochLosses(zero(), zero(), zero(), zero(), vec(), vec(), vec())


def check_steps_per_epoch(name: str, steps_per_epoch: Optional[int]):
  if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int)
                                      or isinstance(steps_per_epoch, bool)
                                      or steps_per_epoch < 1):
    raise ValueError(f"{name}: steps_per_epoch must be None or a positive int, "
                     f"got {steps_per_epoch!r}.")


def advance_epoch(state: EpochLosses, losses: Array, epoch, steps_per_epoch: Optional[int],
                  name: str) -> EpochLosses:
  """Closes the current epoch if the epoch index changed, then adds ``losses``.

  Args:
    state: the bookkeeping.
    losses: ``(m,)`` this step's losses.
    epoch: the ``epoch=`` argument of ``update`` (None if not passed).
    steps_per_epoch: the factory's ``steps_per_epoch`` (None if not given).
    name: method name for error messages.
  """
  if epoch is not None:
    epoch = jnp.asarray(epoch)
    if epoch.ndim != 0 or not jnp.issubdtype(epoch.dtype, jnp.integer):
      raise ValueError(f"{name}: epoch= must be an integer scalar (the index of the current "
                       f"epoch), got shape {epoch.shape} and dtype {epoch.dtype}.")
    index = epoch.astype(jnp.int32)
  elif steps_per_epoch is not None:
    index = state.steps // steps_per_epoch
  else:
    index = state.epoch
  close = (index != state.epoch) & (state.count > 0)
  last = jnp.where(close, state.running_mean, state.last_mean)
  prev = jnp.where(close, state.last_mean, state.prev_mean)
  count = jnp.where(close, 0, state.count)
  running = jnp.where(close, jnp.zeros_like(state.running_mean), state.running_mean)
  count = count + 1
  losses = losses.astype(running.dtype)
  running = running + (losses - running) / count.astype(running.dtype)
  return EpochLosses(
      epoch=index, completed=state.completed + close.astype(jnp.int32), steps=state.steps + 1,
      count=count, running_mean=running, last_mean=last, prev_mean=prev)


# ---------------------------------------------------------------------------
# DWA.
# ---------------------------------------------------------------------------

def dwa(
    temperature: float = 2.0,
    *,
    steps_per_epoch: Optional[int] = None,
    eps: float = 1e-8,
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """Dynamic weight average (DWA).

      w_i = m · softmax_i(r / T),   r_i = L̄_i(e−1) / L̄_i(e−2),

  where L̄(e) is the mean training loss of epoch e (the mean of the losses
  passed to ``update`` during that epoch); w = 1 during the first two epochs.
  Epochs are delimited by ``update(..., epoch=e)`` or ``steps_per_epoch`` (see
  the module docstring); the state holds the running and the two last epoch
  means. Diagnostics: ``epoch`` and ``completed_epochs``.

  Args:
    temperature: T (default 2.0).
    steps_per_epoch: if given, an epoch is this many applied steps (used when
      ``epoch=`` is not passed).
    eps: floor of L̄(e−2) in the ratio (default 1e-8).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. ``num_tasks`` is required. Heads are
      weighted by w by default.

  Reference:
    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019 (as in LibMTL and the MTAN code).
  """
  name = "dwa"
  m = require_num_tasks(name, num_tasks, "epoch-mean losses")
  base.check_positive(name, temperature=temperature, eps=eps)
  check_steps_per_epoch(name, steps_per_epoch)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def init_inner(params, _):
    return init_epoch_losses(m, state_dtype(params))

  def rule(view, st):
    st = advance_epoch(st, view.losses, view.extra.get("epoch"), steps_per_epoch, name)
    ratio = st.last_mean / jnp.maximum(st.prev_mean, eps)
    w = m * jax.nn.softmax(ratio / temperature)
    w = jnp.where(st.completed >= 2, w, jnp.ones_like(w))
    return base.RuleOutput(state=st, weights=w,
                           diagnostics={"epoch": st.epoch, "completed_epochs": st.completed})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
