"""factored_task_grads: the Gram matrix and updates of the stacked Jacobian, from factors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo

M = 3


def mlp_params(key, d_in=6, width=5, out=2):
  k = jax.random.split(key, 4)
  return {
      "l1": {"w": jax.random.normal(k[0], (d_in, width)) * 0.5, "b": jnp.full((width,), 0.1)},
      "l2": {"w": jax.random.normal(k[1], (width, width)) * 0.5, "b": jnp.zeros(width)},
      # All heads in one array: the head product is an einsum with a task axis.
      "heads": {"w": jax.random.normal(k[2], (M, width, out)) * 0.5},
  }


def mlp_loss(params, x, y):
  z = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  z = jax.nn.relu(z @ params["l2"]["w"] + params["l2"]["b"]) + z
  pred = jnp.einsum("bd,mdo->mbo", z, params["heads"]["w"])
  return jnp.mean((pred - y) ** 2, axis=(1, 2)) * jnp.arange(1.0, M + 1)


def mlp_data(batch=7, d_in=6):
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, d_in))
  y = jax.random.normal(jax.random.PRNGKey(2), (M, batch, 2))
  return x, y


HEADS = lambda path, leaf: "heads" in jax.tree_util.keystr(path)


def numpy_jacobian(grads):
  """Rows of the stacked gradients as one float64 (m, P) matrix."""
  return np.concatenate([np.asarray(l, np.float64).reshape(M, -1)
                         for l in jax.tree_util.tree_leaves(grads)], axis=1)


def assert_same_jacobian(fj, grads, rtol=2e-5):
  want = jax.tree_util.tree_leaves(grads)
  got = fj.leaves()
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(w))))
  # The Gram matrix from the factors against NumPy's J Jᵀ.
  j = numpy_jacobian(grads)
  scale = np.max(np.abs(j @ j.T))
  np.testing.assert_allclose(fj.gram(range(len(want))), j @ j.T, rtol=rtol, atol=rtol * scale)
  # Σ_i w_i g_i from the factors against NumPy.
  w = np.array([0.3, -1.2, 2.0])[:M]
  for l, leaf in enumerate(want):
    ref = np.tensordot(w, np.asarray(leaf, np.float64), axes=1)
    np.testing.assert_allclose(fj.combine(jnp.asarray(w, jnp.float32), l), ref, rtol=rtol,
                               atol=rtol * max(np.max(np.abs(ref)), 1e-6))


class FactoredEqualsStackedTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp(self):
    params = mlp_params(jax.random.PRNGKey(0))
    x, y = mlp_data()
    losses, grads = mo.task_grads(mlp_loss, params, x, y)
    got_losses, fj = self.variant(
        lambda p: mo.factored_task_grads(mlp_loss, p, x, y, factorize="always"))(params)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-6)
    # The three weight matrices (l1, l2, heads) are factored, the biases are not.
    kinds = jax.tree_util.tree_unflatten(fj.treedef, [fj.is_factored(l)
                                                      for l in range(fj.num_leaves)])
    assert kinds == {"l1": {"w": True, "b": False}, "l2": {"w": True, "b": False},
                     "heads": {"w": True}}
    assert_same_jacobian(fj, grads)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, "auto"])
def test_chunk_sizes_agree(chunk_size):
  params = mlp_params(jax.random.PRNGKey(3))
  x, y = mlp_data()
  _, grads = mo.task_grads(mlp_loss, params, x, y)
  _, fj = jax.jit(lambda p: mo.factored_task_grads(
      mlp_loss, p, x, y, chunk_size=chunk_size, factorize="always"))(params)
  assert_same_jacobian(fj, grads)


def test_general_products_left_operand_sequences_and_fallbacks():
  """W on the left, several free axes, sample axes (batch × time), tied and conv weights."""
  k = jax.random.split(jax.random.PRNGKey(4), 6)
  params = {
      "left": jax.random.normal(k[0], (5, 4)) * 0.5,        # used as W · xᵀ
      "multi": jax.random.normal(k[1], (5, 3, M)) * 0.5,    # contracts one axis, two free
      "tied": jax.random.normal(k[2], (M, M)) * 0.5,        # used twice: stays stacked
      "conv": jax.random.normal(k[3], (1, M, 3)) * 0.5,     # a convolution: stays stacked
      "scaled": jax.random.normal(k[4], (M, M)) * 0.5,      # used outside a product too
  }
  x = jax.random.normal(k[5], (4, 6, 4))                    # (batch, time, features)

  @jax.jit   # a jitted layer: its body is traced through
  def layer(w, h):
    return jnp.einsum("oi,bti->bto", w, h)

  def loss_fn(p, x):
    h = jnp.tanh(layer(p["left"], x))                                   # (b, t, 5)
    h2 = jnp.tanh(h @ p["multi"].reshape(5, 3 * M)[:, :3])              # reshape: stacked
    h3 = jnp.einsum("bti,ijk->btjk", h, p["multi"])                     # (b, t, 3, M)
    h3 = h3.sum(2) @ p["tied"] @ p["tied"]                              # (b, t, M)
    c = jax.lax.conv_general_dilated(h3.transpose(0, 2, 1), p["conv"], (1,), "SAME")
    out = h3 @ p["scaled"] + jnp.sum(p["scaled"] ** 2) + jnp.mean(c) + jnp.mean(h2)
    return jnp.mean(out ** 2, axis=(0, 1))

  _, grads = mo.task_grads(loss_fn, params, x)
  _, fj = mo.factored_task_grads(loss_fn, params, x, factorize="always")
  kinds = {name: fj.is_factored(l) for l, name in enumerate(sorted(params))}
  assert kinds == {"conv": False, "left": True, "multi": False, "scaled": False, "tied": False}
  assert_same_jacobian(fj, grads)

  # Without the reshape use, "multi" (two free axes, sample axes b × t) is factored.
  def loss_multi(p, x):
    h = jnp.tanh(layer(p["left"], x))
    return jnp.mean(jnp.tanh(jnp.einsum("bti,ijk->btjk", h, p["multi"])) ** 2, axis=(0, 1, 2))

  _, grads = mo.task_grads(loss_multi, params, x)
  _, fj = mo.factored_task_grads(loss_multi, params, x, factorize="always")
  assert fj.is_factored(sorted(params).index("multi"))
  assert_same_jacobian(fj, grads)


def test_cost_rule_chooses_factoring():
  """"auto" factors a product when N²K + m·N²D < m·N·K·D."""
  k = jax.random.split(jax.random.PRNGKey(5), 4)
  params = {"wide": jax.random.normal(k[0], (64, 64)) * 0.1,    # N = 4: 82k < 197k flops
            "narrow": jax.random.normal(k[1], (8, 8)) * 0.1}    # N = 256: 2.1M > 49k
  xs = jax.random.normal(k[2], (4, 64))
  xb = jax.random.normal(k[3], (256, 8))

  def loss_fn(p, xs, xb):
    a = jnp.tanh(xs @ p["wide"])
    b = jnp.tanh(xb @ p["narrow"])
    return jnp.mean(a[:, :M] ** 2, axis=0) + jnp.mean(b[:, :M] ** 2, axis=0)

  x = (xs, xb)
  _, fj = mo.factored_task_grads(loss_fn, params, *x)
  assert [fj.is_factored(l) for l in range(2)] == [False, True]   # sorted: narrow, wide
  _, never = mo.factored_task_grads(loss_fn, params, *x, factorize="never")
  assert not any(never.is_factored(l) for l in range(2))
  _, grads = mo.task_grads(loss_fn, params, *x)
  assert_same_jacobian(fj, grads)
  assert_same_jacobian(never, grads)


def test_flax_dense_model():
  nn = pytest.importorskip("flax.linen")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      z = nn.relu(nn.Dense(8)(x))
      z = nn.relu(nn.Dense(8)(z))
      return nn.Dense(M)(z)

  x = jax.random.normal(jax.random.PRNGKey(7), (5, 6))
  model = Net()
  params = model.init(jax.random.PRNGKey(8), x)
  loss_fn = lambda p, x: jnp.mean(model.apply(p, x) ** 2, axis=0)
  _, grads = mo.task_grads(loss_fn, params, x)
  _, fj = mo.factored_task_grads(loss_fn, params, x, factorize="always")
  assert sum(fj.is_factored(l) for l in range(fj.num_leaves)) == 3   # the three kernels
  assert_same_jacobian(fj, grads)


def test_has_aux_and_errors():
  params = mlp_params(jax.random.PRNGKey(0))
  x, y = mlp_data()
  aux_loss = lambda p, x, y: (mlp_loss(p, x, y), {"s": jnp.sum(x)})
  (losses, aux), _ = mo.factored_task_grads(aux_loss, params, x, y, has_aux=True)
  np.testing.assert_allclose(aux["s"], jnp.sum(x))
  np.testing.assert_allclose(losses, mlp_loss(params, x, y), rtol=1e-6)
  with pytest.raises(ValueError, match="factorize"):
    mo.factored_task_grads(mlp_loss, params, x, y, factorize="some")
  with pytest.raises(ValueError, match="shape"):
    mo.factored_task_grads(lambda p, x, y: jnp.sum(mlp_loss(p, x, y)), params, x, y)
  with pytest.raises(ValueError, match="perturbation"):
    mo.make_train_step(mlp_loss, optax.sgd(0.1), mode="factored",
                       perturbation=mo.task_perturbation())
  _, fj = mo.factored_task_grads(mlp_loss, params, x, y, factorize="always")
  flat = mo.flat(mo.mgda())
  with pytest.raises(TypeError, match="FactoredJacobian"):
    flat.update(fj, flat.init(params), params, losses=jnp.ones(M),
                sam_grads=mo.task_grads(mlp_loss, params, x, y)[1])


# One method per code path of make_aggregator: fixed weights, a Gram QP, a stateful
# loss-based solver, a method that reads the gradients themselves (materialised
# blocks), a loss weighting that weights the heads, a stochastic one.
METHODS = ["mean", "upgrad", "nash_mtl", "pcgrad", "famo", "random_loss_weighting"]


@pytest.mark.parametrize("name", METHODS)
def test_aggregators_accept_the_factored_jacobian(name):
  """Every method gives the same update (and state) from the factors as from the stacked grads."""
  params = mlp_params(jax.random.PRNGKey(9))
  x, y = mlp_data()
  losses, grads = mo.task_grads(mlp_loss, params, x, y)
  _, fj = mo.factored_task_grads(mlp_loss, params, x, y, factorize="always")
  agg = getattr(mo, name)(task_specific=HEADS, num_tasks=M)
  state = agg.init(params)
  update = jax.jit(lambda g, s: agg.update(g, s, params, losses=losses))
  want, want_state = update(grads, state)
  got, got_state = update(fj, state)
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-6)
  chex.assert_trees_all_close(mo.diagnostics(got_state)["gram"],
                              mo.diagnostics(want_state)["gram"], rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["skip", "zero_task"])
def test_nonfinite_task(policy):
  """A NaN in one task's layer cotangent: same policy outcome as on the stacked rows."""
  params = mlp_params(jax.random.PRNGKey(10))
  x, y = mlp_data()
  losses, _ = mo.task_grads(mlp_loss, params, x, y)
  _, fj = mo.factored_task_grads(mlp_loss, params, x, y, factorize="always")
  # (A NaN in the forward pass reaches every task through 0·NaN in the backward
  # passes; a task-local one is injected into the factors directly.)
  assert fj.is_factored(4)   # leaves: heads.w, l1.b, l1.w, l2.b, l2.w
  fj.deltas[4] = fj.deltas[4].at[1, 0, 0].set(jnp.nan)
  stacked = jax.tree_util.tree_unflatten(fj.treedef, fj.leaves())
  agg = mo.upgrad(task_specific=HEADS, num_tasks=M, nonfinite=policy)
  state = agg.init(params)
  update = jax.jit(lambda g, s: agg.update(g, s, params, losses=losses))
  want, want_state = update(stacked, state)
  got, got_state = update(fj, state)
  assert int(mo.diagnostics(want_state)["nonfinite_tasks"]) == 1
  assert int(mo.diagnostics(got_state)["nonfinite_tasks"]) == 1
  chex.assert_tree_all_finite(got)
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-6)
  if policy == "skip":
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree_util.tree_leaves(got))
  else:
    assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree_util.tree_leaves(got))


