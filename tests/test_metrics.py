"""Tests of mtl_optax.metrics against hand-computed values."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import mtl_optax as mo
from mtl_optax import metrics


# --- delta_m -------------------------------------------------------------------

def test_delta_m_hand_computed_one_metric_per_task():
  # CL accuracy 0.95 vs 0.96 (higher better): (0.95-0.96)/0.96 = -1.0417%
  # RR mse 0.012 vs 0.010 (lower better): -(0.012-0.010)/0.010 = -20%
  got, per = metrics.delta_m({"CL": 0.95, "RR": 0.012}, {"CL": 0.96, "RR": 0.010},
                             {"CL": False, "RR": True}, per_task=True)
  np.testing.assert_allclose(per["CL"], -100 * 0.01 / 0.96, rtol=1e-12)
  np.testing.assert_allclose(per["RR"], -20.0, rtol=1e-12)
  np.testing.assert_allclose(got, (-100 * 0.01 / 0.96 - 20.0) / 2, rtol=1e-12)


def test_delta_m_several_metrics_per_task_averaged_within_task():
  # Task A: two metrics (+10% and -30%) → -10%; task B: one metric +20% → mean 5%.
  values = {"A": {"acc": 0.55, "err": 1.3}, "B": {"mse": 0.8}}
  base = {"A": {"acc": 0.5, "err": 1.0}, "B": {"mse": 1.0}}
  lib = {"acc": False, "err": True, "mse": True}
  got, per = metrics.delta_m(values, base, lib, per_task=True)
  np.testing.assert_allclose(per["A"], -10.0, rtol=1e-12)
  np.testing.assert_allclose(per["B"], 20.0, rtol=1e-12)
  np.testing.assert_allclose(got, 5.0, rtol=1e-12)
  # Nested direction spec gives the same.
  lib2 = {"A": {"acc": False, "err": True}, "B": {"mse": True}}
  np.testing.assert_allclose(metrics.delta_m(values, base, lib2), 5.0, rtol=1e-12)


def test_delta_m_sequences_and_zero_at_baseline():
  np.testing.assert_allclose(metrics.delta_m([0.9, 0.1], [0.9, 0.1], [False, True]), 0.0)
  # Lower-is-better for everything: 10% worse and 10% better cancel.
  np.testing.assert_allclose(metrics.delta_m([1.1, 0.9], [1.0, 1.0], True), 0.0, atol=1e-12)
  np.testing.assert_allclose(metrics.delta_m([1.1, 1.1], [1.0, 1.0], False), 10.0, rtol=1e-12)


def test_delta_m_errors():
  with pytest.raises(ValueError, match="no baseline"):
    metrics.delta_m({"A": 1.0}, {"B": 1.0}, True)
  with pytest.raises(ValueError, match="non-zero"):
    metrics.delta_m({"A": 1.0}, {"A": 0.0}, True)
  with pytest.raises(KeyError):
    metrics.delta_m({"A": {"x": 1.0}}, {"A": {"x": 2.0}}, {"y": True})


# --- mean_rank / spearman --------------------------------------------------------

def test_mean_rank_hand_computed_with_ties():
  table = {
      "a": {"CL": {"acc": 0.9}, "RR": {"mse": 0.10}},
      "b": {"CL": {"acc": 0.8}, "RR": {"mse": 0.05}},
      "c": {"CL": {"acc": 0.9}, "RR": {"mse": 0.20}},
  }
  # acc (higher better): a, c tie for 1st → 1.5, b → 3. mse: b 1, a 2, c 3.
  got = metrics.mean_rank(table, {"acc": False, "mse": True})
  assert got == pytest.approx({"a": (1.5 + 2) / 2, "b": (3 + 1) / 2, "c": (1.5 + 3) / 2})


def test_mean_rank_rejects_mismatched_rows():
  with pytest.raises(ValueError, match="reports metrics"):
    metrics.mean_rank({"a": {"x": 1.0}, "b": {"y": 1.0}}, True)


def test_spearman_matches_scipy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=12)
  y = x + rng.normal(size=12)
  y[3] = y[5]  # a tie
  np.testing.assert_allclose(metrics.spearman(x, y), scipy.stats.spearmanr(x, y)[0], rtol=1e-12)
  assert metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# --- interference ----------------------------------------------------------------

def _np_interference(rows):
  mean = rows.mean(axis=0)
  cos = rows @ mean / (np.linalg.norm(rows, axis=1) * np.linalg.norm(mean))
  return cos.mean()


class InterferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_computed(self):
    fn = self.variant(metrics.interference)
    # g1 = (1, 0), g2 = (0, 1): mean (0.5, 0.5), both cosines 1/√2.
    np.testing.assert_allclose(fn({"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}),
                               1 / np.sqrt(2), rtol=1e-6)
    # g1 = (2, 0), g2 = (-1, 0): mean (0.5, 0), cosines +1 and -1 → 0.
    np.testing.assert_allclose(fn({"w": jnp.array([[2.0, 0.0], [-1.0, 0.0]])}), 0.0, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pytree_heads_excluded_and_scale_robust(self):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 4, 2)).astype(np.float32)
    b = rng.normal(size=(3, 5)).astype(np.float32)
    heads = rng.normal(size=(3, 7)).astype(np.float32)
    grads = {"enc": {"a": jnp.asarray(a), "b": jnp.asarray(b)}, "head": jnp.asarray(heads)}
    mask = {"enc": {"a": False, "b": False}, "head": True}
    fn = self.variant(lambda g: metrics.interference(g, task_specific=mask))
    rows = np.concatenate([a.reshape(3, -1), b], axis=1).astype(np.float64)
    want = _np_interference(rows)
    np.testing.assert_allclose(fn(grads), want, rtol=1e-5)
    # Callable partition gives the same value.
    got = metrics.interference(
        grads, task_specific=lambda path, leaf: "head" in jax.tree_util.keystr(path))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Invariant to a common scale, finite for huge/tiny gradients.
    for s in (1e-20, 1e20):
      scaled = jax.tree_util.tree_map(lambda x, s=s: x * s, grads)
      np.testing.assert_allclose(fn(scaled), want, rtol=1e-4)
    # From the Gram matrix: same value.
    np.testing.assert_allclose(metrics.interference_from_gram(jnp.asarray(rows @ rows.T)),
                               want, rtol=1e-6)


def test_interference_zero_gradient_is_finite():
  g = {"w": jnp.zeros((2, 3))}
  assert np.isfinite(float(metrics.interference(g)))
  with pytest.raises(ValueError, match="task-specific"):
    metrics.interference(g, task_specific={"w": True})


# --- fixed_weights ---------------------------------------------------------------

def test_fixed_weights_hand_computed():
  hist = np.array([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
  # v1 = (0.2, 0.8); v2 = 0.9 v1 + 0.1 (0.4, 0.6) = (0.22, 0.78);
  # v3 = 0.9 v2 + 0.1 (0.6, 0.4) = (0.258, 0.742).
  np.testing.assert_allclose(metrics.fixed_weights(hist), [0.258, 0.742], rtol=1e-12)
  # Per-step history (E, S, m) is averaged within each epoch first.
  steps = np.stack([hist - 0.1, hist + 0.1], axis=1)
  np.testing.assert_allclose(metrics.fixed_weights(steps), [0.258, 0.742], rtol=1e-12)
  # Ragged list of epochs.
  ragged = [np.array([[0.1, 0.9], [0.3, 0.7]]), np.array([[0.4, 0.6]]), np.array([[0.6, 0.4]] * 3)]
  np.testing.assert_allclose(metrics.fixed_weights(ragged), [0.258, 0.742], rtol=1e-12)
  np.testing.assert_allclose(metrics.fixed_weights(hist * 3, normalize=True), [0.258, 0.742],
                             rtol=1e-12)
  with pytest.raises(ValueError, match="beta"):
    metrics.fixed_weights(hist, beta=1.0)


def test_public_names():
  assert mo.metrics.delta_m is metrics.delta_m
  for name in ("delta_m", "mean_rank", "interference", "fixed_weights", "spearman"):
    assert callable(getattr(mo.metrics, name))
