"""Calibration of classifiers from logits: ECE, Brier score, NLL, entropy, reliability.

The measurements of the FS-MTL calibration study (Phan et al., ICCV 2025,
``multi-mnist/predictive_entropy.py`` and ``reliability_diagrams.py``), pure
JAX and jit-able. Every function takes

* ``logits``: ``(..., N, K)`` unnormalised class scores (softmax gives p),
* ``labels``: ``(..., N)`` integer classes in ``[0, K)``,
* ``weights``: optional ``(..., N)`` non-negative example weights (a 0/1
  mask for padded batches; default all 1),

and reduces over the example axis N. Leading axes (e.g. a task axis of
identically-shaped heads, ``(m, N, K)``) are kept: the result has shape
``(...)``. Heads with different class counts are measured one at a time.

Probabilities are computed with ``log_softmax`` in float32 or better (float64
stays float64), so finite logits of any magnitude give finite results (no
overflow in ``exp``). A logit of −inf is a class of probability 0; a logit of
+inf or NaN is not hidden: it yields NaN. A label
outside ``[0, K)`` cannot be detected under ``jit``; it counts as a wrong
prediction, with a one-hot target of zeros in the Brier score and the NLL of
the nearest class (``take_along_axis`` clamps).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_optax._src import linalg

Array = jax.Array

REDUCTIONS = ("mean", "none")


class ReliabilityDiagram(NamedTuple):
  """Per-bin statistics of a reliability diagram (all ``(..., num_bins)``).

  Attributes:
    confidence: mean max-probability of the examples in each bin (0 if empty).
    accuracy: fraction of correct predictions in each bin (0 if empty).
    count: (weighted) number of examples in each bin; int32 without weights.
    edges: the ``num_bins + 1`` bin edges ``0, 1/B, ..., 1`` (bin b is
      ``(edges[b], edges[b + 1]]``; bin 0 also takes a confidence of 0).
  """
  confidence: Array
  accuracy: Array
  count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count
  edges: Array


def _check_inputs(where: str, logits, labels, weights):
  """Validates shapes/dtypes at trace time; returns logits (float32 or wider), labels, weights."""
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim < 2:
    raise ValueError(f"{where}: logits must have shape (..., N, K) (examples, classes), "
                     f"got {logits.shape}.")
  if logits.shape[-1] < 1 or logits.shape[-2] < 1:
    raise ValueError(f"{where}: need at least one example and one class, got logits of "
                     f"shape {logits.shape}.")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"{where}: logits must be floating, got {logits.dtype}.")
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"{where}: labels must have shape {logits.shape[:-1]} (logits without "
                     f"the class axis), got {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{where}: labels must be integer class indices, got {labels.dtype}.")
  acc = linalg.accumulation_dtype(logits.dtype)
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != labels.shape:
      raise ValueError(f"{where}: weights must have the shape of labels {labels.shape}, "
                       f"got {weights.shape}.")
    weights = weights.astype(acc)
  return logits.astype(acc), labels, weights


# The measures are usually called eagerly on a whole evaluation set; one compiled
# program per measure (instead of op-by-op dispatch) keeps that fast. Inside a
# user's jit these nested jits are simply inlined.
@functools.partial(jax.jit, static_argnames="name")
def _per_example(logits, labels, name):
  """Per-example Brier score, NLL or entropy, ``(..., N)``."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  if name == "nll":
    return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  p = jnp.exp(log_p)
  if name == "brier":
    onehot = jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype)
    return jnp.sum((p - onehot) ** 2, axis=-1)
  # p = 0 (a −inf logit, or underflow) contributes 0, not 0 · (−inf).
  return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


@jax.jit
def _reduce_mean(values, weights):
  if weights is None:
    return jnp.mean(values, axis=-1)
  # An all-zero mask gives 0, not 0/0.
  return linalg.safe_div(jnp.sum(weights * values, axis=-1), jnp.sum(weights, axis=-1))


