"""RotoGrad: gradient homogenisation by per-task feature rotations (Javaloy & Valera, ICLR 2022).

RotoGrad acts on the shared representation z = trunk(θ, x) (last axis of
size d). Every task i sees its own rotated copy z_i = R_i z (R_i ∈ SO(d),
parametrised as R_i = expm(A_i − A_iᵀ)) and:

* the trunk receives the RotoGrad-scaled sum of the per-task gradients o_i
  with respect to z (:func:`rotograd`, an aggregator over those gradients);
* the rotations are trained on their own loss, which pulls each R_i so that
  R_i v matches the task's gradient with respect to z_i, where v is the mean
  of the o_i rescaled to a common norm (:func:`rotograd_rotation_loss`);
* the heads receive their own task's gradient.

:func:`rotograd_update` performs all three for a trunk/heads split model, and
:func:`rotograd_rotations` returns an optional Flax Linen module holding the
rotation generators (Flax is imported only when it is called):

    tx = mo.rotograd(num_tasks=m)
    state = tx.init(jnp.zeros(d))      # params only size the state's dtype
    losses, (g_trunk, g_heads, g_rot), state = mo.rotograd_update(
        tx, state, trunk_fn, heads_loss_fn, trunk_params, head_params,
        rotation_params, trunk_args=(x,), head_args=(y,))

What is reproduced from the paper / reference code (adrianjav/rotograd):
the rotation loss, the gradient scaling with initial norms reset after
``burn_in_period`` steps, rotations initialised at the identity and applied
with stopped gradients in the task forward pass. Simplified: the rotation
acts on the last axis only (channels-last images: rotating channels is the
reference's ``post_shape`` use), the whole axis is rotated (no partial
``rotation_shape``), SO(d) is parametrised by a plain matrix exponential
(geotorch's dynamic trivialisation is not reproduced), and the loss
normalisation option (``normalize_losses``) and RotoGradNorm are not
provided.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import base
from mtl_optax._src import linalg
from mtl_optax._src import task_grads as task_grads_lib
from mtl_optax._src.methods._common import require_num_tasks
from mtl_optax._src.methods._common import state_dtype


def rotation_matrices(generators: jax.Array) -> jax.Array:
  """R_i = expm(A_i − A_iᵀ) ∈ SO(d) for generators of shape (m, d, d)."""
  generators = jnp.asarray(generators)
  if generators.ndim != 3 or generators.shape[1] != generators.shape[2]:
    raise ValueError(f"rotation generators must have shape (m, d, d), got {generators.shape}.")
  skew = generators - jnp.swapaxes(generators, 1, 2)
  return jax.vmap(jax.scipy.linalg.expm)(skew)


def rotate(rotations: jax.Array, z: jax.Array) -> jax.Array:
  """Per-task rotated copies of z: out[i, ..., :] = R_i z[..., :] (last axis rotated)."""
  if z.shape[-1] != rotations.shape[-1]:
    raise ValueError(
        f"rotate: the last axis of z ({z.shape[-1]}) must match the rotation size "
        f"({rotations.shape[-1]}).")
  return jnp.einsum("ikj,...j->i...k", rotations.astype(z.dtype), z,
                    precision=jax.lax.Precision.HIGHEST)


def _generators_of(rotation_params: Any) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(rotation_params)
  if len(leaves) != 1:
    raise ValueError(
        "rotation_params must be the (m, d, d) generators or a pytree holding exactly that one "
        f"array (e.g. the params of mo.rotograd_rotations); got {len(leaves)} leaves.")
  return leaves[0]


def rotograd_rotation_loss(rotation_params: Any, rep_grads: jax.Array,
                           rotated_grads: Optional[jax.Array] = None) -> jax.Array:
  """RotoGrad's rotation loss Σ_i mean_b ‖R_i v_b − r_{i,b}‖².

  Args:
    rotation_params: the generators (m, d, d) or a pytree with that one leaf.
    rep_grads: (m, ..., d) gradients o_i of each task loss with respect to the
      *unrotated* shared features z.
    rotated_grads: (m, ..., d) gradients r_i with respect to the rotated
      features z_i, held constant; default R_i o_i with the current rotations
      (which is what they are when the task forward used R_i).

  Returns:
    The scalar loss; v = mean_i o_i ‖ō‖/‖o_i‖ (ō = mean_i o_i, norms over the
    whole per-task tensor) is held constant.
  """
  rep_grads = jnp.asarray(rep_grads)
  m = rep_grads.shape[0]
  rot = rotation_matrices(_generators_of(rotation_params))
  if rotated_grads is None:
    rotated_grads = jnp.einsum("ikj,i...j->i...k", rot, rep_grads,
                               precision=jax.lax.Precision.HIGHEST)
  rotated_grads = jax.lax.stop_gradient(rotated_grads)
  o = jax.lax.stop_gradient(rep_grads)
  flat = o.reshape(m, -1)
  norms = jnp.linalg.norm(flat, axis=1)
  mean_norm = jnp.linalg.norm(jnp.mean(flat, axis=0))
  target = jnp.mean(o * linalg.safe_div(mean_norm, norms).reshape((m,) + (1,) * (o.ndim - 1)),
                    axis=0)
  predicted = jnp.einsum("ikj,...j->i...k", rot.astype(target.dtype), target,
                         precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum((predicted - rotated_grads) ** 2, axis=-1)
  return jnp.sum(jnp.mean(sq.reshape(m, -1), axis=1))


class RotoGradState(NamedTuple):
  """RotoGrad's inner state: the reference gradient norms n_i⁽⁰⁾ and the step count."""
  initial_norms: jax.Array
  step: jax.Array