def test_train_step_factored_mode():
  params = mlp_params(jax.random.PRNGKey(11))
  x, y = mlp_data()
  results = []
  for mode in ("jacrev", "factored"):
    tx = optax.chain(mo.cagrad(task_specific=HEADS, num_tasks=M), optax.sgd(0.1))
    step = mo.make_train_step(mlp_loss, tx, mode=mode)
    p, s = params, tx.init(params)
    for _ in range(2):
      p, s, losses, _ = step(p, s, x, y)
    results.append((p, losses))
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-4, atol=1e-6)


# (einsum of the activation with W, activation shape, W shape): W on either side, transposed
# contractions, several sample and free axes.
PRODUCTS = [
    ("bi,io->bo", (6, 4), (4, 5)),
    ("oi,bi->bo", (6, 4), (5, 4)),        # W on the left, contracted on its last axis
    ("bi,oi->bo", (6, 4), (5, 4)),        # x · Wᵀ
    ("bti,ijk->btjk", (3, 2, 4), (4, 2, 3)),
    ("btij,ijo->bto", (3, 2, 2, 3), (2, 3, 5)),   # two contracted axes
    ("ib,io->bo", (4, 6), (4, 5)),        # sample axis after the contracted one
]


@pytest.mark.parametrize("spec,a_shape,w_shape", PRODUCTS, ids=[p[0] for p in PRODUCTS])
def test_products_of_any_layout(spec, a_shape, w_shape):
  """Rows, Gram matrix and combination equal the stacked ones for each product layout."""
  k = jax.random.split(jax.random.PRNGKey(12), 3)
  params = {"w": jax.random.normal(k[0], w_shape) * 0.5,
            "v": jax.random.normal(k[1], (M,)) * 0.5}
  x = jax.random.normal(k[2], a_shape)

  def loss_fn(p, x):
    out = jnp.tanh(jnp.einsum(spec, x, p["w"]))
    flat = out.reshape(out.shape[0], -1)
    return jnp.mean(flat[:, :M] ** 2, axis=0) * (1.0 + p["v"])

  _, grads = mo.task_grads(loss_fn, params, x)
  _, fj = jax.jit(lambda p: mo.factored_task_grads(loss_fn, p, x, factorize="always"))(params)
  assert fj.is_factored(sorted(params).index("w"))
  assert_same_jacobian(fj, grads)


