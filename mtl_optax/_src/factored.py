"""Per-task gradients in factored form: the Gram matrix without the Jacobian.

For a parameter ``W`` that enters the loss through one matrix product
``y = a · W`` (a dense layer, a head, an ``einsum``), the gradient of task i is
``∂L_i/∂W = Aᵀ Δ_i``, where ``A`` (N × K) is the layer input flattened over its
N sample positions and ``Δ_i = ∂L_i/∂y`` (N × D) is task i's cotangent of the
layer output. The Jacobian block of ``W`` (m × K·D) then never has to be formed:

* its Gram block is  ⟨Aᵀ Δ_i, Aᵀ Δ_j⟩ = ⟨Δ_i, (A Aᵀ) Δ_j⟩   (N²K + mN²D flops
  instead of the m·N·K·D of the m weight gradients);
* an aggregated update Σ_i w_i ∂L_i/∂W is Aᵀ (Σ_i w_i Δ_i)   (one product).

The m backward passes then only propagate cotangents (they skip the weight
gradients), which is where the saving comes from when the batch is not much
larger than the layer widths. This is the "Gramian" trick of TorchJD's
``autogram`` engine, obtained here without module hooks: the loss function is
traced to a jaxpr, and every eligible matrix product gets a zero additive
perturbation whose cotangent is Δ_i.

A parameter is factored when it is used exactly once, as one operand of a
``dot_general`` without batch dimensions whose other operand is not a parameter,
and the factored Gram is cheaper than the weight gradients; every other
parameter (biases, convolutions, shared weights used twice, ...) gets its
ordinary stacked per-task gradient from the same backward passes. The result is
exact: the same Gram matrix and the same aggregated update as with
:func:`mtl_optax.task_grads`, up to floating-point round-off.

The backward loop also forms (A Aᵀ) Δ_i, so the factors of a layer take
2·m·N·D + N·K floats instead of the m·K·D of its stacked rows. ``jit`` bodies
are traced through (their sharding annotations are not kept: the products run
with the outer program's shardings); parameters used inside other higher-order
primitives (``scan``, ``cond``, ``remat``, ``custom_vjp``, ...) stay stacked.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from mtl_optax._src import jacobian as jacobian_lib
from mtl_optax._src import task_grads as task_grads_lib

PyTree = Any
Array = jax.Array

# Call-like primitives whose body is a plain closed jaxpr: traced through, so a
# dense layer under ``jax.jit`` (or a ``jnp`` function that jits itself) is seen.
_CALLS = ("pjit", "jit", "closed_call", "core_call")


def _literal(v) -> bool:
  return isinstance(v, jax_core.Literal)


def _sub_jaxpr(eqn):
  closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if hasattr(closed, "jaxpr"):
    return closed.jaxpr, closed.consts
  return closed, ()


FACTORIZE = ("auto", "always", "never")


def _find_sites(jaxpr, num_params: int, m: int, factorize: str) -> dict:
  """Paths (tuples of equation indices) of the factorable matrix products."""
  if factorize == "never":
    return {}
  labels = {v: i for i, v in enumerate(jaxpr.invars[:num_params])}
  # leaf -> its uses: (path, eqn, W's operand position) for a candidate product,
  # None for any other use (which keeps the leaf stacked).
  uses: dict[int, list] = {i: [] for i in range(num_params)}

  def walk(jx, lab, path):
    for k, eqn in enumerate(jx.eqns):
      p = path + (k,)
      if eqn.primitive.name in _CALLS:
        inner, _ = _sub_jaxpr(eqn)
        inner_lab = {iv: lab[ov] for iv, ov in zip(inner.invars, eqn.invars)
                     if not _literal(ov) and ov in lab}
        walk(inner, inner_lab, p)
        continue
      labelled = [(pos, lab[v]) for pos, v in enumerate(eqn.invars)
                  if not _literal(v) and v in lab]
      if not labelled:
        continue
      if (eqn.primitive.name == "dot_general" and len(labelled) == 1
          and not any(eqn.params["dimension_numbers"][1])):
        uses[labelled[0][1]].append((p, eqn, labelled[0][0]))
      else:
        for _, leaf in labelled:
          uses[leaf].append(None)
    for v in jx.outvars:
      if not _literal(v) and v in lab:
        uses[lab[v]].append(None)

  walk(jaxpr, labels, ())
  sites = {}
  for leaf, us in uses.items():
    if len(us) != 1 or us[0] is None:
      continue
    path, eqn, w_side = us[0]
    w, a = eqn.invars[w_side].aval, eqn.invars[1 - w_side].aval
    if not (jnp.issubdtype(w.dtype, jnp.floating) and jnp.issubdtype(a.dtype, jnp.floating)):
      continue
    (lc, rc), _ = eqn.params["dimension_numbers"]
    w_contract, a_contract = (tuple(lc), tuple(rc)) if w_side == 0 else (tuple(rc), tuple(lc))
    w_free = tuple(d for d in range(w.ndim) if d not in w_contract)
    a_free = tuple(d for d in range(a.ndim) if d not in a_contract)
    n = math.prod(a.shape[d] for d in a_free)
    k = math.prod(w.shape[d] for d in w_contract)
    d = math.prod(w.shape[d] for d in w_free)
    # Factored Gram (A Aᵀ, then (A Aᵀ) Δ_j) vs the m weight gradients Aᵀ Δ_i.
    if factorize == "always" or n * n * k + m * n * n * d < m * n * k * d:
      sites[path] = jacobian_lib.Site(leaf, w_side, w_contract, a_contract, w_free, a_free,
                                      tuple(w.shape))
  return sites


class FactoringSummary(NamedTuple):
  """How much of a loss the factored engine would factor (for ``mode="auto"``).

  Attributes:
    factored: the number of products ``factorize="auto"`` factors.
    coverage: the share of the parameters (by size) whose gradients are
      factored: near 1 for an MLP, small for a network of convolutions (which
      stay stacked whatever the batch).
    extra: Σ N²(K + mD) / Σ mNKD over the factored products: the flops of the
      factored Gram relative to the m weight gradients, which is also what
      forming the rows from the factors costs on top of the stacked engine.
  """
  factored: int
  coverage: float
  extra: float


def factoring_summary(jaxpr, num_params: int, m: int) -> FactoringSummary:
  """The :class:`FactoringSummary` of a loss's jaxpr for m tasks."""
  auto = _find_sites(jaxpr, num_params, m, "auto")

  def sizes(path, site):
    a = _eqn_at(jaxpr, path).invars[1 - site.w_side].aval
    return (math.prod(a.shape[d] for d in site.a_free),
            math.prod(site.w_shape[d] for d in site.w_contract),
            math.prod(site.w_shape[d] for d in site.w_free))

  total = sum(math.prod(v.aval.shape) for v in jaxpr.invars[:num_params])
  covered = sum(math.prod(s.w_shape) for s in auto.values())
  factored_sizes = [sizes(p, s) for p, s in auto.items()]
  grads = sum(m * n * k * d for n, k, d in factored_sizes)
  extra = sum(n * n * (k + m * d) for n, k, d in factored_sizes) / grads if grads else 0.0
  return FactoringSummary(len(auto), covered / total if total else 0.0, extra)


