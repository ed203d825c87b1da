"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(normalization: str = "none", *, scale: float = 1.0, max_iters: int | None = None,
         tol: float | None = None, task_specific=None, weight_heads: Optional[bool] = None,
         num_tasks: Optional[int] = None, nonfinite: str = "skip"):
  """Multiple-gradient descent (MGDA).

  With normalised gradients ĝ_i = g_i / n_i and a constant factor c (``scale``),

      α = argmin_{α ∈ Δ} ‖Σ_i α_i ĝ_i‖²,   d = c Σ_i α_i ĝ_i = Jᵀw,  w_i = c α_i / n_i,

  solved exactly in JAX by an active-set method (closed form for m = 2; the
  reference code uses Frank–Wolfe, which zig-zags on ill-conditioned Gram
  matrices). d is a common descent direction: g_iᵀd ≥ ‖d‖² for every task.
  Normalisations (as in LibMTL): "none" (n_i = 1, the paper), "l2"
  (n_i = ‖g_i‖), "loss" (n_i = L_i), "loss+" (n_i = L_i ‖g_i‖). Run on the
  gradients of a shared representation (``representation_update``) this is
  MGDA-UB. A zero gradient makes the min-norm point 0 (Pareto
  stationarity), so the update is 0, whatever the normalisation. The
  normalised Gram matrix is built from per-row-scaled products in log₂, so
  gradients whose norms differ by up to ~1e±37 are handled in float32. The
  update has degree 1 in the gradients' scale with "none" and "loss", degree 0
  with "l2" and "loss+" (``AggregatorInfo.scale_degree``; see :func:`mtl_optax.flat`).

  The flat (sharpness-aware) MGDA runs of Phan et al. (ICCV 2025; code
  VietHoang1512/FS-MTL), with :func:`mtl_optax.flat` ("F-MGDA") and its
  ``"direct"`` variant ("a-MGDA", MGDA on the SAM gradients):

  * multi-MNIST (``multi-mnist/train.py``): ``mo.flat(mo.mgda())`` and
    ``mo.flat(mo.mgda(), "direct")`` — no normalisation, no factor;
  * CelebA (``celeba/train.py``, 40 tasks): ``mo.flat(mo.mgda(scale=40))``
    (the update is multiplied by 40) and ``mo.flat(mo.mgda(), "direct")``;
  * Cityscapes (``city2scape/train.py``, 2 tasks): ``mo.flat(mo.mgda(scale=2))``
    and ``mo.flat(mo.mgda(scale=2), "direct")`` (the normalisation is
    commented out there);
  * NYUv2 (``nyuv2/train.py``, 3 tasks): F-MGDA divides every g_i and every
    flat gradient h_i by its own norm over the shared parameters — exactly
    ``normalization="l2"`` — and multiplies by 3:
    ``mo.flat(mo.mgda("l2", scale=3), flat_term="sum")`` is their
    3 (A(ĝ) + A(ĥ)); the default ``flat_term="auto"`` multiplies the flat term
    by ‖h‖/‖g‖ (continuous as ρ → 0, see :func:`mtl_optax.flat`). a-MGDA there:
    ``mo.flat(mo.mgda(scale=3), "direct")`` (no normalisation).

  Args:
    normalization: "none" (default), "l2", "loss" or "loss+"; the last two need
      ``losses=``.
    scale: constant factor c > 0 on the update (default 1; the FS-MTL code
      uses the number of tasks on NYUv2, Cityscapes and CelebA, see above).
    max_iters: active-set iteration budget (default 4m + 10).
    tol: relative tolerance on the KKT multipliers (default 1e-9, or 10·eps
      in float64); the reached KKT residual is ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  Example:
    MGDA-UB: MGDA on the per-task gradients ∂L_i/∂z of the shared
    representation z, min-norm weights from their Gram matrix, then one
    backward pass through the trunk with the combined cotangent.

    >>> x, y = jnp.ones((8, 4)), jnp.zeros((8, 3))        # a batch; 3 tasks
    >>> trunk_params = {"w": 0.1 * jnp.ones((4, 16))}
    >>> head_params = {"a": 0.1 * jnp.ones((3, 16))}       # one linear head per task
    >>> trunk = lambda tp, x: jnp.tanh(x @ tp["w"])        # z = trunk(θ_sh, x)
    >>> heads_loss = lambda hp, z, y: jnp.mean((z @ hp["a"].T - y) ** 2, axis=0)
    >>> tx = mo.mgda()
    >>> losses, (trunk_update, head_update), state = mo.representation_update(
    ...     tx, tx.init(None), trunk, heads_loss, trunk_params, head_params,
    ...     trunk_args=(x,), head_args=(y,))
    >>> weights = mo.task_weights(state)                   # MGDA-UB's task weights
    >>> weights.shape, trunk_update["w"].shape
    ((3,), (4, 16))

  References:
    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Math. 2012; Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mgda: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  base.check_positive("mgda", scale=scale)
  if tol is not None:
    base.check_positive("mgda", tol=tol)
  if max_iters is not None:
    base.check_positive("mgda", max_iters=max_iters)
  info = base.AggregatorInfo(name="mgda", needs_losses=normalization in ("loss", "loss+"),
                             representation="variant",
                             scale_degree=0 if normalization in ("l2", "loss+") else 1)

  def rule(view, inner):
    # Normalised rows ĝ_i = g_i / n_i = (s_i / n_i) r_i, built in log₂ from the
    # per-row-scaled Gram matrix so that gradients differing by 1e±30 survive.
    r_norms = linalg.safe_norms(view.row_gram)
    log_s = jnp.log2(view.row_scales)
    if normalization == "none":
      log_n = jnp.zeros_like(log_s)
    elif normalization == "l2":
      log_n = log_s + jnp.log2(r_norms)
    else:
      log_loss = jnp.log2(jnp.abs(view.losses.astype(view.row_gram.dtype)))
      log_n = log_loss if normalization == "loss" else log_loss + log_s + jnp.log2(r_norms)
    # Rows that cannot be normalised (zero gradient or loss) stay zero rows of
    # the normalised Gram matrix: the min-norm point is then 0.
    ok = jnp.isfinite(log_n) & (r_norms > 0)
    log_a = jnp.where(ok, log_s - log_n, -jnp.inf)
    g_hat = linalg.scaled_gram(view.row_gram, jnp.where(jnp.any(ok), log_a, 0.0))
    sol = linalg.min_norm_on_simplex(g_hat, max_iters=max_iters, tol=tol)
    # d = Σ sol_i ĝ_i = Σ w_i g_i with w_i = sol_i / n_i = sol_i · 2^(−log n_i).
    w = jnp.where(ok, sol.x * jnp.exp2(jnp.where(ok, -log_n, 0.0)), 0.0)
    if scale != 1.0:
      w = w * jnp.asarray(scale, w.dtype)
    return base.RuleOutput(state=inner, weights=w,
                           diagnostics={"residual": sol.residual, "iterations": sol.iterations})

  return base.make_aggregator(rule, info, task_specific=task_specific, weight_heads=weight_heads,
                              num_tasks=num_tasks, nonfinite=nonfinite)
