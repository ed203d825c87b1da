"""Small helpers shared by the stateful methods (private)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


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