def _eval(jaxpr, consts, args, path, sites, perts, acts):
  """Evaluates ``jaxpr``, adding ``perts[path]`` to the factored products' outputs."""
  env = {}

  def read(v):
    return v.val if _literal(v) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for k, eqn in enumerate(jaxpr.eqns):
    p = path + (k,)
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive.name in _CALLS:
      inner, inner_consts = _sub_jaxpr(eqn)
      outs = _eval(inner, inner_consts, invals, p, sites, perts, acts)
    else:
      bind = eqn.primitive.get_bind_params(eqn.params)
      # Older jax returns (subfuns, params), newer the params alone.
      subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
      if p in sites:
        outs = [outs[0] + perts[p]]
        acts[p] = invals[1 - sites[p].w_side]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jax_core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def factored_task_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args,
    chunk_size: task_grads_lib.ChunkSize = "auto",
    has_aux: bool = False,
    has_state: bool = False,
    factorize: str = "auto",
    **kwargs,
):
  """Losses and per-task gradients in factored form (:class:`mtl_optax.FactoredJacobian`).

  Same mathematics as :func:`mtl_optax.task_grads` (mode "jacrev"): one forward
  pass, then m backward passes. For every parameter W used once in a matrix
  product y = a·W (see the module docstring) the backward passes stop at the
  layer-output cotangents Δ_i = ∂L_i/∂y instead of forming ∂L_i/∂W = AᵀΔ_i,
  and aggregators compute the Gram block as ⟨Δ_i, (AAᵀ) Δ_j⟩ and the update as
  Aᵀ(Σ_i w_i Δ_i). Cheaper than the stacked gradients when the number of sample
  positions N (batch × sequence) is below about m·K·D/(K + m·D) for a K × D
  weight (an m = 8 MLP of width 512 at batch 256: 25 % fewer flops); a
  parameter for which it is not cheaper keeps its stacked gradient. Memory:
  2·m·N·D + N·K floats per factored layer instead of m·K·D, so less than the
  stacked rows only when N < K/2 (small batches, wide layers).

  Pass the result to an aggregator's ``update`` (or use
  ``make_train_step(..., mode="factored")``). Methods that read the gradients
  themselves rather than weighting them (PCGrad, GradDrop, ConFIG, ...) get the
  materialised blocks, at the cost of forming them.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> losses (m,)`` (or
      ``(losses, aux)`` with ``has_aux``). Must be traceable to a jaxpr
      (``jax.make_jaxpr``) with the parameters as inputs.
    params: parameter pytree.
    *args: positional arguments of ``loss_fn``.
    chunk_size: as in :func:`mtl_optax.task_grads` (default "auto").
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    has_state: ``args[0]`` is a model state (BatchNorm statistics, dropout
      keys) that ``loss_fn`` returns updated, as in :func:`mtl_optax.task_grads`
      (one forward pass: the new state is that of θ on the whole batch).
    factorize: which eligible products to factor: "auto" (default: those for
      which N²K + m·N²D < m·N·K·D, i.e. the factored Gram is cheaper than the
      m weight gradients), "always" (all of them: least memory) or "never"
      (plain stacked gradients, as :func:`mtl_optax.task_grads`).
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``(losses, jacobian)`` or ``((losses, aux), jacobian)`` with ``has_aux``
    (``aux`` is the new model state with ``has_state``, or
    ``(new_model_state, aux)`` with both).

  References:
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024
    (TorchJD; its ``autogram`` engine computes the same Gramian with hooks).
  """
  if factorize not in FACTORIZE:
    raise ValueError(f"factored_task_grads: factorize must be one of {FACTORIZE}, "
                     f"got {factorize!r}.")
  where = "factored_task_grads"
  task_grads_lib.resolve_chunk_size(chunk_size, where)      # validate before tracing
  task_grads_lib.check_state_args(args, has_state, where)   # before tracing loss_fn
  leaves, treedef = jax.tree_util.tree_flatten(params)
  flat_fn = lambda *ls: loss_fn(jax.tree_util.tree_unflatten(treedef, ls), *args, **kwargs)
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
  chunk = task_grads_lib.resolve_chunk_size(chunk_size, where, closed.jaxpr)
  has_aux = task_grads_lib.check_state_output(out_shape, has_aux, has_state, where)
  m = task_grads_lib.check_losses_shape(out_shape, has_aux, where)
  out_tree = jax.tree_util.tree_structure(out_shape)
  jaxpr = closed.jaxpr
  sites = _find_sites(jaxpr, len(leaves), m, factorize)
  factored_leaves = {s.leaf for s in sites.values()}
  rest_idx = [l for l in range(len(leaves)) if l not in factored_leaves]
  paths = sorted(sites)
  out_avals = [_eqn_at(jaxpr, p).outvars[0].aval for p in paths]
  perts = [jnp.zeros(aval.shape, aval.dtype) for aval in out_avals]

  def perturbed(pert_list, rest):
    full = list(leaves)
    for l, x in zip(rest_idx, rest):
      full[l] = x
    acts = {}
    outs = _eval(jaxpr, closed.consts, full, (), sites, dict(zip(paths, pert_list)), acts)
    out = jax.tree_util.tree_unflatten(out_tree, outs)
    losses, aux = out if has_aux else (out, None)
    return losses, (aux, [acts[p] for p in paths])

  losses, vjp_fn, (aux, acts) = jax.vjp(
      perturbed, perts, [leaves[l] for l in rest_idx], has_aux=True)
  a_mats = [_sample_major(a, sites[p].a_free, sites[p].a_contract) for p, a in zip(paths, acts)]
  kernels = [a @ a.T for a in a_mats]   # A Aᵀ, (N, N)

  def one_task(e):
    cotangents, rest = vjp_fn(e)
    deltas = [_output_major(ct, sites[p]) for p, ct in zip(paths, cotangents)]
    # (A Aᵀ) Δ_i, formed here so every stacked output keeps the task axis first
    # (no transposes of the (m, N, D) stacks before the Gram products).
    return deltas, [k @ d for k, d in zip(kernels, deltas)], rest

  eye = jnp.eye(m, dtype=losses.dtype)
  deltas, mixed, rest_grads = task_grads_lib.map_over_tasks(one_task, eye, chunk)

  n = len(leaves)
  site_of: list = [None] * n
  stacked: list = [None] * n
  a_of: list = [None] * n
  d_of: list = [None] * n
  mixed_of: list = [None] * n
  for l, g in zip(rest_idx, rest_grads):
    stacked[l] = g
  for p, a, d, k in zip(paths, a_mats, deltas, mixed):
    l = sites[p].leaf
    site_of[l], a_of[l], d_of[l], mixed_of[l] = sites[p], a, d, k
  jac = jacobian_lib.FactoredJacobian(treedef, tuple(site_of), stacked, a_of, d_of, mixed_of)
  return ((losses, aux), jac) if has_aux else (losses, jac)


def _sample_major(a: Array, free: tuple, contract: tuple) -> Array:
  """The activation as an (N, K) matrix: sample axes first, contracted ones last."""
  n = math.prod(a.shape[d] for d in free)
  return jnp.transpose(a, free + contract).reshape(n, -1)


def _output_major(ct: Array, s) -> Array:
  """One task's cotangent of the product's output as an (N, D) matrix.

  The output axes are (left operand's free axes..., right operand's free axes...).
  """
  n_w, n_a = len(s.w_free), len(s.a_free)
  perm = (tuple(range(n_w, n_w + n_a)) + tuple(range(n_w)) if s.w_side == 0
          else tuple(range(n_a + n_w)))
  n = math.prod(ct.shape[i] for i in perm[:n_a])
  return jnp.transpose(ct, perm).reshape(n, -1)


def _eqn_at(jaxpr, path):
  eqn = None
  for k in path:
    if eqn is not None:
      jaxpr, _ = _sub_jaxpr(eqn)
    eqn = jaxpr.eqns[k]
  return eqn