def test_vmapped_per_example_model():
  """A per-example model under jax.vmap: its products gain sample axes, still factored."""
  params = mlp_params(jax.random.PRNGKey(13))
  x, y = mlp_data()

  def per_example(p, xi, yi):   # xi (d_in,), yi (M, 2)
    z = jnp.tanh(xi @ p["l1"]["w"] + p["l1"]["b"])
    z = jax.nn.relu(z @ p["l2"]["w"] + p["l2"]["b"]) + z
    return jnp.sum((jnp.einsum("d,mdo->mo", z, p["heads"]["w"]) - yi) ** 2, axis=1)

  loss_fn = lambda p, x, y: jnp.mean(
      jax.vmap(per_example, in_axes=(None, 0, 1))(p, x, y), axis=0)
  _, grads = mo.task_grads(loss_fn, params, x, y)
  _, fj = mo.factored_task_grads(loss_fn, params, x, y, factorize="always")
  assert sum(fj.is_factored(l) for l in range(fj.num_leaves)) == 3
  assert_same_jacobian(fj, grads)


def test_one_jitted_layer_called_with_two_weights():
  """The same jitted body used twice: each call's product is its own factored site."""
  k = jax.random.split(jax.random.PRNGKey(14), 3)
  params = {"w1": jax.random.normal(k[0], (4, 6)) * 0.5,
            "w2": jax.random.normal(k[1], (6, M)) * 0.5}
  x = jax.random.normal(k[2], (5, 4))
  layer = jax.jit(lambda w, h: jnp.tanh(h @ w))
  loss_fn = lambda p, x: jnp.mean(layer(p["w2"], layer(p["w1"], x)) ** 2, axis=0)
  _, grads = mo.task_grads(loss_fn, params, x)
  _, fj = mo.factored_task_grads(loss_fn, params, x, factorize="always")
  assert fj.is_factored(0) and fj.is_factored(1)
  assert_same_jacobian(fj, grads)


