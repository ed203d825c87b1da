"""Checkpointing: every method's optimizer state round-trips through orbax mid-training.

For each method (every entry of ``tests/registry.py`` — stateful, random and
loss-based ones included — plus flat variants), 2 steps of
``optax.chain(method, adam)`` are run, the parameters and optimizer state are
saved with ``orbax.checkpoint.StandardCheckpointer``, restored into a template
built from a *fresh* ``tx.init`` (as a resuming job does), and 2 more steps are
run from the restored state. Every array must be bitwise identical to
uninterrupted training (same compiled step function for both runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests.registry import ENTRIES, FULL_TESTS

ocp = pytest.importorskip("orbax.checkpoint")

M = 3
STEPS_BEFORE, STEPS_AFTER = 2, 2
# Compile faster (backend codegen only; both runs use the same executable).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

FLAT = ("flat_cagrad", "flat_pcgrad")  # F-CAGrad (the paper's) and a random flat method


def _is_head(path, leaf):
  del leaf
  return "heads" in jax.tree_util.keystr(path)


def _loss_fn(p, x, y):
  h = jnp.tanh(x @ p["trunk"])
  return jnp.mean((h @ p["heads"].T - y) ** 2, axis=0) + 0.1  # (M,), > 0 for log/ratio methods


def _batch(t):
  """A different batch at every step (seeded by the step), targets in conflict."""
  x = jax.random.normal(jax.random.PRNGKey(100 + t), (8, 4))
  y = jnp.stack([jnp.sin(x[:, 0]), -jnp.sin(x[:, 0]) + x[:, 1], 2 * jnp.cos(x[:, 2])], 1)
  return x, y


_RNG = np.random.default_rng(0)
_PARAMS = {"trunk": (0.5 * _RNG.standard_normal((4, 6))).astype(np.float32),
           "heads": (0.5 * _RNG.standard_normal((M, 6))).astype(np.float32)}


def _params():
  return {k: jnp.asarray(v) for k, v in _PARAMS.items()}


def _build(name):
  """(tx, step_fn(params, state, t) -> (params, state))."""
  def apply(tx, p, s, grads, **kw):
    updates, s = tx.update(grads, s, p, **kw)
    return optax.apply_updates(p, updates), s

  if name.startswith("flat_"):
    inner = getattr(mo, name[len("flat_"):])(num_tasks=M)
    tx = optax.chain(mo.flat(inner, task_specific=_is_head), optax.adam(1e-2))
    perturb = mo.task_perturbation(rho_shared=0.05, rho_task=0.05, task_specific=_is_head)
    train_step = mo.make_train_step(_loss_fn, tx, perturbation=perturb, jit=False)
    return tx, lambda p, s, t: train_step(p, s, *_batch(t))[:2]
  if name in ("sdmgrad", "modo"):  # double sampling: two more independent batches
    tx = optax.chain(getattr(mo, name)(num_tasks=M), optax.adam(1e-2))

    def step(p, s, t):
      losses, grads, wg = mo.multi_batch_task_grads(
          _loss_fn, p, [_batch(t), _batch(t + 50), _batch(t + 100)])
      return apply(tx, p, s, grads, losses=losses, weight_grads=wg)
    return tx, step
  if name == "auto_lambda":  # meta-gradient on a validation batch
    tx = optax.chain(mo.auto_lambda(_loss_fn, num_tasks=M), optax.adam(1e-2))

    def step(p, s, t):
      losses, grads = mo.task_grads(_loss_fn, p, *_batch(t))
      return apply(tx, p, s, grads, losses=losses, val_batch=_batch(t + 200))
    return tx, step
  if name == "rotograd":  # its norm-homogenisation transform, on parameter gradients
    entry_build, extra = (lambda m: mo.rotograd(num_tasks=m)), {}
  else:
    entry = ENTRIES[name]
    entry_build, extra = entry.build, (entry.extra(M) if entry.extra is not None else {})
  tx = optax.chain(entry_build(M), optax.adam(1e-2))

  def step(p, s, t):
    losses, grads = mo.task_grads(_loss_fn, p, *_batch(t))
    return apply(tx, p, s, grads, losses=losses, **extra)
  return tx, step


SPECIAL = ("sdmgrad", "modo", "auto_lambda", "rotograd")


def _stateful(name):
  """Whether the method keeps state besides the protocol's counters and diagnostics."""
  tx = ENTRIES[name].build(3)
  state = tx.init({"w": jnp.zeros(2)})
  return bool(jax.tree_util.tree_leaves(getattr(state, "inner", state)))


def _names():
  flat = [n for n in FLAT if hasattr(mo, "flat") and hasattr(mo, n[len("flat_"):])]
  # `make test`: the methods with inner state (a stateless method's checkpoint is the
  # protocol's counters, the same code path for all); `make test-all`: every method.
  names = sorted(ENTRIES) if FULL_TESTS else [n for n in sorted(ENTRIES) if _stateful(n)]
  return names + [n for n in SPECIAL if hasattr(mo, n)] + flat


def _assert_trees_bitwise_equal(a, b, what):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb, f"{what}: structures differ:\n{ta}\n{tb}"
  for i, (x, y) in enumerate(zip(la, lb)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (what, i, x.dtype, y.dtype, x.shape, y.shape)
    assert np.array_equal(x, y, equal_nan=True), f"{what}: leaf {i} differs"


@pytest.mark.parametrize("name", _names())
def test_resume_from_orbax_checkpoint_is_bitwise_identical(name, tmp_path):
  tx, step_fn = _build(name)
  step = jax.jit(step_fn, compiler_options=FAST)  # t is traced: one compilation

  # Committed to one device like orbax's restored arrays: otherwise the resumed call
  # would compile the step a second time (committed vs uncommitted arguments).
  dev = jax.devices()[0]
  params = jax.device_put(_params(), dev)
  fresh = jax.device_put(tx.init(params), dev)
  state = fresh
  for t in range(STEPS_BEFORE):
    params, state = step(params, state, t)
  saved = {"params": params, "opt_state": state}

  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / f"ckpt_{name}"
  ckpt.save(path, saved)
  ckpt.wait_until_finished()

  # A resuming job only knows how to build the state: its template comes from init.
  template = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    {"params": _params(), "opt_state": fresh})
  restored = ckpt.restore(path, template)
  ckpt.close()
  _assert_trees_bitwise_equal(restored, saved, f"{name}: restored vs saved")

  a_params, a_state = saved["params"], saved["opt_state"]
  b_params, b_state = restored["params"], restored["opt_state"]
  for t in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
    a_params, a_state = step(a_params, a_state, t)
    b_params, b_state = step(b_params, b_state, t)
  _assert_trees_bitwise_equal((b_params, b_state), (a_params, a_state),
                              f"{name}: resumed vs uninterrupted")
  # Training really moved (the comparison is not between two frozen states).
  assert not np.array_equal(np.asarray(a_params["trunk"]), np.asarray(saved["params"]["trunk"]))
