"""Weight-space robustness and loss-landscape slices around trained parameters.

* :func:`filter_normalized_direction` — a random direction whose every filter
  has the norm of the corresponding filter of θ (Li et al., NeurIPS 2018).
* :func:`noise_robustness` — a metric (e.g. per-task accuracy) of θ + r·d for
  several radii r and random directions d, as the FS-MTL robustness study
  (``multi-mnist/test.py``: 10 unit-norm Gaussian directions per radius).
* :func:`loss_landscape_1d` / :func:`loss_landscape_2d` — per-task losses
  along θ + α d (and θ + α d₁ + β d₂), Li et al.'s plots.

All are pure and jit-able; points are evaluated one (or ``chunk_size``) at a
time with ``jax.lax.map``, so memory stays that of one evaluation plus one
perturbed copy of the parameters.

Models with state (BatchNorm). Directions live in the space of the trainable
parameters only; running statistics are part of the model state, not of
``params``, and are left as they are. Evaluate in inference mode with the
trained statistics closed over::

    def eval_fn(p):   # -> (m,) per-task accuracies
      logits = model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)
      return jnp.stack([jnp.mean(jnp.argmax(l, -1) == y[:, i])
                        for i, l in enumerate(logits)])

(as the FS-MTL script, which calls ``net.eval()`` and perturbs
``named_parameters()`` only). BatchNorm's scale and bias are 1-D leaves: with
filter normalisation they are not perturbed by default (``one_dim="zero"``,
Li et al.'s ``--xignore biasbn``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import linalg
from mtl_optax._src import task_grads as task_grads_lib

PyTree = Any

ONE_DIM = ("zero", "weights")
DIRECTIONS = ("global", "filter")


def _float_leaves(where, params):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if not leaves:
    raise ValueError(f"{where}: params has no leaves.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"{where}: every parameter must be floating (a direction in weight "
                       f"space), got a leaf of dtype {jnp.result_type(leaf)}; keep integer "
                       "or key state out of params.")
  return leaves, treedef


def filter_normalized_direction(
    key: jax.Array,
    params: PyTree,
    *,
    filter_axis: int = -1,
    one_dim: str = "zero",
    eps: float = 1e-10,
) -> PyTree:
  """A Gaussian direction rescaled filter by filter to the norms of θ.

  For every leaf W of rank ≥ 2 and each filter f (a slice along
  ``filter_axis``: one output channel of a convolution kernel, one output
  unit of a dense kernel), with d ~ N(0, I) of the leaf's shape,

      d_f ← d_f · ‖W_f‖ / (‖d_f‖ + eps),

  so that a step θ + α d moves every filter by the fraction α of its own
  size, which removes the scale invariance of ReLU/BatchNorm networks from
  the picture (Li et al., §4). Leaves of rank ≤ 1 (biases, BatchNorm scale
  and shift, scalars) get ``one_dim="zero"``: d = 0 (Li et al.'s
  ``--xignore biasbn``, used in their plots, the default) or
  ``"weights"``: d = W (their code without the ignore flag).

  Args:
    key: PRNG key.
    params: parameter pytree (floating leaves).
    filter_axis: the filter (output) axis of rank ≥ 2 leaves; -1 (default)
      for Flax/Haiku layouts (HWIO convolution kernels, (in, out) dense
      kernels), 0 for PyTorch-layout weights (OIHW, (out, in)).
    one_dim: "zero" (default) or "weights", see above.
    eps: added to each ‖d_f‖ (default 1e-10, as Li et al.).

  Returns:
    A pytree with the structure, shapes and dtypes of ``params``.

  Reference:
    Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of
    Neural Nets", NeurIPS 2018 (filter normalisation).
  """
  where = "filter_normalized_direction"
  if one_dim not in ONE_DIM:
    raise ValueError(f"{where}: one_dim must be one of {ONE_DIM}, got {one_dim!r}.")
  if isinstance(filter_axis, bool) or not isinstance(filter_axis, int):
    raise ValueError(f"{where}: filter_axis must be an int, got {filter_axis!r}.")
  if not (isinstance(eps, (int, float)) and eps >= 0):
    raise ValueError(f"{where}: eps must be a non-negative number, got {eps!r}.")
  leaves, _ = _float_leaves(where, params)
  for w in leaves:
    if jnp.ndim(w) >= 2 and not -jnp.ndim(w) <= filter_axis < jnp.ndim(w):
      raise ValueError(f"{where}: filter_axis={filter_axis} is out of range for a parameter "
                       f"of shape {jnp.shape(w)}.")
  return _filter_direction(key, params, filter_axis, one_dim, float(eps))


# One compiled program rather than op-by-op dispatch over the leaves when called
# eagerly (inlined inside a user's jit).
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _filter_direction(key, params, filter_axis, one_dim, eps):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, w in zip(keys, leaves):
    if w.ndim <= 1:
      out.append(jnp.zeros_like(w) if one_dim == "zero" else w)
      continue
    acc = linalg.accumulation_dtype(w.dtype)
    d = jax.random.normal(k, w.shape, acc)
    axes = tuple(a for a in range(w.ndim) if a != filter_axis % w.ndim)
    # Exact power-of-two rescaling: filters of huge (or tiny) weights neither overflow
    # nor underflow in the sum of squares.
    # (Rounded down, unlike linalg.power_of_two_scale, so that weights near the dtype's
    # maximum do not get a scale of inf.)
    top = jnp.max(jnp.abs(w)).astype(acc)
    scale = jnp.exp2(jnp.floor(jnp.log2(jnp.where(top > 0, top, 1.0))))
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(acc) / scale), axis=axes,
                              keepdims=True)) * scale
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
    out.append((d * (w_norm / (d_norm + eps))).astype(w.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _global_unit_direction(key, params):
  """A direction d ~ N(0, I) over all parameters over its global norm (the FS-MTL noise)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  acc = linalg.accumulation_dtype(jnp.result_type(*leaves))
  zs = [jax.random.normal(k, jnp.shape(w), acc) for k, w in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(z * z) for z in zs))
  return jax.tree_util.tree_unflatten(treedef, [linalg.safe_div(z, norm) for z in zs])