def test_dropout_layernorm_remat_and_scan():
  """Random bits, normalisation, and weights used inside remat / scan (those stay stacked)."""
  nn = pytest.importorskip("flax.linen")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      z = nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(16)(x)))
      z = nn.relu(nn.Dense(16)(nn.LayerNorm()(z)))
      return nn.Dense(M)(z)

  x = jax.random.normal(jax.random.PRNGKey(15), (8, 6))
  key = jax.random.PRNGKey(16)
  model = Net()
  params = {"net": model.init(jax.random.PRNGKey(17), x),
            "w": jax.random.normal(key, (6, 5)) * 0.5,
            "u": jax.random.normal(key, (5, 5)) * 0.3,
            "r": jax.random.normal(key, (5, M)) * 0.5}

  def loss_fn(p, x, k):
    out = model.apply(p["net"], x, rngs={"dropout": k})
    h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["u"]), None), x @ p["w"], None, length=2)
    h = jax.checkpoint(lambda h, r: jnp.tanh(h @ r))(h, p["r"])
    return jnp.mean(out ** 2 + h ** 2, axis=0)

  _, grads = mo.task_grads(loss_fn, params, x, key)
  _, fj = mo.factored_task_grads(loss_fn, params, x, key, factorize="always")
  kinds = jax.tree_util.tree_unflatten(fj.treedef, [fj.is_factored(l)
                                                    for l in range(fj.num_leaves)])
  assert kinds["w"] and not kinds["u"] and not kinds["r"]
  assert sum(jax.tree_util.tree_leaves(kinds["net"])) == 3   # the Dense kernels
  assert_same_jacobian(fj, grads)


