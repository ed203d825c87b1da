"""Smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype
from mtl_optax._src.methods.dwa import EpochLosses
from mtl_optax._src.methods.dwa import advance_epoch
from mtl_optax._src.methods.dwa import check_steps_per_epoch
from mtl_optax._src.methods.dwa import init_epoch_losses
from mtl_optax._src.methods.uncertainty_weighting import check_eps

Array = jax.Array


class STCHState(NamedTuple):
  """Epoch-mean bookkeeping, the nadir (reference) point and whether it is set."""
  epochs: EpochLosses
  nadir: Array
  has_nadir: Array


def stch(
    mu: float = 1.0,
    warmup_epochs: int = 4,
    *,
    steps_per_epoch: Optional[int] = None,
    eps: float = 1e-8,
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """Smooth Tchebycheff scalarisation (STCH) of the log losses.

  After a warm-up that records a reference (nadir) point z, minimises

      m · μ · log Σ_i exp( log(L_i / z_i) / μ ),

  a smooth maximum of the log loss ratios, so w_i = m · p_i / L_i with
  p = softmax(log(L/z) / μ). During the warm-up the loss is Σ_i log L_i
  (w_i = 1/L_i), as in the authors' code: the first ``warmup_epochs`` epochs
  only warm up; epoch number ``warmup_epochs`` (0-based) also accumulates the
  mean losses, which become z; STCH proper starts with the next epoch. Epochs
  are delimited by ``update(..., epoch=e)`` or ``steps_per_epoch`` (see
  :mod:`mtl_optax._src.methods.dwa`; ``steps_per_epoch=1`` gives a warm-up
  counted in steps). Losses and z are floored at ``eps``. Diagnostics:
  ``epoch``, ``completed_epochs``, ``nadir`` (zeros until set).

  Args:
    mu: smoothing μ > 0 (default 1.0, the authors' MTL setting; μ → 0 gives the
      Tchebycheff max).
    warmup_epochs: epochs before the nadir epoch (default 4, the authors').
    steps_per_epoch: if given, an epoch is this many applied steps (used when
      ``epoch=`` is not passed).
    eps: floor of the losses and of z (default 1e-8; the authors add 1e-20
      inside the log).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`. ``num_tasks`` is required. Heads are
      weighted by w by default.

  Reference:
    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization", ICML 2024 (code: github.com/Xi-L/STCH,
    STCH_MTL; LibMTL's STCH).
  """
  name = "stch"
  m = require_num_tasks(name, num_tasks, "epoch-mean losses and the nadir point")
  base.check_positive(name, mu=mu)
  check_eps(name, eps)
  if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or warmup_epochs < 0:
    raise ValueError(f"{name}: warmup_epochs must be a non-negative int, got {warmup_epochs!r}.")
  check_steps_per_epoch(name, steps_per_epoch)
  info = base.AggregatorInfo(name=name, needs_losses=True, representation="exact",
                             scale_degree=1)

  def init_inner(params, _):
    dtype = state_dtype(params)
    return STCHState(init_epoch_losses(m, dtype), jnp.zeros((m,), dtype), jnp.zeros((), bool))

  def rule(view, st):
    ep = advance_epoch(st.epochs, view.losses, view.extra.get("epoch"), steps_per_epoch, name)
    capture = (ep.completed > warmup_epochs) & ~st.has_nadir
    nadir = jnp.where(capture, ep.last_mean, st.nadir)
    has_nadir = st.has_nadir | capture
    losses = jnp.maximum(view.losses.astype(nadir.dtype), eps)
    ratios = jnp.log(losses) - jnp.log(jnp.maximum(nadir, eps))
    p = jax.nn.softmax(ratios / mu)
    w = jnp.where(has_nadir, m * p, jnp.ones_like(p)) / losses
    return base.RuleOutput(state=STCHState(ep, nadir, has_nadir), weights=w,
                           diagnostics={"epoch": ep.epoch, "completed_epochs": ep.completed,
                                        "nadir": nadir})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks,
                              nonfinite=nonfinite)