def _check_direction(where, params, direction, name):
  p_leaves, treedef = jax.tree_util.tree_flatten(params)
  try:
    d_leaves = treedef.flatten_up_to(direction)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: {name} must have the structure of params: {e}") from None
  for p, d in zip(p_leaves, d_leaves):
    if jnp.shape(p) != jnp.shape(d):
      raise ValueError(f"{where}: {name} has a leaf of shape {jnp.shape(d)} where params has "
                       f"{jnp.shape(p)}.")


def _move(params, coefs_dirs):
  """θ + Σ_j c_j d_j, in each parameter's dtype."""
  def leaf(p, *ds):
    acc = linalg.accumulation_dtype(jnp.result_type(p))
    total = p.astype(acc)
    for (c, _), d in zip(coefs_dirs, ds):
      total = total + c.astype(acc) * d.astype(acc)
    return total.astype(jnp.result_type(p))
  return jax.tree_util.tree_map(leaf, params, *[d for _, d in coefs_dirs])


_move_jit = jax.jit(lambda p, r, d: _move(p, [(r, d)]))


def _coordinates(where, name, values) -> jax.Array:
  arr = jnp.atleast_1d(jnp.asarray(values))
  if arr.ndim != 1 or arr.shape[0] == 0:
    raise ValueError(f"{where}: {name} must be a non-empty 1-D sequence, got shape "
                     f"{arr.shape}.")
  try:
    concrete = np.asarray(arr, dtype=np.float64)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    concrete = None
  if concrete is not None and not np.all(np.isfinite(concrete)):
    raise ValueError(f"{where}: every entry of {name} must be finite, got {values!r}.")
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    arr = arr.astype(jnp.result_type(float))
  return arr


