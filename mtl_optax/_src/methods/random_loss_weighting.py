"""Random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")
SUM_TO = ("one", "num_tasks")


# Jitted: an eager update compiles this loop once (see base._gram_and_finite).
@functools.partial(jax.jit, static_argnames=("m", "distribution", "concentration", "dtype"))
def draw_weights(key: jax.Array, m: int, distribution: str, concentration: float = 1.0,
                 dtype=jnp.float32) -> jax.Array:
  """One draw of RLW weights on the simplex (Σ w = 1) from ``key``.

  normal: softmax(z), z ~ N(0, I); uniform: softmax(u), u ~ U(0, 1)^m;
  dirichlet: Dirichlet(concentration·1) (for 1: uniform on the simplex);
  bernoulli: b / Σb, b ~ Bernoulli(½)^m conditioned on b ≠ 0 (rejection);
  constrained_bernoulli: a uniformly random one-hot vector.
  """
  if distribution == "normal":
    return jax.nn.softmax(jax.random.normal(key, (m,), dtype))
  if distribution == "uniform":
    return jax.nn.softmax(jax.random.uniform(key, (m,), dtype))
  if distribution == "dirichlet":
    return jax.random.dirichlet(key, jnp.full((m,), concentration, dtype), dtype=dtype)
  if distribution == "constrained_bernoulli":
    return jax.nn.one_hot(jax.random.randint(key, (), 0, m), m, dtype=dtype)
  if distribution == "bernoulli":
    def body(carry):
      k, _ = carry
      k, sub = jax.random.split(k)
      return k, jax.random.bernoulli(sub, 0.5, (m,))
    k, sub = jax.random.split(key)
    _, b = jax.lax.while_loop(lambda c: ~jnp.any(c[1]), body,
                              (k, jax.random.bernoulli(sub, 0.5, (m,))))
    b = b.astype(dtype)
    return b / jnp.sum(b)
  raise ValueError(f"unknown distribution {distribution!r}")


def random_loss_weighting(
    distribution: str = "normal",
    *,
    concentration: float = 1.0,
    sum_to: str = "one",
    seed: int = 0,
    task_specific=None,
    weight_heads: Optional[bool] = None,
    num_tasks: Optional[int] = None,
    nonfinite: str = "skip",
):
  """Random loss weighting (RLW): fresh random task weights at every step.

      w = softmax(z),  z ~ N(0, I_m)      (distribution="normal", the default)

  and the variants of Lin et al. / Gama & Grassi: "uniform" (softmax of
  U(0, 1)^m), "dirichlet" (Dirichlet(concentration·1); concentration 1 is the
  uniform distribution on the simplex, Gama & Grassi's "RLW-Dirichlet"),
  "bernoulli" (b/Σb with b ~ Bernoulli(½)^m, b ≠ 0) and
  "constrained_bernoulli" (a random one-hot vector). The weights sum to 1
  (``sum_to="one"``, LibMTL) or to m (``sum_to="num_tasks"``, Gama & Grassi's
  "m·simplex" normalisation). The weights do not depend on the losses, but the
  method belongs to the loss weightings: ``losses=`` is required, and heads are
  weighted by w by default (weighted loss Σ w_i L_i).

  Randomness: the state holds a PRNG key (``jax.random.PRNGKey(seed)``); each
  update does ``key, sub = jax.random.split(key)`` and draws from ``sub``
  (:func:`draw_weights`). Same seed → bit-identical weights.

  Args:
    distribution: one of ``DISTRIBUTIONS`` (default "normal").
    concentration: Dirichlet concentration α > 0 (default 1.0).
    sum_to: "one" (default) or "num_tasks".
    seed: seed of the PRNG key kept in the state (default 0).
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator`.

  Reference:
    Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning", TMLR 2022.
  """
  name = "random_loss_weighting"
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"{name}: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
  if sum_to not in SUM_TO:
    raise ValueError(f"{name}: sum_to must be one of {SUM_TO}, got {sum_to!r}.")
  base.check_positive(name, concentration=concentration)
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ValueError(f"{name}: seed must be an int, got {seed!r}.")
  info = base.AggregatorInfo(name=name, needs_losses=True, stochastic=True,
                             representation="exact", scale_degree=1)

  def rule(view, key):
    m = view.num_tasks
    key, sub = jax.random.split(key)
    w = draw_weights(sub, m, distribution, concentration, view.gram.dtype)
    if sum_to == "num_tasks":
      w = m * w
    return base.RuleOutput(state=key, weights=w)

  return base.make_aggregator(rule, info, init_inner=lambda params, m: jax.random.PRNGKey(seed),
                              task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
