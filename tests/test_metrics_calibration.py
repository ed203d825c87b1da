"""Calibration, weight-noise robustness, loss landscapes and the sharpness report.

References are independent NumPy code written from the definitions: the binning
of the FS-MTL ``compute_calibration`` (``np.digitize(..., right=True)``, a loop
over bins), float64 softmax probabilities, per-point parameter arithmetic in
NumPy, and a per-task loop for the SAM quantities.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax import metrics

# --- NumPy references --------------------------------------------------------------


def np_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def np_calibration(probs, labels, num_bins):
  """Equal-width binning of the top-class confidence (as the FS-MTL script)."""
  conf = probs.max(axis=1)
  pred = probs.argmax(axis=1)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  idx = np.digitize(conf, edges, right=True)
  acc_b, conf_b, count_b = np.zeros(num_bins), np.zeros(num_bins), np.zeros(num_bins)
  for b in range(num_bins):
    sel = np.where(idx == b + 1)[0]
    if len(sel):
      acc_b[b] = np.mean(labels[sel] == pred[sel])
      conf_b[b] = np.mean(conf[sel])
      count_b[b] = len(sel)
  ece = np.sum(np.abs(acc_b - conf_b) * count_b) / np.sum(count_b)
  return ece, conf_b, acc_b, count_b


def np_brier(probs, labels):
  onehot = np.eye(probs.shape[1])[labels]
  return np.sum((probs - onehot) ** 2, axis=1)


def np_nll(probs, labels):
  return -np.log(probs[np.arange(len(labels)), labels])


def np_entropy(probs):
  with np.errstate(divide="ignore", invalid="ignore"):
    return -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)


def random_classification(seed=0, n=60, k=5, scale=2.5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, k)) * scale
  labels = rng.integers(0, k, size=n)
  # Make about half of the predictions right, so that bins have mixed accuracy.
  right = rng.random(n) < 0.5
  labels[right] = logits[right].argmax(axis=1)
  return logits, labels


# --- calibration ---------------------------------------------------------------------

@pytest.mark.parametrize("num_bins", [10, 7])
def test_calibration_measures_match_numpy(num_bins, x64):
  logits, labels = random_classification()
  probs = np_softmax(logits)
  lg, lb = jnp.asarray(logits), jnp.asarray(labels)
  ece, conf_b, acc_b, count_b = np_calibration(probs, labels, num_bins)
  np.testing.assert_allclose(metrics.expected_calibration_error(lg, lb, num_bins), ece,
                             rtol=1e-12, atol=1e-15)
  diag = metrics.reliability_diagram(lg, lb, num_bins)
  np.testing.assert_allclose(diag.confidence, conf_b, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(diag.accuracy, acc_b, rtol=1e-12, atol=1e-15)
  np.testing.assert_array_equal(diag.count, count_b)
  assert diag.count.dtype == jnp.int32
  np.testing.assert_allclose(diag.edges, np.linspace(0, 1, num_bins + 1), rtol=1e-15)
  np.testing.assert_allclose(metrics.brier_score(lg, lb), np_brier(probs, labels).mean(),
                             rtol=1e-12)
  np.testing.assert_allclose(metrics.brier_score(lg, lb, reduction="none"),
                             np_brier(probs, labels), rtol=1e-12)
  np.testing.assert_allclose(metrics.negative_log_likelihood(lg, lb),
                             np_nll(probs, labels).mean(), rtol=1e-12)
  np.testing.assert_allclose(metrics.predictive_entropy(lg, reduction="none"),
                             np_entropy(probs), rtol=1e-12)
  np.testing.assert_allclose(metrics.predictive_entropy(lg), np_entropy(probs).mean(),
                             rtol=1e-12)


def test_weights_equal_repeated_examples_and_task_axis(x64):
  """Integer weights = repeating examples; a 0/1 mask = dropping them; (m, N, K) = per task."""
  logits, labels = random_classification(seed=1, n=40, k=4)
  w = np.random.default_rng(2).integers(0, 4, size=40)
  rep_logits, rep_labels = np.repeat(logits, w, axis=0), np.repeat(labels, w)
  probs = np_softmax(rep_logits)
  lg, lb, jw = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w, jnp.float64)
  ece, conf_b, acc_b, count_b = np_calibration(probs, rep_labels, 10)
  np.testing.assert_allclose(metrics.expected_calibration_error(lg, lb, weights=jw), ece,
                             rtol=1e-12, atol=1e-15)
  diag = metrics.reliability_diagram(lg, lb, weights=jw)
  np.testing.assert_allclose(diag.count, count_b, rtol=1e-15)
  np.testing.assert_allclose(diag.accuracy, acc_b, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(diag.confidence, conf_b, rtol=1e-12, atol=1e-15)
  for fn, ref in ((metrics.brier_score, np_brier(probs, rep_labels)),
                  (metrics.negative_log_likelihood, np_nll(probs, rep_labels))):
    np.testing.assert_allclose(fn(lg, lb, weights=jw), ref.mean(), rtol=1e-12)
  np.testing.assert_allclose(metrics.predictive_entropy(lg, weights=jw),
                             np_entropy(probs).mean(), rtol=1e-12)
  # All-zero mask: 0, not 0/0.
  zero = jnp.zeros(40)
  for fn in (metrics.expected_calibration_error, metrics.brier_score,
             metrics.negative_log_likelihood, metrics.predictive_entropy):
    assert float(fn(lg, lb, weights=zero)) == 0.0
  # A leading task axis: the same as one task at a time.
  logits2, labels2 = random_classification(seed=3, n=40, k=4)
  stacked_l = jnp.asarray(np.stack([logits, logits2]))
  stacked_y = jnp.asarray(np.stack([labels, labels2]))
  for fn in (metrics.expected_calibration_error, metrics.brier_score,
             metrics.negative_log_likelihood, metrics.predictive_entropy):
    got = fn(stacked_l, stacked_y)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, [fn(jnp.asarray(logits), jnp.asarray(labels)),
                                     fn(jnp.asarray(logits2), jnp.asarray(labels2))],
                               rtol=1e-12)
  assert metrics.reliability_diagram(stacked_l, stacked_y, 6).count.shape == (2, 6)


def test_edge_cases_empty_bins_perfect_constant_single_class_huge_logits():
  k, n = 4, 12
  labels = jnp.asarray(np.arange(n) % k)
  # Perfect, certain predictions: confidence 1 (last bin), every other bin empty.
  perfect = 50.0 * jax.nn.one_hot(labels, k)
  diag = metrics.reliability_diagram(perfect, labels)
  np.testing.assert_array_equal(diag.count, [0] * 9 + [n])
  np.testing.assert_array_equal(diag.accuracy, [0.0] * 9 + [1.0])
  assert np.all(np.isfinite(diag.confidence))
  assert float(metrics.expected_calibration_error(perfect, labels)) < 1e-6
  assert float(metrics.brier_score(perfect, labels)) < 1e-6
  assert float(metrics.negative_log_likelihood(perfect, labels)) < 1e-6
  assert float(metrics.predictive_entropy(perfect)) < 1e-6
  # Constant (all-equal) logits: confidence 1/K, prediction class 0 (first argmax).
  const = jnp.zeros((n, k))
  acc = float(np.mean(np.asarray(labels) == 0))
  np.testing.assert_allclose(metrics.expected_calibration_error(const, labels),
                             abs(acc - 1 / k), rtol=1e-6)
  np.testing.assert_allclose(metrics.brier_score(const, labels), 1 - 1 / k, rtol=1e-6)
  np.testing.assert_allclose(metrics.negative_log_likelihood(const, labels), np.log(k),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics.predictive_entropy(const), np.log(k), rtol=1e-6)
  # Confidences exactly on bin edges: 1/2 (K = 2, ties) lies in (0.4, 0.5], bin 4; 1/4 in
  # (0.2, 0.3]... with 4 bins (0, .25] is bin 0, as np.digitize(right=True).
  two = jnp.zeros((3, 2))
  np.testing.assert_array_equal(metrics.reliability_diagram(two, jnp.zeros(3, int)).count,
                                [0, 0, 0, 0, 3, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(
      metrics.reliability_diagram(const, labels, num_bins=4).count, [n, 0, 0, 0])
  # A single class: everything certain and right.
  one = jnp.asarray(np.random.default_rng(0).normal(size=(n, 1)), jnp.float32)
  zeros = jnp.zeros(n, jnp.int32)
  for fn in (metrics.expected_calibration_error, metrics.brier_score,
             metrics.negative_log_likelihood):
    assert float(fn(one, zeros)) == 0.0
  assert float(metrics.predictive_entropy(one)) == 0.0
  # Huge float32 logits: no overflow, exact one-hot probabilities.
  huge = jnp.asarray([[3e38, -3e38, 0.0], [1e30, 1e30, -1e30], [-3e38, 0.0, 3e38]],
                     jnp.float32)
  y = jnp.asarray([0, 1, 1])
  np.testing.assert_allclose(metrics.brier_score(huge, y, reduction="none"),
                             [0.0, 0.5, 2.0], atol=1e-6)
  np.testing.assert_allclose(metrics.predictive_entropy(huge, reduction="none"),
                             [0.0, np.log(2), 0.0], rtol=1e-6, atol=1e-7)
  nll = metrics.negative_log_likelihood(huge, y, reduction="none")
  np.testing.assert_allclose(nll[:2], [0.0, np.log(2)], rtol=1e-6, atol=1e-7)
  assert nll[2] == 3e38  # finite: log-softmax, never log(exp(·))
  np.testing.assert_allclose(metrics.expected_calibration_error(huge, y), 1 / 3 * 0.5 + 1 / 3,
                             rtol=1e-6)
  # A −inf logit is a class of probability 0: finite entropy and Brier score.
  masked = jnp.asarray([[0.0, -jnp.inf, 0.0]])
  np.testing.assert_allclose(metrics.predictive_entropy(masked), np.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics.brier_score(masked, jnp.asarray([0])), 0.5, rtol=1e-6)


def test_calibration_errors():
  lg, lb = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
  with pytest.raises(ValueError, match="shape"):
    metrics.expected_calibration_error(jnp.zeros(4), lb)
  with pytest.raises(ValueError, match="labels must have shape"):
    metrics.brier_score(lg, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    metrics.negative_log_likelihood(lg, jnp.zeros(4))
  with pytest.raises(ValueError, match="num_bins"):
    metrics.reliability_diagram(lg, lb, num_bins=0)
  with pytest.raises(ValueError, match="weights must have"):
    metrics.expected_calibration_error(lg, lb, weights=jnp.ones(3))
  with pytest.raises(ValueError, match="reduction"):
    metrics.brier_score(lg, lb, reduction="sum")
  with pytest.raises(ValueError, match="weights apply"):
    metrics.predictive_entropy(lg, weights=jnp.ones(4), reduction="none")


class CalibrationJit(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_float32_against_float64_reference(self):
    logits, labels = random_classification(seed=4, n=50, k=3)
    probs = np_softmax(logits)
    mask = (np.arange(50) % 5 != 0).astype(np.float32)

    def all_measures(lg, lb, w):
      return (metrics.expected_calibration_error(lg, lb, 10, weights=w),
              metrics.reliability_diagram(lg, lb, 10),
              metrics.brier_score(lg, lb), metrics.negative_log_likelihood(lg, lb),
              metrics.predictive_entropy(lg, reduction="none"))

    ece, diag, brier, nll, ent = self.variant(all_measures)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
    keep = mask > 0
    want_ece = np_calibration(probs[keep], labels[keep], 10)[0]
    _, conf_b, acc_b, count_b = np_calibration(probs, labels, 10)
    np.testing.assert_allclose(ece, want_ece, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(diag.count, count_b)
    np.testing.assert_allclose(diag.confidence, conf_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diag.accuracy, acc_b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(brier, np_brier(probs, labels).mean(), rtol=1e-5)
    np.testing.assert_allclose(nll, np_nll(probs, labels).mean(), rtol=1e-5)
    np.testing.assert_allclose(ent, np_entropy(probs), rtol=1e-5, atol=1e-6)


# --- filter-normalised directions ------------------------------------------------------

def small_params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), {
      "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
      "dense": {"kernel": rng.normal(size=(6, 3)), "bias": rng.normal(size=3)},
      "bn": {"scale": rng.normal(size=3) + 1.0},
      "temperature": np.float64(1.5),
  })


def test_filter_normalized_direction_norms_and_one_dim_leaves():
  params = small_params()
  key = jax.random.key(0)
  d = metrics.filter_normalized_direction(key, params)
  assert jax.tree.structure(d) == jax.tree.structure(params)
  for w, dd in ((params["conv"]["kernel"], d["conv"]["kernel"]),
                (params["dense"]["kernel"], d["dense"]["kernel"])):
    assert dd.shape == w.shape and dd.dtype == w.dtype
    w_np, d_np = np.asarray(w, np.float64), np.asarray(dd, np.float64)
    axes = tuple(range(w.ndim - 1))  # every filter = one output channel (last axis)
    np.testing.assert_allclose(np.sqrt((d_np ** 2).sum(axes)), np.sqrt((w_np ** 2).sum(axes)),
                               rtol=1e-5)
  for leaf in (d["conv"]["bias"], d["dense"]["bias"], d["bn"]["scale"], d["temperature"]):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  # one_dim="weights": 1-D leaves are the weights themselves (Li et al. without ignore).
  dw = metrics.filter_normalized_direction(key, params, one_dim="weights")
  np.testing.assert_array_equal(dw["bn"]["scale"], params["bn"]["scale"])
  np.testing.assert_array_equal(dw["dense"]["kernel"], d["dense"]["kernel"])
  # PyTorch layout: filters along axis 0.
  d0 = metrics.filter_normalized_direction(key, params, filter_axis=0)
  w = np.asarray(params["dense"]["kernel"], np.float64)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(d0["dense"]["kernel"]), axis=1),
                             np.linalg.norm(w, axis=1), rtol=1e-5)
  # Rescaling one filter of θ rescales the same filter of d only (same key); a zero
  # filter gets a zero direction.
  scaled = jax.tree.map(lambda x: x, params)
  factor = jnp.asarray([3.0, 1.0, 0.0])
  scaled["dense"]["kernel"] = params["dense"]["kernel"] * factor
  ds = metrics.filter_normalized_direction(key, scaled)
  np.testing.assert_allclose(ds["dense"]["kernel"], d["dense"]["kernel"] * factor, rtol=1e-5)
  np.testing.assert_array_equal(ds["conv"]["kernel"], d["conv"]["kernel"])
  # Huge and tiny filters: no overflow/underflow in the norms.
  for c in (1e37, 1e-30):
    dc = metrics.filter_normalized_direction(key, jax.tree.map(lambda v, c=c: v * c, params))
    np.testing.assert_allclose(np.asarray(dc["conv"]["kernel"], np.float64) / c,
                               d["conv"]["kernel"], rtol=1e-5)
  # Different keys give different directions.
  d2 = metrics.filter_normalized_direction(jax.random.key(1), params)
  assert not np.allclose(d2["conv"]["kernel"], d["conv"]["kernel"])
  with pytest.raises(ValueError, match="one_dim"):
    metrics.filter_normalized_direction(key, params, one_dim="bias")
  with pytest.raises(ValueError, match="out of range"):
    metrics.filter_normalized_direction(key, params, filter_axis=5)
  with pytest.raises(ValueError, match="floating"):
    metrics.filter_normalized_direction(key, {"w": jnp.ones((2, 2)), "n": jnp.ones(2, int)})


# --- weight-noise robustness -----------------------------------------------------------

def test_noise_robustness_radii_directions_and_host_loop():
  params = small_params()
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  theta = flat(params)
  radii = [0.0, 0.5, 2.0]
  # eval_fn returning the perturbed parameters exposes θ' = θ + r d_j.
  moved = metrics.noise_robustness(lambda p: p, params, jax.random.key(3), radii,
                                   num_directions=4)
  assert moved["conv"]["kernel"].shape == (3, 4, 3, 3, 2, 4)
  pts = np.stack([np.stack([flat(jax.tree.map(lambda x, r=r, j=j: x[r, j], moved))
                            for j in range(4)]) for r in range(3)])  # (R, D, n)
  steps = pts - theta
  np.testing.assert_allclose(steps[0], 0.0, atol=0)
  np.testing.assert_allclose(np.linalg.norm(steps, axis=-1), np.array(radii)[:, None]
                             * np.ones((1, 4)), rtol=1e-5)  # "global": ‖θ' − θ‖ = r
  np.testing.assert_allclose(steps[2] / 2.0, steps[1] / 0.5, rtol=1e-4, atol=1e-6)
  cos = (steps[1] @ steps[1].T) / 0.25
  assert np.all(np.abs(cos[~np.eye(4, dtype=bool)]) < 0.99)  # distinct directions
  # "filter": each filter moves by r ‖W_f‖, 1-D leaves stay.
  moved_f = metrics.noise_robustness(lambda p: p, params, jax.random.key(3), radii,
                                     num_directions=2, direction="filter")
  w = np.asarray(params["dense"]["kernel"], np.float64)
  for r, rho in enumerate(radii):
    for j in range(2):
      step = np.asarray(moved_f["dense"]["kernel"][r, j], np.float64) - w
      np.testing.assert_allclose(np.linalg.norm(step, axis=0), rho * np.linalg.norm(w, axis=0),
                                 rtol=1e-4, atol=1e-6)
      np.testing.assert_array_equal(moved_f["bn"]["scale"][r, j], params["bn"]["scale"])
  # A per-task metric; the Python-loop mode gives the same numbers.
  ev = lambda p: jnp.stack([jnp.sum(p["conv"]["kernel"] ** 2), jnp.sum(p["dense"]["kernel"])])
  in_graph = metrics.noise_robustness(ev, params, jax.random.key(5), radii, 2)
  host = metrics.noise_robustness(ev, params, jax.random.key(5), radii, 2, host_loop=True)
  assert in_graph.shape == host.shape == (3, 2, 2)
  np.testing.assert_allclose(host, in_graph, rtol=1e-5)
  np.testing.assert_allclose(in_graph[0], np.broadcast_to(ev(params), (2, 2)), rtol=1e-6)
  with pytest.raises(ValueError, match="direction"):
    metrics.noise_robustness(ev, params, jax.random.key(0), radii, direction="layer")
  with pytest.raises(ValueError, match="num_directions"):
    metrics.noise_robustness(ev, params, jax.random.key(0), radii, 0)
  with pytest.raises(ValueError, match="finite"):
    metrics.noise_robustness(ev, params, jax.random.key(0), [0.0, float("nan")])


def test_noise_robustness_per_task_accuracy_batchnorm_model_jit():
  """The documented pattern: eval mode, BatchNorm statistics closed over, per-task accuracy."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      z = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
      return nn.Dense(3, name="task0")(z), nn.Dense(3, name="task1")(z)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(32, 2)))
  variables = Net().init(jax.random.key(0), x, train=False)
  params = variables["params"]
  stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])  # "trained" statistics

  def eval_fn(p):
    logits = Net().apply({"params": p, "batch_stats": stats}, x, train=False)
    return jnp.stack([jnp.mean(jnp.argmax(l, -1) == y[:, i]) for i, l in enumerate(logits)])

  run = jax.jit(lambda p, k, r: metrics.noise_robustness(eval_fn, p, k, r, 4,
                                                         direction="filter"))
  radii = jnp.asarray([0.0, 0.3, 5.0])
  got = run(params, jax.random.key(1), radii)
  assert got.shape == (3, 4, 2)
  np.testing.assert_allclose(got[0], np.broadcast_to(eval_fn(params), (4, 2)), atol=1e-7)
  assert np.all((got >= 0) & (got <= 1))


