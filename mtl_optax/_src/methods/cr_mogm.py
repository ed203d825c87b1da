"""CR-MOGM: exponentially averaged task weights for any weighted aggregator (Zhou et al., 2022)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import base
from mtl_optax._src import flat as flat_lib
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype


class CRMOGMState(NamedTuple):
  """The wrapped aggregator's state, the averaged weights λ and whether λ is set."""
  inner: Any
  weights: jax.Array
  started: jax.Array


def _shared_params(params, task_specific):
  """The shared parameter leaves, as the wrapped aggregator sees them (a list)."""
  stacked = jax.tree_util.tree_map(
      lambda p: jax.ShapeDtypeStruct((1,) + jnp.shape(p), jnp.result_type(p)), params)
  heads = base.resolve_task_specific(task_specific, stacked, params)
  return [p for p, h in zip(jax.tree_util.tree_leaves(params), heads) if not h]


def cr_mogm(aggregator, beta: float = 0.9, *, initial_weights=None, task_specific=None,
            weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
            nonfinite: str = "skip"):
  """CR-MOGM: an exponential moving average of the task weights of a weighted aggregator.

  Zhou et al. show that stochastic gradient manipulation (MGDA, PCGrad,
  CAGrad, ...) can fail to converge because its weights are computed from the
  noisy gradients of one mini-batch, and fix it by averaging them over time:
  with λ̂_k the weights of the wrapped aggregator at step k,

      λ_k = β λ_{k−1} + (1 − β) λ̂_k,      d_k = Jᵀ λ_k,

  λ_0 = ``initial_weights`` if given, else λ̂_1 (so the first update is the
  wrapped aggregator's, whatever β; TorchJD's ``CRMOGMWeighting``). β = 0 is
  the wrapped aggregator; β = 1 freezes the weights at λ_0. The paper's
  Corollary 1 schedules β_k → 1 as the learning rate decays; here β is fixed.

  Only weighted aggregators (``AggregatorInfo.weighted``: d = Jᵀw with w
  exposed) can be wrapped; others raise a ValueError.

  Partition. The wrapper owns the shared / task-specific partition
  (``task_specific=``), as :func:`mtl_optax.flat` does: the wrapped aggregator
  sees the shared leaves only (as a list), so build it without
  ``task_specific`` (and with ``num_tasks`` if it is stateful). Heads get their
  own gradient, or Σ λ_i g_i when the wrapped method weights heads (loss
  weightings; ``weight_heads=`` overrides).

  Diagnostics: ``weights`` = λ_k (also ``mo.task_weights``), ``inner_weights``
  = λ̂_k, and the base diagnostics; the wrapped aggregator's own are in
  ``state.inner.inner.diagnostics`` (inside an ``optax.chain``, index first).

  Args:
    aggregator: a weighted mtl_optax aggregator (``mo.mgda()``, ...).
    beta: EMA coefficient β ∈ [0, 1] on the previous weights (default 0.9).
    initial_weights: optional λ_0 (m finite values).
    task_specific: partition of the parameters (see above).
    weight_heads: whether heads are weighted by λ (default: as the wrapped
      aggregator).
    num_tasks: m, required (λ lives in the state).
    nonfinite: see :func:`mtl_optax.make_aggregator`.

  Reference:
    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022.
  """
  name = "cr_mogm"
  inner_info = base.aggregator_info(aggregator)
  if not inner_info.weighted:
    raise ValueError(
        f"{name}: {inner_info.name} is not a weighted aggregator (its update is not Jᵀw with "
        "the weights exposed), so there are no weights to average.")
  if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
    raise ValueError(f"{name}: beta must be in [0, 1], got {beta!r}.")
  m = require_num_tasks(name, num_tasks, "the averaged task weights")
  lam0 = None
  if initial_weights is not None:
    lam0 = np.asarray(initial_weights, dtype=np.float64)
    if lam0.shape != (m,) or not np.all(np.isfinite(lam0)):
      raise ValueError(f"{name}: initial_weights must be {m} finite values, got "
                       f"{initial_weights!r}.")
  info = base.AggregatorInfo(name=name, needs_losses=inner_info.needs_losses,
                             stochastic=inner_info.stochastic,
                             representation=inner_info.representation,
                             # Averaged weights scale like the inner ones.
                             scale_degree=inner_info.scale_degree,
                             reads_rows=inner_info.reads_rows)
  if weight_heads is None:
    weight_heads = inner_info.weight_heads

  def init_inner(params, _):
    dtype = state_dtype(params)
    # The wrapped state's diagnostics are built for m rows now: a constant structure.
    kwargs = {"losses": jax.ShapeDtypeStruct((m,), dtype)} if inner_info.needs_losses else {}
    inner = flat_lib._filled_init(aggregator, _shared_params(params, task_specific), m, kwargs)
    lam = jnp.asarray(lam0, dtype) if lam0 is not None else jnp.zeros((m,), dtype)
    return CRMOGMState(inner=inner, weights=lam, started=jnp.asarray(lam0 is not None))

  def rule(view, st):
    kwargs = dict(view.extra)
    if view.losses is not None:
      kwargs["losses"] = view.losses
    _, new_inner = aggregator.update(list(view.shared), st.inner, None, **kwargs)
    lam_hat = base.diagnostics(new_inner)["weights"].astype(st.weights.dtype)
    prev = jnp.where(st.started, st.weights, lam_hat)
    lam = beta * prev + (1.0 - beta) * lam_hat
    new_state = CRMOGMState(inner=new_inner, weights=lam, started=jnp.ones((), bool))
    return base.RuleOutput(state=new_state, weights=lam.astype(view.gram.dtype),
                           diagnostics={"inner_weights": lam_hat.astype(view.gram.dtype)})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
