"""The aggregator protocol: partition, state, errors, non-finite policy, chaining."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests import properties as P


def stacked(m=3, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
      "trunk": {"w": jax.random.normal(k[0], (m, 4, 3)), "b": jax.random.normal(k[1], (m, 3))},
      # Heads stored as one array with a leading head axis; row i only touches head i.
      "heads": jax.vmap(lambda i, g: jnp.zeros((m, 3)).at[i].set(g))(
          jnp.arange(m), jax.random.normal(k[2], (m, 3))),
  }


def params_like(g):
  return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), g)


HEADS_MASK = {"trunk": {"w": False, "b": False}, "heads": True}


@pytest.mark.parametrize("factory", [mo.mean, mo.mgda, mo.pcgrad, mo.cagrad, mo.imtl])
@pytest.mark.parametrize("as_callable", [False, True])
def test_heads_get_their_own_task_gradient(factory, as_callable):
  g = stacked()
  mask = (lambda path, leaf: "heads" in jax.tree_util.keystr(path)) if as_callable else HEADS_MASK
  tx = factory(task_specific=mask)
  upd, state = tx.update(g, tx.init(params_like(g)), params_like(g))
  # Gradient methods give each head its own, unweighted task gradient ...
  want_heads = g["heads"].sum(0)
  if factory is mo.mean:  # ... loss weightings weight it like a weighted loss.
    want_heads = want_heads / 3
  np.testing.assert_allclose(upd["heads"], want_heads, rtol=1e-6)
  # Shared leaves are aggregated over the trunk only (Gram of trunk rows).
  rows = np.concatenate([np.asarray(g["trunk"]["b"]).reshape(3, -1),
                         np.asarray(g["trunk"]["w"]).reshape(3, -1)], axis=1)
  np.testing.assert_allclose(mo.diagnostics(state)["gram"], rows @ rows.T, rtol=1e-5)
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(upd["trunk"]["w"], np.tensordot(w, g["trunk"]["w"], 1), rtol=1e-5,
                             atol=1e-6)


def test_weight_heads_switch():
  g = stacked()
  tx = mo.mgda(task_specific=HEADS_MASK, weight_heads=True)
  upd, state = tx.update(g, tx.init(params_like(g)), params_like(g))
  w = np.asarray(mo.task_weights(state))
  np.testing.assert_allclose(upd["heads"], np.tensordot(w, g["heads"], 1), rtol=1e-6)


def test_chain_with_adam_under_jit_and_state_is_fixed():
  g = stacked()
  params = params_like(g)
  tx = optax.chain(mo.cagrad(num_tasks=3, task_specific=HEADS_MASK), optax.adam(1e-2))
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  structure = jax.tree.structure(state)
  shapes = jax.tree.map(jnp.shape, state)
  for i in range(3):
    upd, state = step(stacked(seed=i), state, params)
    params = optax.apply_updates(params, upd)
  assert jax.tree.structure(state) == structure and jax.tree.map(jnp.shape, state) == shapes
  assert step._cache_size() == 1  # no recompilation across steps
  assert mo.task_weights(state).shape == (3,)
  assert set(mo.diagnostics(state)) >= {"weights", "gram", "cosines", "norms", "conflicts",
                                        "nonfinite_tasks", "residual"}


def test_num_tasks_none_fills_diagnostics_on_first_update():
  tx = mo.mgda()
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="no task weights"):
    mo.task_weights(state)
  _, state = tx.update({"w": jnp.ones((2, 3))}, state)
  assert mo.task_weights(state).shape == (2,)


# --- errors ------------------------------------------------------------------------

def test_clear_errors():
  tx = mo.mgda()
  s = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="inconsistent task axis"):
    tx.update({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, s)
  with pytest.raises(ValueError, match="scalar"):
    tx.update({"a": jnp.ones(()), "b": jnp.ones((3, 3))}, s)
  with pytest.raises(ValueError, match="num_tasks=4"):
    t4 = mo.mean(num_tasks=4)
    t4.update({"w": jnp.ones((3, 3))}, t4.init({"w": jnp.zeros(3)}))
  with pytest.raises(ValueError, match="losses must have shape"):
    tx.update({"w": jnp.ones((2, 3))}, s, losses=jnp.ones(3))
  with pytest.raises(ValueError, match="losses="):
    mo.mgda("loss").update({"w": jnp.ones((2, 3))}, s)
  with pytest.raises(ValueError, match="task_specific mask"):
    mo.mean(task_specific={"x": True}).update({"w": jnp.ones((2, 3))}, s)
  with pytest.raises(ValueError, match="every leaf is marked task-specific"):
    mo.mean(task_specific={"w": True}).update({"w": jnp.ones((2, 3))}, s)
  with pytest.raises(ValueError, match="nonfinite"):
    mo.mean(nonfinite="ignore")
  with pytest.raises(ValueError, match="num_tasks"):
    mo.mean(num_tasks=0)
  with pytest.raises(ValueError, match="2 tasks|m=2"):
    P.aggregate(mo.linear_scalarization([1.0, 2.0, 3.0]), np.ones((2, 3)))
  with pytest.raises(TypeError, match="not an mtl_optax aggregator"):
    mo.aggregator_info(optax.adam(1.0))


# --- non-finite policy -------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_skip_and_zero_task(bad):
  j = P.normal_matrix(3, 4, seed=1)
  j_bad = j.copy()
  j_bad[1, 2] = bad
  d, state = P.aggregate(mo.mgda(), j_bad)
  np.testing.assert_array_equal(d, 0.0)
  assert int(mo.diagnostics(state)["nonfinite_tasks"]) == 1
  d, state = P.aggregate(mo.mean(nonfinite="zero_task"), j_bad)
  np.testing.assert_allclose(d, (j[0] + j[2]) / 3, rtol=1e-6)
  assert int(mo.diagnostics(state)["nonfinite_tasks"]) == 1
  losses = np.array([1.0, bad, 2.0])
  d, state = P.aggregate(mo.mgda("loss", nonfinite="zero_task"), j, losses)
  assert np.all(np.isfinite(d)) and int(mo.diagnostics(state)["nonfinite_tasks"]) == 1


def test_skip_policy_keeps_inner_state():
  tx = mo.pcgrad(num_tasks=3)
  params = {"w": jnp.zeros(4)}
  s0 = tx.init(params)
  j = jnp.asarray(P.normal_matrix(3, 4)).at[0, 0].set(jnp.nan)
  _, s1 = tx.update({"w": j}, s0, params)
  np.testing.assert_array_equal(s1.inner, s0.inner)
  _, s2 = tx.update({"w": jnp.nan_to_num(j)}, s0, params)
  assert not np.array_equal(s2.inner, s0.inner)


def test_bfloat16_gradients_use_float32_gram():
  j = P.normal_matrix(3, 50, seed=2)
  d, state = P.aggregate(mo.mgda(), j, dtype=jnp.bfloat16)
  assert mo.diagnostics(state)["gram"].dtype == jnp.float32
  d32, _ = P.aggregate(mo.mgda(), j.astype(np.float32))
  np.testing.assert_allclose(d, d32, rtol=5e-2, atol=5e-2)


_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

# One per place with a loop or branch traced at each call: the base step's lax.cond,
# the active-set QP, Frank–Wolfe, and the methods' own loops.
_EAGER_CASES = {
    "mean": lambda: mo.mean(),
    "mgda": lambda: mo.mgda(),
    "nash_mtl_every_2": lambda: mo.nash_mtl(update_weights_every=2, num_tasks=3),
    "cagrad": lambda: mo.cagrad(num_tasks=3),
    "conicgrad": lambda: mo.conicgrad(num_tasks=3),
    "pcgrad": lambda: mo.pcgrad(),
    "gradvac": lambda: mo.gradvac(num_tasks=3),
    "cdtt": lambda: mo.cdtt(num_tasks=3),
    "rlw_bernoulli": lambda: mo.random_loss_weighting("bernoulli"),
}


@pytest.mark.parametrize("name", sorted(_EAGER_CASES))
def test_eager_updates_compile_at_the_first_call_only(name):
  """Outside jit, the second and third updates lower no program (nothing is recompiled).

  Loops and branches built from closures at each call (lax.cond, while_loop,
  fori_loop) would be traced, lowered and compiled again at every eager step;
  the library keeps them in jitted functions, compiled once per shapes.
  """
  lowered = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _LOWERING_EVENT:
      lowered.append(event)

  tx = _EAGER_CASES[name]()
  params = params_like(stacked())
  state = tx.init(params)
  losses = jnp.asarray([1.0, 2.0, 0.5])
  upd, state = tx.update(stacked(seed=0), state, params, losses=losses)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for seed in (1, 2):
      upd, state = tx.update(stacked(seed=seed), state, params, losses=losses)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert np.all(np.isfinite(np.asarray(upd["trunk"]["w"])))
  assert not lowered, f"{name}: eager updates lowered {len(lowered)} programs after the first"