# --- loss landscapes -------------------------------------------------------------------

def mtl_problem(dtype=jnp.float64, m=2):
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), {
      "trunk": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)},
      "heads": {"w": rng.normal(size=(m, 4)), "b": rng.normal(size=m)},
  })
  x = jnp.asarray(rng.normal(size=(10, 3)), dtype)
  y = jnp.asarray(rng.normal(size=(10, m)), dtype)
  return params, x, y


def mtl_loss(p, x, y):
  z = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
  return jnp.mean((z @ p["heads"]["w"].T + p["heads"]["b"] - y) ** 2, axis=0)  # (m,)


def np_point(params, coefs_dirs):
  """θ + Σ c_j d_j leaf by leaf in float64 NumPy."""
  def leaf(p, *ds):
    out = np.asarray(p, np.float64).copy()
    for (c, _), d in zip(coefs_dirs, ds):
      out = out + c * np.asarray(d, np.float64)
    return jnp.asarray(out)
  return jax.tree.map(leaf, params, *[d for _, d in coefs_dirs])


def test_loss_landscapes_match_pointwise_reference(x64):
  params, x, y = mtl_problem()
  d1 = metrics.filter_normalized_direction(jax.random.key(0), params, one_dim="weights")
  d2 = metrics.filter_normalized_direction(jax.random.key(1), params)
  alphas, betas = [-1.0, 0.0, 0.5], [-0.5, 0.25]
  want1 = np.stack([np.asarray(mtl_loss(np_point(params, [(a, d1)]), x, y)) for a in alphas])
  want2 = np.stack([np.stack([np.asarray(mtl_loss(np_point(params, [(a, d1), (b, d2)]), x, y))
                              for b in betas]) for a in alphas])
  got1 = metrics.loss_landscape_1d(mtl_loss, params, d1, alphas, x, y)  # one point at a time
  got2 = metrics.loss_landscape_2d(mtl_loss, params, d1, d2, alphas, betas, x, y, chunk_size=4)
  assert got1.shape == (3, 2) and got2.shape == (3, 2, 2)
  np.testing.assert_allclose(got1, want1, rtol=1e-12)
  np.testing.assert_allclose(got2, want2, rtol=1e-12)
  np.testing.assert_allclose(got1[1], mtl_loss(params, x, y), rtol=1e-14)
  # All points in one vmap; a closure with a pytree output.
  out = metrics.loss_landscape_1d(lambda p: {"l": mtl_loss(p, x, y)}, params, d1, alphas,
                                  chunk_size=None)
  np.testing.assert_allclose(out["l"], want1, rtol=1e-12)
  with pytest.raises(ValueError, match="structure"):
    metrics.loss_landscape_1d(mtl_loss, params, {"trunk": d1["trunk"]}, alphas, x, y)
  bad = jax.tree.map(lambda a: a, d1)
  bad["heads"]["b"] = jnp.zeros(5)
  with pytest.raises(ValueError, match="shape"):
    metrics.loss_landscape_2d(mtl_loss, params, d1, bad, alphas, betas, x, y)
  with pytest.raises(ValueError, match="non-empty"):
    metrics.loss_landscape_1d(mtl_loss, params, d1, [], x, y)
  with pytest.raises(ValueError, match="finite"):
    metrics.loss_landscape_2d(mtl_loss, params, d1, d2, alphas, [np.inf], x, y)
  with pytest.raises(ValueError, match="chunk_size"):
    metrics.loss_landscape_1d(mtl_loss, params, d1, alphas, x, y, chunk_size=0)


