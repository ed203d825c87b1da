"""Adversarial inputs for every method: the generators and checks (hypothesis).

Used by test_reliability.py (float32, plus m = 1, determinism, registry),
test_reliability_bfloat16.py and test_reliability_float64.py: three files so
that pytest-xdist (``--dist loadfile``) spreads the suite's largest part over
both workers.

Cases: m ∈ {1, 2, 3, 5, 16, 64}; zero, duplicated, collinear, exactly opposite rows;
rank-deficient matrices; per-row scales from 1e-30 to 1e30; float32, bfloat16 and
float64 inputs; positive losses over six orders of magnitude. Shapes come from a
small set so that each (method, shape, dtype) compiles once (compilation is
most of the suite's time, so the counts are split between the dtypes: float32
{1, 2, 5, 16, 64}, bfloat16 {3, 64}, float64 {2, 16, 64}); hypothesis varies
the values. Profiles: HYPOTHESIS_PROFILE=ci (default, CI budget) or =long.
`make test` uses fewer task counts (TASK_COUNTS below), `make test-all` all of them.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import mtl_optax as mo
from tests.registry import ENTRIES, FULL_TESTS
from tests.resources import release_if_many_mappings

N = 6
# `make test`: one small, one odd and one large m per method (m = 1 has its own
# tests in test_reliability.py); `make test-all`: every count below.
TASK_COUNTS = ({"float32": (1, 2, 5, 16, 64), "bfloat16": (3, 64), "float64": (2, 16, 64)}
               if FULL_TESTS else {"float32": (2, 16), "bfloat16": (3,), "float64": (5,)})
EXAMPLES = {"ci": 25, "long": 500}[os.environ.get("HYPOTHESIS_PROFILE", "ci")]
EXAMPLES_F64 = max(EXAMPLES // 2 + 1, 4)


@functools.lru_cache(maxsize=None)
def compiled(name, m, dtype_name):
  """One transformation and one jitted update per (method, m, dtype)."""
  tx = ENTRIES[name].build(m)
  dtype = jnp.dtype(dtype_name)
  params = {"w": jnp.zeros((N,), dtype)}
  state = tx.init(params)
  fn = jax.jit(lambda g, s, p, l: tx.update(g, s, p, losses=l))
  return fn, state, params


@pytest.fixture
def release_compiled_programs():
  """Each test compiles up to six programs that no other test reuses: they are
  freed when the worker holds many (tests/resources.py). Test modules use it
  with ``pytest.mark.usefixtures``."""
  yield
  if release_if_many_mappings():
    compiled.cache_clear()


@st.composite
def jacobians(draw, min_tasks=1, dtype_name="float32"):
  m = draw(st.sampled_from([m for m in TASK_COUNTS[dtype_name] if m >= min_tasks]))
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