def noise_robustness(
    eval_fn: Callable[[PyTree], Any],
    params: PyTree,
    key: jax.Array,
    radii: Union[Sequence[float], jax.Array],
    num_directions: int = 10,
    *,
    direction: str = "global",
    filter_axis: int = -1,
    one_dim: str = "zero",
    host_loop: bool = False,
):
  """A metric of randomly perturbed weights, for several radii and directions.

      out[r, j] = eval_fn(θ + radii[r] · d_j),   j = 1 … num_directions,

  * ``direction="global"`` (default, the FS-MTL ``test.py``): d_j ~ N(0, I)
    over all parameters, scaled to unit global norm, so ‖θ' − θ‖ = r
    (an absolute radius; the authors use r = 0, 50, …, 950 for their ResNet).
  * ``direction="filter"``: d_j = :func:`filter_normalized_direction`, so r
    is relative to the size of each filter (r = 1 moves every filter by its
    own norm; comparable across models and layers).

  The same num_directions directions are used at every radius (drawn from
  ``key``; the authors draw fresh ones per radius — the same distribution,
  but shared directions give smoother curves); summarise with
  ``out.mean(1)`` and ``out.std(1)`` as they do. ``eval_fn`` returns a
  scalar or, for MTL, the per-task vector (e.g. accuracies ``(m,)``); any
  pytree of arrays works. It must evaluate the model in inference mode and
  close over any model state (see the module docstring for BatchNorm).

  Args:
    eval_fn: ``eval_fn(params) -> metric`` (jit-traceable unless ``host_loop``).
    params: the trained parameters θ.
    key: PRNG key for the directions.
    radii: R finite radii (may be traced unless ``host_loop``).
    num_directions: number of random directions (default 10, as the authors).
    direction: "global" (default) or "filter", see above.
    filter_axis, one_dim: for ``direction="filter"``, as in
      :func:`filter_normalized_direction`.
    host_loop: False (default): one ``lax.map`` over directions and radii
      (jit-able, one perturbed copy at a time). True: a Python loop calling
      ``eval_fn`` with concrete parameters, for evaluations that stream a data
      set from the host; same values.

  Returns:
    The output of ``eval_fn`` with leading axes ``(R, num_directions)``.

  Reference:
    Phan et al., "Beyond Losses Reweighting: Empowering Multi-Task Learning via
    the Generalization Perspective", ICCV 2025 (robustness to weight noise);
    Li et al., NeurIPS 2018 (filter normalisation).
  """
  where = "noise_robustness"
  if direction not in DIRECTIONS:
    raise ValueError(f"{where}: direction must be one of {DIRECTIONS}, got {direction!r}.")
  if isinstance(num_directions, bool) or not isinstance(num_directions, int) or (
      num_directions < 1):
    raise ValueError(f"{where}: num_directions must be a positive int, got {num_directions!r}.")
  _float_leaves(where, params)
  radii = _coordinates(where, "radii", radii)
  if direction == "global":
    make = lambda k: _global_unit_direction(k, params)
  else:
    make = lambda k: filter_normalized_direction(k, params, filter_axis=filter_axis,
                                                 one_dim=one_dim)
  keys = jax.random.split(key, num_directions)
  at = lambda r, d: eval_fn(_move(params, [(r, d)]))

  if host_loop:
    rows = [[None] * num_directions for _ in range(radii.shape[0])]
    for j in range(num_directions):
      d = make(keys[j])  # a compiled program (both direction makers are jitted)
      for r in range(radii.shape[0]):
        rows[r][j] = eval_fn(_move_jit(params, radii[r], d))
    stack = lambda *xs: jnp.stack([jnp.asarray(x) for x in xs])
    return jax.tree_util.tree_map(stack, *[jax.tree_util.tree_map(stack, *row) for row in rows])

  def one_direction(k):
    d = make(k)
    return jax.lax.map(lambda r: at(r, d), radii)

  out = jax.lax.map(one_direction, keys)  # (D, R, ...)
  return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), out)