class LandscapeJit(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_traced_coordinates(self):
    params, x, y = mtl_problem(jnp.float32)
    d1 = metrics.filter_normalized_direction(jax.random.key(0), params)
    d2 = metrics.filter_normalized_direction(jax.random.key(1), params)
    fn = self.variant(lambda p, a, b: (
        metrics.loss_landscape_1d(mtl_loss, p, d1, a, x, y),
        metrics.loss_landscape_2d(mtl_loss, p, d1, d2, a, b, x, y, chunk_size=None)))
    a, b = jnp.asarray([-0.5, 0.0, 0.5]), jnp.asarray([0.0, 1.0])
    got1, got2 = fn(params, a, b)
    with jax.enable_x64(True):
      p64, x64_, y64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), (params, x, y))
      want2 = np.stack([np.stack([np.asarray(mtl_loss(np_point(p64, [(ai, d1), (bi, d2)]),
                                                      x64_, y64))
                                  for bi in (0.0, 1.0)]) for ai in (-0.5, 0.0, 0.5)])
    np.testing.assert_allclose(got2, want2, rtol=2e-5)
    np.testing.assert_allclose(got1, want2[:, 0], rtol=2e-5)


# --- sharpness report ------------------------------------------------------------------

def is_head(path, leaf):
  del leaf
  return "heads" in jax.tree_util.keystr(path)