def rotograd(burn_in_period: int = 20, *, task_specific=None,
             weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
             nonfinite: str = "skip"):
  """RotoGrad's gradient-magnitude homogenisation of shared-representation gradients.

  With n_i = ‖o_i‖ the norm of task i's gradient with respect to the shared
  features and n_i⁽⁰⁾ its value at the first step (re-recorded at step
  ``burn_in_period``), the relative convergence r_i = n_i / n_i⁽⁰⁾ sets

      α_i = r_i / Σ_j r_j,   S = Σ_i α_i n_i,   d = Σ_i S · o_i / n_i,

  so every task contributes a gradient of the same norm S, favouring the
  tasks that converge slowest. d = Jᵀw with w_i = S / n_i (exposed, clipped to
  the dtype's largest finite value); it is formed as S Σ_i o_i/n_i, so
  gradients of any magnitude are handled. A zero gradient contributes
  nothing; a task whose reference norm is zero gets r_i = 0.

  Meant for the gradients with respect to the shared representation (see
  :func:`rotograd_update`, which also trains the rotations); applied to
  parameter gradients it is the same scaling at the parameter level.

  Args:
    burn_in_period: step at which the reference norms are re-recorded
      (default 20, as the reference code).
    task_specific, weight_heads, nonfinite: see :func:`mtl_optax.make_aggregator`.
    num_tasks: m, required (the reference norms have shape (m,)).

  Reference:
    Javaloy & Valera, "RotoGrad: Gradient Homogenization in Multitask
    Learning", ICLR 2022 (code: adrianjav/rotograd).
  """
  if not isinstance(burn_in_period, int) or burn_in_period < 1:
    raise ValueError(f"rotograd: burn_in_period must be a positive int, got {burn_in_period!r}.")
  m_init = require_num_tasks("rotograd", num_tasks)
  info = base.AggregatorInfo(name="rotograd", representation="variant", scale_degree=1)

  def init_inner(params, m):
    return RotoGradState(initial_norms=jnp.zeros((m_init,), state_dtype(params)),
                         step=jnp.zeros((), jnp.int32))

  def rule(view, state):
    m = view.num_tasks
    dt = view.row_gram.dtype
    r_norms = linalg.safe_norms(view.row_gram)
    norms = r_norms * view.row_scales
    reset = (state.step == 0) | (state.step == burn_in_period)
    n0 = jnp.where(reset, norms, state.initial_norms.astype(dt))
    ratio = linalg.safe_div(norms, n0)
    alpha = linalg.safe_div(ratio, jnp.sum(ratio))
    target = jnp.sum(alpha * norms)
    unit = linalg.safe_div(jnp.ones_like(r_norms), r_norms)  # o_i/n_i = r_i/‖r_i‖
    update = []
    for leaf in view.shared:
      shape = (m,) + (1,) * (leaf.ndim - 1)
      rows = leaf.astype(jnp.promote_types(leaf.dtype, dt)) / view.row_scales.reshape(shape)
      update.append(target * jnp.sum(rows * unit.reshape(shape), axis=0))
    big = jnp.finfo(dt).max
    w = jnp.where(norms > 0, jnp.minimum(linalg.safe_div(target, norms, fill=big), big), 0.0)
    new_state = RotoGradState(initial_norms=n0.astype(state.initial_norms.dtype),
                              step=state.step + 1)
    return base.RuleOutput(state=new_state, shared_update=update,
                           diagnostics={"weights": w, "alpha": alpha})

  return base.make_aggregator(rule, info, init_inner=init_inner, task_specific=task_specific,
                              weight_heads=weight_heads, num_tasks=num_tasks, nonfinite=nonfinite)