def loss_landscape_1d(
    loss_fn: Callable[..., Any],
    params: PyTree,
    direction: PyTree,
    alphas: Union[Sequence[float], jax.Array],
    *args,
    chunk_size: task_grads_lib.ChunkSize = 1,
    **kwargs,
):
  """Losses along a line through θ: L(θ + α d) for every α.

      out[a] = loss_fn(θ + alphas[a] · d, *args, **kwargs)

  With a vector-valued ``loss_fn`` (the per-task losses ``(m,)``), every
  task's profile comes from the same evaluations. Use a
  :func:`filter_normalized_direction` for Li et al.'s plots (α ∈ [−1, 1]),
  or e.g. θ_final − θ_init for a linear interpolation (Goodfellow et al.).

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` -> losses (any pytree of
      arrays; e.g. ``(m,)``). Close over, or pass in ``args``, the batch and
      any model state (evaluate normalisation layers in inference mode).
    params: θ.
    direction: d, a pytree with the structure and shapes of ``params``.
    alphas: A finite coordinates (may be traced).
    *args, **kwargs: passed to ``loss_fn``.
    chunk_size: how many points are evaluated at once (``lax.map`` with this
      batch size; default 1, the memory of one evaluation; None: all A points
      in one ``vmap``; "auto": 1 on CPU, None elsewhere).

  Returns:
    The output of ``loss_fn`` with a leading axis of size A.

  Reference:
    Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018;
    Goodfellow, Vinyals & Saxe, "Qualitatively Characterizing Neural Network
    Optimization Problems", ICLR 2015.
  """
  where = "loss_landscape_1d"
  _float_leaves(where, params)
  _check_direction(where, params, direction, "direction")
  alphas = _coordinates(where, "alphas", alphas)
  chunk_size = task_grads_lib.resolve_chunk_size(chunk_size, where)
  fn = lambda a: loss_fn(_move(params, [(a, direction)]), *args, **kwargs)
  return task_grads_lib.map_over_tasks(fn, alphas, chunk_size)


def loss_landscape_2d(
    loss_fn: Callable[..., Any],
    params: PyTree,
    dir1: PyTree,
    dir2: PyTree,
    alphas: Union[Sequence[float], jax.Array],
    betas: Union[Sequence[float], jax.Array],
    *args,
    chunk_size: task_grads_lib.ChunkSize = 1,
    **kwargs,
):
  """Losses on a plane through θ: L(θ + α d₁ + β d₂) on an A × B grid.

      out[a, b] = loss_fn(θ + alphas[a] · d₁ + betas[b] · d₂, *args, **kwargs)

  Li et al.'s contour plots use two independent
  :func:`filter_normalized_direction` draws (nearly orthogonal in high
  dimension) and α, β ∈ [−1, 1]. The A·B points are evaluated ``chunk_size``
  at a time.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` -> losses (any pytree of
      arrays; e.g. per-task ``(m,)``).
    params: θ.
    dir1, dir2: the two directions (structure and shapes of ``params``).
    alphas, betas: A and B finite coordinates along d₁ and d₂ (may be traced).
    *args, **kwargs: passed to ``loss_fn``.
    chunk_size: points per evaluation (default 1; None: all at once;
      "auto": 1 on CPU, None elsewhere).

  Returns:
    The output of ``loss_fn`` with leading axes ``(A, B)``.

  Reference:
    Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018.
  """
  where = "loss_landscape_2d"
  _float_leaves(where, params)
  _check_direction(where, params, dir1, "dir1")
  _check_direction(where, params, dir2, "dir2")
  alphas = _coordinates(where, "alphas", alphas)
  betas = _coordinates(where, "betas", betas)
  chunk_size = task_grads_lib.resolve_chunk_size(chunk_size, where)
  num_a, num_b = alphas.shape[0], betas.shape[0]
  dtype = jnp.promote_types(alphas.dtype, betas.dtype)
  grid = (jnp.repeat(alphas.astype(dtype), num_b), jnp.tile(betas.astype(dtype), num_a))
  fn = lambda ab: loss_fn(_move(params, [(ab[0], dir1), (ab[1], dir2)]), *args, **kwargs)
  out = task_grads_lib.map_over_tasks(fn, grid, chunk_size)
  return jax.tree_util.tree_map(lambda x: x.reshape((num_a, num_b) + x.shape[1:]), out)
