"""Shared input families and property asserts for aggregators (after TorchJD's tests).

Every aggregator test lists which properties apply to its method (methods.md §D):

    from tests import properties as P

    @pytest.mark.parametrize("matrix", P.typical_matrices())
    def test_structure(matrix):
      P.assert_structure(mo.upgrad(), matrix)

An aggregator is applied to a matrix J (m × n) as the stacked pytree ``{"w": J}``;
the result is the aggregated vector d (n,).
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

import mtl_optax as mo

SCALES = (0.0, 1e-10, 1e3, 1e5, 1e10, 1e15)


# ---------------------------------------------------------------------------
# Input families (NumPy float64; cast by the test as needed).
# ---------------------------------------------------------------------------

def normal_matrix(m: int, n: int, rank: int | None = None, seed: int = 0) -> np.ndarray:
  """Gaussian m × n matrix of the given rank (full rank by default)."""
  rng = np.random.default_rng(seed)
  rank = min(m, n) if rank is None else rank
  if rank == 0:
    return np.zeros((m, n))
  return rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))


def strong_stationary_matrix(m: int, n: int, seed: int = 0) -> np.ndarray:
  """Rows whose convex hull contains 0 in its relative interior (m > 1)."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m - 1, n))
  w = rng.uniform(0.5, 1.5, size=m - 1)
  last = -(w @ a)
  return np.vstack([a, last[None]])


def weak_stationary_matrix(m: int, n: int, seed: int = 0) -> np.ndarray:
  """Rows with 0 on the boundary of their convex hull (a zero row included)."""
  a = normal_matrix(m - 1, n, seed=seed)
  return np.vstack([a, np.zeros((1, n))])


def typical_matrices():
  """(name, J) pairs: full rank, rank-deficient, m > n, zero, stationary.

  Four shapes (n = 6, m ∈ {2, 3, 5, 7}), so a method compiles four programs for
  the nine cases; (3, 6) is also the shape of :func:`scaled_matrices`.
  """
  return [
      ("normal_2x6", normal_matrix(2, 6, seed=1)),
      ("normal_3x6", normal_matrix(3, 6, seed=2)),
      ("normal_5x6", normal_matrix(5, 6, seed=3)),
      ("rank1_5x6", normal_matrix(5, 6, rank=1, seed=4)),
      ("rank2_5x6", normal_matrix(5, 6, rank=2, seed=5)),
      ("wide_m_gt_n_7x6", normal_matrix(7, 6, seed=6)),
      ("zero_3x6", np.zeros((3, 6))),
      ("strong_stationary_5x6", strong_stationary_matrix(5, 6, seed=7)),
      ("weak_stationary_3x6", weak_stationary_matrix(3, 6, seed=8)),
  ]


def scaled_matrices(base: np.ndarray | None = None):
  """(name, J) pairs: one matrix multiplied by each of SCALES."""
  base = normal_matrix(3, 6, seed=11) if base is None else base
  return [(f"scaled_{s:g}", base * s) for s in SCALES]


def ids(cases):
  return [name for name, _ in cases]


# ---------------------------------------------------------------------------
# Applying an aggregator.
# ---------------------------------------------------------------------------

def losses_for(m: int, seed: int = 0) -> np.ndarray:
  """Positive task losses for loss-based methods."""
  return np.random.default_rng(seed).uniform(0.5, 2.0, size=m)


def aggregate(tx, matrix, losses=None, jit: bool = True, dtype=None, **extra):
  """Applies ``tx`` once to ``{"w": matrix}``; returns (d, state)."""
  matrix = jnp.asarray(matrix, dtype=dtype)
  params = {"w": jnp.zeros(matrix.shape[1:], matrix.dtype)}
  state = tx.init(params)
  kwargs = dict(extra)
  if losses is not None:
    kwargs["losses"] = jnp.asarray(losses, matrix.dtype if dtype is None else dtype)

  fn = _jitted(tx) if jit else (lambda g, s, p, kw: tx.update(g, s, p, **kw))
  update, state = fn({"w": matrix}, state, params, kwargs)
  return np.asarray(update["w"], dtype=np.float64), state