def rotograd_update(aggregator, state, trunk_fn: Callable[..., Any],
                    heads_loss_fn: Callable[..., Any], trunk_params: Any, head_params: Any,
                    rotation_params: Any, trunk_args: tuple = (), head_args: tuple = (),
                    chunk_size: task_grads_lib.ChunkSize = "auto", **extra):
  """One RotoGrad step: trunk, head and rotation gradients.

  Args:
    aggregator: usually :func:`rotograd` (``mo.sum()`` gives the reference's
      ``RotateOnly``: rotations without gradient scaling).
    state: its state.
    trunk_fn: ``trunk_fn(trunk_params, *trunk_args) -> z`` of shape (..., d).
    heads_loss_fn: ``heads_loss_fn(head_params, zs, *head_args) -> losses (m,)``
      where ``zs[i]`` (shape (..., d)) is the representation rotated for task
      i; task i's loss must only use ``zs[i]``.
    trunk_params, head_params: the trunk's and the heads' parameters.
    rotation_params: the (m, d, d) generators, or a pytree with that single
      leaf (the params of :func:`rotograd_rotations`).
    trunk_args, head_args: extra positional arguments (inputs, targets).
    chunk_size: as in :func:`mtl_optax.task_grads`.
    **extra: extra arguments for the aggregator.

  Returns:
    ``(losses, (trunk_grad, head_grad, rotation_grad), new_state)``: gradients
    with the structures of the three parameter pytrees, to be applied by the
    user's optimizers (the reference trains the rotations with their own
    learning rate). The task losses flow through the rotations with stopped
    gradients; the rotations only learn from :func:`rotograd_rotation_loss`.
  """
  generators = _generators_of(rotation_params)
  z, trunk_vjp = jax.vjp(lambda tp: trunk_fn(tp, *trunk_args), trunk_params)
  if not hasattr(z, "shape") or len(z.shape) < 1:
    raise ValueError("rotograd_update: trunk_fn must return a single array (..., d).")
  m = generators.shape[0]
  rot = jax.lax.stop_gradient(rotation_matrices(generators))

  def losses_of(hz):
    return heads_loss_fn(hz[0], rotate(rot, hz[1]), *head_args)

  losses, (head_grads, rep_grads) = task_grads_lib.task_grads(
      losses_of, (head_params, z), chunk_size=chunk_size)
  if losses.shape != (m,):
    raise ValueError(f"rotograd_update: {m} rotations but heads_loss_fn returned "
                     f"{losses.shape[0]} losses.")
  rotation_grad = jax.grad(rotograd_rotation_loss)(rotation_params, rep_grads)
  cotangent, new_state = aggregator.update(rep_grads, state, None, losses=losses, **extra)
  trunk_grad = trunk_vjp(cotangent)[0]
  head_grad = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), head_grads)
  return losses, (trunk_grad, head_grad, rotation_grad), new_state


@functools.lru_cache(maxsize=None)
def _rotations_module_class():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top  (optional dependency)

  class RotoGradRotations(nn.Module):
    """Per-task rotations of the last feature axis (RotoGrad), as a Flax Linen module.

    ``apply(variables, z)`` returns the stacked rotated copies (m, ..., d) with
    stopped gradients through the rotations (they are trained by
    :func:`rotograd_rotation_loss`). Parameter: ``generators`` (m, d, d),
    initialised at zero (identity rotations).
    """
    num_tasks: int
    size: int
    param_dtype: Any = jnp.float32

    def setup(self):
      self.generators = self.param("generators", nn.initializers.zeros,
                                   (self.num_tasks, self.size, self.size), self.param_dtype)

    def __call__(self, z):
      return rotate(jax.lax.stop_gradient(rotation_matrices(self.generators)), z)

    def matrices(self):
      """The rotation matrices R_i (with gradients), shape (m, d, d)."""
      return rotation_matrices(self.generators)

  return RotoGradRotations


def rotograd_rotations(num_tasks: int, size: int, param_dtype=jnp.float32):
  """A Flax Linen module holding RotoGrad's per-task rotations (imports Flax lazily).

  Args:
    num_tasks: m.
    size: d, the size of the rotated (last) feature axis.
    param_dtype: dtype of the generators (default float32).

  Returns:
    A ``RotoGradRotations`` module: ``variables = module.init(key, z)``;
    ``module.apply(variables, z)`` gives the (m, ..., d) rotated features;
    ``variables["params"]`` can be passed as ``rotation_params`` to
    :func:`rotograd_update`.
  """
  if not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"rotograd_rotations: num_tasks must be a positive int, got {num_tasks!r}.")
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"rotograd_rotations: size must be a positive int, got {size!r}.")
  return _rotations_module_class()(num_tasks=num_tasks, size=size, param_dtype=param_dtype)