@functools.partial(jax.jit, static_argnames="num_bins")
def _binned(logits, labels, weights, num_bins):
  """Per-bin (weighted) counts, confidence sums and correct sums, and the edges."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  conf = jnp.exp(jnp.max(log_p, axis=-1))
  correct = (jnp.argmax(log_p, axis=-1) == labels).astype(conf.dtype)
  edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=conf.dtype)
  # side="left" puts c in (edges[b], edges[b+1]] exactly as np.digitize(right=True),
  # comparing with the edges themselves rather than rounding c * B.
  idx = jnp.clip(jnp.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
  member = (idx[..., None] == jnp.arange(num_bins)).astype(conf.dtype)  # (..., N, B)
  if weights is not None:
    member = member * weights[..., None]
  count = jnp.sum(member, axis=-2)
  conf_sum = jnp.einsum("...nb,...n->...b", member, conf)
  correct_sum = jnp.einsum("...nb,...n->...b", member, correct)
  return count, conf_sum, correct_sum, edges


def _check_reduction(where, reduction, weights):
  if reduction not in REDUCTIONS:
    raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  if reduction == "none" and weights is not None:
    raise ValueError(f"{where}: weights apply to the mean; with reduction='none' the "
                     "per-example values are returned, select the examples you need.")


def _measure(where, name, logits, labels, weights, reduction):
  _check_reduction(where, reduction, weights)
  logits, labels, weights = _check_inputs(where, logits, labels, weights)
  values = _per_example(logits, labels, name)
  return values if reduction == "none" else _reduce_mean(values, weights)


def _num_bins(where, num_bins):
  if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
    raise ValueError(f"{where}: num_bins must be a positive int, got {num_bins!r}.")
  return num_bins


def reliability_diagram(logits, labels, num_bins: int = 10, *,
                        weights: Optional[Array] = None) -> ReliabilityDiagram:
  """Per-bin confidence, accuracy and count of the top-class predictions.

  With confidence c_n = max_k softmax(logits_n)_k, prediction ŷ_n = argmax_k,
  and B equal-width bins I_b = (b/B, (b+1)/B] (as ``np.digitize(c, edges,
  right=True)`` in the FS-MTL code; a confidence of exactly 1 falls in the
  last bin),

      count_b = Σ_{n: c_n ∈ I_b} w_n,
      conf_b  = Σ_{n ∈ I_b} w_n c_n / count_b,
      acc_b   = Σ_{n ∈ I_b} w_n 1[ŷ_n = y_n] / count_b,

  with conf_b = acc_b = 0 for an empty bin (no NaN; use ``count`` to mask it
  when plotting). A perfectly calibrated model has acc_b = conf_b.

  Args:
    logits: ``(..., N, K)`` logits.
    labels: ``(..., N)`` integer labels.
    num_bins: B, the number of equal-width confidence bins (default 10).
    weights: optional ``(..., N)`` non-negative example weights / 0-1 mask.

  Returns:
    A :class:`ReliabilityDiagram` of ``(..., B)`` arrays and the ``(B + 1,)`` edges.

  Reference:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017;
    Naeini et al., AAAI 2015 (binning); Phan et al., ICCV 2025 (FS-MTL code).
  """
  where = "reliability_diagram"
  num_bins = _num_bins(where, num_bins)
  logits, labels, w = _check_inputs(where, logits, labels, weights)
  count, conf_sum, correct_sum, edges = _binned(logits, labels, w, num_bins)
  conf_b = linalg.safe_div(conf_sum, count)
  acc_b = linalg.safe_div(correct_sum, count)
  if w is None:
    count = count.astype(jnp.int32)
  return ReliabilityDiagram(conf_b, acc_b, count, edges)


def expected_calibration_error(logits, labels, num_bins: int = 10, *,
                               weights: Optional[Array] = None) -> Array:
  """Expected calibration error with equal-width confidence bins.

      ECE = Σ_b (count_b / Σ_b' count_b') · |acc_b − conf_b|

  over the B bins of :func:`reliability_diagram` (empty bins contribute 0;
  an all-zero mask gives 0). In [0, 1]; 0 for a perfectly calibrated model.
  Equals ``compute_calibration(...)["expected_calibration_error"]`` of the
  FS-MTL code with the same ``num_bins``.

  Args:
    logits: ``(..., N, K)`` logits.
    labels: ``(..., N)`` integer labels.
    num_bins: number of equal-width bins (default 10, as the authors).
    weights: optional ``(..., N)`` non-negative example weights / 0-1 mask.

  Returns:
    ``(...)`` array (a scalar for ``(N, K)`` logits).

  Reference:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017;
    Naeini et al., "Obtaining Well Calibrated Probabilities Using Bayesian
    Binning", AAAI 2015.
  """
  where = "expected_calibration_error"
  num_bins = _num_bins(where, num_bins)
  logits, labels, w = _check_inputs(where, logits, labels, weights)
  count, conf_sum, correct_sum, _ = _binned(logits, labels, w, num_bins)
  # count_b |acc_b − conf_b| = |Σ_b w·1[ŷ = y] − Σ_b w·c|: no per-bin division needed.
  return linalg.safe_div(jnp.sum(jnp.abs(correct_sum - conf_sum), axis=-1),
                         jnp.sum(count, axis=-1))


def brier_score(logits, labels, *, weights: Optional[Array] = None,
                reduction: str = "mean") -> Array:
  """Multi-class Brier score: squared distance of p to the one-hot label.

      BS = (1/N) Σ_n Σ_k (p_nk − 1[k = y_n])²,   p_n = softmax(logits_n),

  in [0, 2] (0: certain and right; 2: certain and wrong), as the FS-MTL
  ``brier_score`` (1 + (Σ p² − 2 Σ p_y)/N).

  Args:
    logits: ``(..., N, K)`` logits.
    labels: ``(..., N)`` integer labels.
    weights: optional ``(..., N)`` weights (weighted mean; only with "mean").
    reduction: "mean" (default) or "none" (per-example values, ``(..., N)``).

  Returns:
    ``(...)`` (or ``(..., N)`` with ``reduction="none"``).

  Reference:
    Brier, "Verification of Forecasts Expressed in Terms of Probability",
    Monthly Weather Review 1950.
  """
  return _measure("brier_score", "brier", logits, labels, weights, reduction)


def negative_log_likelihood(logits, labels, *, weights: Optional[Array] = None,
                            reduction: str = "mean") -> Array:
  """Negative log-likelihood (cross-entropy) of the labels.

      NLL = −(1/N) Σ_n log softmax(logits_n)_{y_n},

  from ``log_softmax`` (finite for any finite logits, however large).

  Args:
    logits: ``(..., N, K)`` logits.
    labels: ``(..., N)`` integer labels.
    weights: optional ``(..., N)`` weights (weighted mean; only with "mean").
    reduction: "mean" (default) or "none" (per-example values, ``(..., N)``).

  Returns:
    ``(...)`` (or ``(..., N)`` with ``reduction="none"``).

  Reference:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (NLL as
    a calibration measure).
  """
  return _measure("negative_log_likelihood", "nll", logits, labels, weights, reduction)


def predictive_entropy(logits, labels=None, *, weights: Optional[Array] = None,
                       reduction: str = "mean") -> Array:
  """Entropy of the predictive distribution, H(p_n) = −Σ_k p_nk log p_nk.

  In [0, log K]; the FS-MTL study compares its distribution (``reduction=
  "none"``) on in-domain data and on a shifted data set: a robust model is
  uncertain (high entropy) out of domain. Terms with p_nk = 0 count 0 (no
  ``0 · log 0`` NaN), so saturated logits give an entropy of 0.

  Args:
    logits: ``(..., N, K)`` logits.
    labels: ignored (accepted for a uniform signature with the other
      measures); None by default.
    weights: optional ``(..., N)`` weights (weighted mean; only with "mean").
    reduction: "mean" (default) or "none" (per-example entropies, ``(..., N)``).

  Returns:
    ``(...)`` (or ``(..., N)`` with ``reduction="none"``), in nats.

  Reference:
    Shannon 1948; Phan et al., ICCV 2025 (FS-MTL ``predictive_entropy.py``).
  """
  logits = jnp.asarray(logits)
  if labels is None:
    labels = jnp.zeros(logits.shape[:-1], jnp.int32)
  return _measure("predictive_entropy", "entropy", logits, labels, weights, reduction)