_JITTED = weakref.WeakKeyDictionary()


def _jitted(tx):
  """One jitted update per transformation, so repeated shapes compile once.

  Reuse transformation instances across cases of the same shape to benefit.
  """
  if tx.update not in _JITTED:
    _JITTED[tx.update] = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
  return _JITTED[tx.update]


def _tol(matrix, rtol, atol):
  scale = float(np.max(np.abs(matrix))) if np.size(matrix) else 1.0
  return atol + rtol * scale


# ---------------------------------------------------------------------------
# Asserts.
# ---------------------------------------------------------------------------

def assert_structure(tx, matrix, losses=None, **kw):
  """Output has the shape of one row and is finite."""
  d, state = aggregate(tx, matrix, losses, **kw)
  assert d.shape == np.shape(matrix)[1:], (d.shape, np.shape(matrix))
  assert np.all(np.isfinite(d)), d
  for k, v in mo.diagnostics(state).items():
    if k != "gram":  # the true Gram matrix may overflow for huge inputs (documented).
      assert np.all(np.isfinite(np.asarray(v, dtype=np.float64))), (k, v)
  return d


def assert_non_conflicting(tx, matrix, losses=None, rtol=1e-5, atol=1e-8, **kw):
  """J d ≥ 0 (no task's loss increases to first order)."""
  d, _ = aggregate(tx, matrix, losses, **kw)
  jd = np.asarray(matrix, np.float64) @ d
  scale = _tol(matrix, rtol, atol) * max(np.max(np.abs(d)), 1.0) * np.shape(matrix)[1]
  assert np.all(jd >= -scale), jd


def assert_permutation_invariant(tx, matrix, losses=None, rtol=1e-5, atol=1e-7, seed=0, **kw):
  """Permuting the tasks (rows, and losses) leaves the update unchanged."""
  m = np.shape(matrix)[0]
  perm = np.random.default_rng(seed).permutation(m)
  d, _ = aggregate(tx, matrix, losses, **kw)
  d_perm, _ = aggregate(tx, np.asarray(matrix)[perm],
                        None if losses is None else np.asarray(losses)[perm], **kw)
  np.testing.assert_allclose(d_perm, d, rtol=rtol, atol=_tol(d, rtol, atol))


def assert_linear_under_scaling(tx, matrix, rtol=1e-5, atol=1e-7, seed=0, **kw):
  """A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J) for c ≥ 0."""
  rng = np.random.default_rng(seed)
  m = np.shape(matrix)[0]
  c1, c2 = rng.uniform(0.1, 2.0, m), rng.uniform(0.1, 2.0, m)
  a, b = rng.uniform(0.1, 2.0, 2)
  matrix = np.asarray(matrix, np.float64)
  d1, _ = aggregate(tx, c1[:, None] * matrix, **kw)
  d2, _ = aggregate(tx, c2[:, None] * matrix, **kw)
  d, _ = aggregate(tx, (a * c1 + b * c2)[:, None] * matrix, **kw)
  expected = a * d1 + b * d2
  np.testing.assert_allclose(d, expected, rtol=rtol, atol=_tol(expected, rtol, atol))


def assert_weighted(tx, matrix, losses=None, rtol=1e-5, atol=1e-7, **kw):
  """d = Jᵀw with the weights exposed by ``mo.task_weights``."""
  d, state = aggregate(tx, matrix, losses, **kw)
  w = np.asarray(mo.task_weights(state), np.float64)
  expected = np.asarray(matrix, np.float64).T @ w
  np.testing.assert_allclose(d, expected, rtol=rtol, atol=_tol(expected, rtol, atol))
  return w


def assert_jit_equal(tx, matrix, losses=None, rtol=1e-6, atol=1e-7, **kw):
  """The jitted and the eager update agree."""
  d_jit, _ = aggregate(tx, matrix, losses, jit=True, **kw)
  d_eager, _ = aggregate(tx, matrix, losses, jit=False, **kw)
  np.testing.assert_allclose(d_jit, d_eager, rtol=rtol, atol=_tol(d_eager, rtol, atol))
