"""Small helpers shared by the stateful and the preference-based methods (private)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base
from mtl_optax._src import jacobian


def require_num_tasks(name: str, num_tasks: Optional[int],
                      what: str = "per-task quantities") -> int:
  """Returns m, or raises a clear error when a method whose state needs m lacks it.

  Args:
    name: how the method is named in the message (its factory).
    num_tasks: the factory's ``num_tasks`` argument.
    what: what the state keeps per task, for the message.
  """
  if num_tasks is None:
    raise ValueError(
        f"{name} keeps {what} in its state, so the number of tasks must be known at "
        f"init: build it with {name}(..., num_tasks=m).")
  return num_tasks


def state_dtype(params: Any) -> jnp.dtype:
  """Float dtype of a method's small per-task state: float64 if any parameter is, else float32.

  Narrower floats (bfloat16, float16) and non-float leaves give float32.
  """
  dtype = jnp.dtype(jnp.float32)
  for leaf in jax.tree_util.tree_leaves(params):
    leaf_dtype = getattr(leaf, "dtype", None)
    if leaf_dtype is not None and jnp.issubdtype(leaf_dtype, jnp.floating):
      dtype = jnp.promote_types(dtype, leaf_dtype)
  return dtype


def batch_arg(name: str, extra: dict, key: str, what: str) -> tuple:
  """Pops a required batch keyword (``val_batch=``, ``train_batch=``) of ``update``.

  A non-tuple value is wrapped as the single positional argument of the loss
  function. Raises a clear error when it is missing.
  """
  batch = extra.pop(key, None)
  if batch is None:
    raise ValueError(f"{name} needs {what}: call update(grads, state, params, {key}=batch) "
                     "(a tuple of the positional arguments of the loss function after params).")
  return batch if isinstance(batch, tuple) else (batch,)


def check_task_losses_fn(name: str, loss_fn, params: Any, batch: tuple, m: int):
  """Trace-time check that ``loss_fn(params, *batch)`` returns the ``(m,)`` task losses."""
  out = jax.eval_shape(lambda p, b: loss_fn(p, *b), params, batch)
  if getattr(out, "shape", None) != (m,):
    raise ValueError(f"{name}: the loss function must return the ({m},) task losses, got "
                     f"{getattr(out, 'shape', out)}.")


def stacked_leaves(name: str, grads: Any) -> list:
  """The leaves of stacked per-task gradients; factored Jacobians are refused."""
  base.note_reads_rows()
  if isinstance(grads, jacobian.FactoredJacobian):
    raise TypeError(f"{name} needs the stacked per-task gradients of mo.task_grads (it "
                    "takes inner products with other gradients); got a FactoredJacobian.")
  return jax.tree_util.tree_leaves(grads)
def check_preference(name: str, preference: Any) -> Optional[np.ndarray]:
  """Validates a fixed preference vector r (1-D, finite, ≥ 0, not all zero); None passes."""
  if preference is None:
    return None
  r = np.asarray(preference, dtype=np.float64)
  if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)) or np.any(r < 0) or not np.any(r > 0):
    raise ValueError(
        f"{name}: preference must be a non-empty 1-D vector of finite non-negative numbers, "
        f"not all zero; got {preference!r}.")
  return r


def preference_for(name: str, fixed: Optional[np.ndarray], extra: dict, m: int, dtype) -> jax.Array:
  """The preference r of this step: ``update(..., preference=r)``, else the fixed one, else 1/m.

  Shapes are checked at trace time; the values of a traced ``preference=`` cannot
  be, so a zero vector is handled by the callers (its direction is taken as 0).
  """
  r = extra.get("preference")
  if r is None:
    r = fixed if fixed is not None else np.full((m,), 1.0 / m)
    if r.shape != (m,):
      raise ValueError(
          f"{name}: the preference has {r.shape[0]} entries but the gradients have m={m} tasks.")
  r = jnp.asarray(r)
  if r.shape != (m,):
    raise ValueError(f"{name}: preference= must have shape ({m},), got {r.shape}.")
  if not jnp.issubdtype(r.dtype, jnp.floating):
    r = r.astype(dtype)
  return r.astype(dtype)


def unit_and_norm(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(v/‖v‖, ‖v‖) without overflow or underflow (v scaled by its largest entry first).

  A zero vector gives (0, 0).
  """
  top = jnp.max(jnp.abs(v))
  safe_top = jnp.where(top > 0, top, 1.0)
  s = v / safe_top
  n_s = jnp.sqrt(jnp.sum(s * s))
  unit = jnp.where(top > 0, s / jnp.where(top > 0, n_s, 1.0), 0.0)
  return unit, n_s * top
