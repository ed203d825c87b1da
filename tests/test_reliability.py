"""Adversarial inputs for every method: finite, well-structured outputs (hypothesis).

Cases: m ∈ {1, 2, 3, 5, 16, 64}; zero, duplicated, collinear, exactly opposite rows;
rank-deficient matrices; per-row scales from 1e-30 to 1e30; float32, bfloat16 and
float64 inputs; positive losses over six orders of magnitude. Shapes come from a
small set so that each (method, shape, dtype) compiles once; hypothesis varies
the values. Profiles: HYPOTHESIS_PROFILE=ci (default, CI budget) or =long.
"""

import functools
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import mtl_optax as mo
from tests.registry import ENTRIES, NOT_GENERIC

N = 6
TASK_COUNTS = (1, 2, 3, 5, 16, 64)
EXAMPLES = {"ci": 25, "long": 500}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]


@functools.lru_cache(maxsize=None)
def compiled(name, m, dtype_name):
  """One transformation and one jitted update per (method, m, dtype)."""
  tx = ENTRIES[name].build(m)
  dtype = jnp.dtype(dtype_name)
  params = {"w": jnp.zeros((N,), dtype)}
  state = tx.init(params)
  fn = jax.jit(lambda g, s, p, l: tx.update(g, s, p, losses=l))
  return fn, state, params


@st.composite
def jacobians(draw, min_tasks=1):
  m = draw(st.sampled_from([m for m in TASK_COUNTS if m >= min_tasks]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  rank = draw(st.integers(1, min(m, N)))
  j = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, N))
  kinds = draw(st.lists(st.sampled_from(["zero", "duplicate", "opposite", "collinear"]),
                        max_size=3))
  for kind in kinds:
    if m < 2:
      break
    a, b = rng.choice(m, size=2, replace=False)
    if kind == "zero":
      j[a] = 0.0
    elif kind == "duplicate":
      j[a] = j[b]
    elif kind == "opposite":
      j[a] = -j[b]
    else:
      j[a] = rng.uniform(0.1, 10.0) * j[b]
  log_scales = draw(st.lists(st.floats(-30, 30), min_size=m, max_size=m))
  if draw(st.booleans()):  # one common scale (exercises the overflow guard)
    log_scales = [log_scales[0]] * m
  j = j * (10.0 ** np.asarray(log_scales))[:, None]
  losses = 10.0 ** rng.uniform(-3, 3, size=m)
  return j, losses


def check_case(name, j, losses, dtype_name):
  entry = ENTRIES[name]
  m = j.shape[0]
  fn, state, params = compiled(name, m, dtype_name)
  jd = jnp.asarray(j, dtype_name)
  upd, new_state = fn({"w": jd}, state, params, jnp.asarray(losses, jnp.float32))
  d = np.asarray(upd["w"], np.float64)
  assert d.shape == (N,)
  assert np.all(np.isfinite(d)), (name, d)
  for k, v in mo.diagnostics(new_state).items():
    if k != "gram":  # the true Gram matrix may overflow for 1e30 gradients (documented)
      assert np.all(np.isfinite(np.asarray(v, np.float64))), (name, k, v)
  jq = np.asarray(jd.astype(jnp.float32), np.float64)  # the rows the method actually saw
  if entry.non_conflicting and dtype_name != "bfloat16":
    # g_i·d ≥ 0 up to what a Gram-based solver can resolve: its weights are exact
    # for a Gram matrix perturbed by ~m·eps·max‖g‖², so at a Pareto-stationary
    # point ‖d‖ ~ sqrt(m·eps)·max‖g‖ is noise. Checked on unit rows (J d ≥ 0 is
    # invariant to positive row scales).
    norms = np.linalg.norm(jq, axis=1)
    unit = jq / np.where(norms > 0, norms, 1.0)[:, None]
    w = np.asarray(mo.task_weights(new_state), np.float64)
    eps = np.finfo(np.float32 if dtype_name == "float32" else np.float64).eps
    noise = 10 * np.sqrt(m * eps) * entry.solver_row_scale(norms, losses) * max(np.sum(np.abs(w)), 1.0)
    assert np.all(unit @ d >= -(1e-4 * np.linalg.norm(d) + noise)), (name, unit @ d, noise)


@pytest.mark.parametrize("name", sorted(ENTRIES))
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_adversarial_inputs(name, dtype_name):
  @settings(max_examples=EXAMPLES)
  @given(jacobians(ENTRIES[name].min_tasks))
  def run(case):
    check_case(name, case[0], case[1], dtype_name)
  run()


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_adversarial_inputs_float64(name, x64):
  @settings(max_examples=max(EXAMPLES // 3, 4))
  @given(jacobians(ENTRIES[name].min_tasks))
  def run(case):
    check_case(name, case[0], case[1], "float64")
  run()


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_single_task_reduces_to_a_multiple_of_the_gradient(name):
  if ENTRIES[name].min_tasks > 1:
    with pytest.raises(ValueError, match="tasks"):
      compiled(name, 1, "float32")[0]({"w": jnp.ones((1, N))}, None, None, None)
    return
  g = np.array([[1.0, -2.0, 0.5, 0.0, 3.0, -1.0]])
  fn, state, params = compiled(name, 1, "float32")
  upd, _ = fn({"w": jnp.asarray(g, jnp.float32)}, state, params, jnp.ones((1,), jnp.float32))
  d = np.asarray(upd["w"], np.float64)
  coef = d @ g[0] / (g[0] @ g[0])
  np.testing.assert_allclose(d, coef * g[0], rtol=1e-5, atol=1e-6)
  assert coef >= 0


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_deterministic_and_no_recompilation(name):
  tx = ENTRIES[name].build(3)
  params = {"w": jnp.zeros((N,))}
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  rng = np.random.default_rng(0)
  runs = []
  for _ in range(2):
    state = tx.init(params)
    outs = []
    for _ in range(4):
      upd, state = step({"w": jnp.asarray(rng.standard_normal((3, N)), jnp.float32)}, state,
                        jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32))
      outs.append(np.asarray(upd["w"]))
    runs.append(outs)
    rng = np.random.default_rng(0)
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)  # bit-identical
  assert step._cache_size() == 1


def test_registry_is_complete():
  """Every public factory returning an aggregator is covered by the generic suites."""
  missing = []
  for name in dir(mo):
    obj = getattr(mo, name)
    if name.startswith("_") or not inspect.isfunction(obj) or name in NOT_GENERIC:
      continue
    if name in ("task_grads", "representation_grads", "representation_update", "diagnostics",
                "task_weights", "aggregator_info", "make_aggregator", "make_train_step",
                "make_nnx_train_step", "sharpness_aware_task_grads"):
      continue
    try:
      tx = obj(num_tasks=5)
    except TypeError:
      continue  # not a factory with the aggregator signature
    if isinstance(tx, optax.GradientTransformation) and name not in ENTRIES:
      missing.append(name)
  assert not missing, f"add these methods to tests/registry.py: {missing}"