@jax.jit
def task_value_and_grad(p, x, y, i):
  """L_i and ∇L_i of ONE task (plain jax.grad; compiled once for every i)."""
  return jax.value_and_grad(lambda q: mtl_loss(q, x, y)[i])(p)


def sam_reference(params, x, y, rho, joint, adaptive=False):
  """Per-task loop: ε_i from NumPy norms, L_i and ∇L_i at θ + ε_i, ‖g^SAM − g‖ over the trunk."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  heads = ["heads" in p for p in paths]
  w = [np.asarray(v, np.float64) for v in leaves]
  m = y.shape[1]
  increase, diff = [], []
  for i in range(m):
    loss, g = task_value_and_grad(params, x, y, i)
    g = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(g)]
    t = [np.abs(v) if adaptive else np.ones_like(v) for v in w]
    groups = [[False, True]] if joint else [[False], [True]]
    eps = [None] * len(w)
    for group in groups:
      idx = [k for k in range(len(w)) if heads[k] in group]
      n = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in idx))
      for k in idx:
        eps[k] = rho * t[k] ** 2 * g[k] / (n + 1e-12)
    point = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a + e) for a, e in zip(w, eps)])
    loss_p, g_p = task_value_and_grad(point, x, y, i)
    g_p = [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(g_p)]
    increase.append(float(loss_p) - float(loss))
    diff.append(np.sqrt(sum(np.sum((a - b) ** 2) for a, b, h in zip(g_p, g, heads) if not h)))
  return np.array(increase), np.array(diff)


def test_sharpness_report_matches_per_task_loop(x64):
  params, x, y = mtl_problem(m=3)
  rhos = [0.0, 0.05, 0.5]
  # The FS-MTL evaluation: one norm over trunk + own head, ‖g^SAM − g‖ over the trunk.
  rep = metrics.sharpness(mtl_loss, params, x, y, rhos=rhos, norm="joint",
                          task_specific=is_head, grad_diff_norm=True)
  assert isinstance(rep, metrics.SharpnessReport)
  assert rep.loss_increase.shape == rep.grad_diff_norm.shape == (3, 3)
  for r, rho in enumerate(rhos):
    inc, diff = sam_reference(params, x, y, rho, joint=True)
    np.testing.assert_allclose(rep.loss_increase[r], inc, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(rep.grad_diff_norm[r], diff, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(rep.grad_diff_norm[0], 0.0, atol=1e-14)  # two programs round
  assert np.all(rep.grad_diff_norm[2] > rep.grad_diff_norm[1])
  # Backwards compatible: without grad_diff_norm, the same loss increases as an array.
  plain = metrics.sharpness(mtl_loss, params, x, y, rhos=rhos, norm="joint",
                            task_specific=is_head)
  np.testing.assert_allclose(plain, rep.loss_increase, rtol=1e-12, atol=1e-15)
  # One perturbation (separate norms, adaptive); no task_specific: the norm covers all leaves.
  one = metrics.sharpness(mtl_loss, params, x, y, rho_shared=0.1, adaptive=True,
                          task_specific=is_head, grad_diff_norm=True)
  inc, diff = sam_reference(params, x, y, 0.1, joint=False, adaptive=True)
  np.testing.assert_allclose(one.loss_increase, inc, rtol=1e-9, atol=1e-13)
  np.testing.assert_allclose(one.grad_diff_norm, diff, rtol=1e-9, atol=1e-13)
  with pytest.raises(ValueError, match="every leaf"):
    metrics.sharpness(mtl_loss, params, x, y, rhos=[0.1], task_specific=lambda p, l: True,
                      grad_diff_norm=True)


class SharpnessReportJit(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_huge_losses(self):
    params, x, y = mtl_problem(jnp.float32, m=2)
    fn = self.variant(lambda p, r, s: metrics.sharpness(
        lambda q, x, y: s * mtl_loss(q, x, y), p, x, y, rhos=r, task_specific=is_head,
        grad_diff_norm=True))
    rhos = jnp.asarray([0.05, 0.2])
    rep = fn(params, rhos, 1.0)
    huge = fn(params, rhos, 1e30)  # squared gradient differences overflow float32
    with jax.enable_x64(True):
      p64, x64_, y64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), (params, x, y))
      for r, rho in enumerate((0.05, 0.2)):
        inc, diff = sam_reference(p64, x64_, y64, rho, joint=False)
        np.testing.assert_allclose(rep.loss_increase[r], inc, rtol=2e-3, atol=2e-6)
        np.testing.assert_allclose(rep.grad_diff_norm[r], diff, rtol=2e-3, atol=2e-6)
    assert np.all(np.isfinite(huge.grad_diff_norm))
    # ε is scale-invariant, so g^SAM − g scales with the loss.
    np.testing.assert_allclose(huge.grad_diff_norm, 1e30 * rep.grad_diff_norm, rtol=1e-3)


def test_public_names():
  for name in ("expected_calibration_error", "brier_score", "negative_log_likelihood",
               "predictive_entropy", "reliability_diagram", "filter_normalized_direction",
               "noise_robustness", "loss_landscape_1d", "loss_landscape_2d", "sharpness"):
    assert getattr(mo.metrics, name) is getattr(metrics, name)
    assert name in metrics.__all__