def test_bfloat16_gram_and_update_accumulate_in_float32():
  """bfloat16 factors: the Gram matrix is float32 and matches the float32 reference."""
  params32 = mlp_params(jax.random.PRNGKey(18), d_in=6, width=64)
  x, y = mlp_data(batch=4)
  params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params32)
  _, grads32 = mo.task_grads(mlp_loss, params32, x, y)
  _, fj = mo.factored_task_grads(mlp_loss, params16, x.astype(jnp.bfloat16),
                                 y.astype(jnp.bfloat16), factorize="always")
  shared = [l for l in range(fj.num_leaves) if fj.is_factored(l) and l != 0]   # l1.w, l2.w
  gram = fj.gram(shared)
  assert gram.dtype == jnp.float32
  j = np.concatenate([np.asarray(g, np.float64).reshape(M, -1)
                      for g in (grads32["l1"]["w"], grads32["l2"]["w"])], axis=1)
  np.testing.assert_allclose(gram, j @ j.T, rtol=5e-2, atol=5e-2 * np.max(np.abs(j @ j.T)))
  w = jnp.array([0.5, 0.3, 0.2])
  got = fj.combine(w, shared[-1])
  assert got.dtype == jnp.bfloat16
  ref = np.tensordot(np.asarray(w), np.asarray(grads32["l2"]["w"], np.float64), axes=1)
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=5e-2,
                             atol=5e-2 * np.max(np.abs(ref)))
