"""mode="auto": the engine rule of make_train_step (mo.resolve_engine) and chunk_size="auto"."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax._src import task_grads as task_grads_lib

pytestmark = pytest.mark.accelerator   # run on the device by benchmarks.accelerator

M, B, K, D = 3, 4, 16, 12   # small batch, wide layer: the dense product is cheaper factored


def _mlp_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (K, D)) / 4, "heads": jax.random.normal(k2, (M, D)) / 4}


def _mlp_loss(params, x, y):
  z = jnp.tanh(x @ params["w"])
  return jnp.mean((z @ params["heads"].T - y) ** 2, axis=0)


def _conv_loss(params, x, y):
  z = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  z = jnp.mean(jnp.tanh(z), axis=(1, 2))
  return jnp.mean((z @ params["heads"].T - y) ** 2, axis=0)


def _mlp_batch():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((B, K)), jnp.float32),
          jnp.asarray(rng.standard_normal((B, M)), jnp.float32))


def _conv_problem():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((3, 3, 1, 4)) / 3, jnp.float32),
            "heads": jnp.asarray(rng.standard_normal((M, 4)) / 2, jnp.float32)}
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 1)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((2, M)), jnp.float32)
  return params, (x, y)


def _wide_problem():
  """A 64-wide layer at batch 4: all but 4 % of the parameters factored, extra ≈ 8 %."""
  rng = np.random.default_rng(2)
  wide = {"w": jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32),
          "heads": jnp.asarray(rng.standard_normal((M, 64)) / 8, jnp.float32)}
  x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((4, M)), jnp.float32)
  return wide, x, y


def _tx(name):
  kwargs = {"num_tasks": M} if name == "excess_mtl" else {}
  return optax.chain(getattr(mo, name)(**kwargs), optax.sgd(0.1))


@pytest.mark.parametrize("name, mode", [("mgda", "factored"), ("pcgrad", "factored"),
                                        ("upgrad", "factored"), ("config", "jacrev"),
                                        ("graddrop", "jacrev"), ("excess_mtl", "jacrev")])
def test_factored_only_for_gram_only_aggregators(name, mode):
  params, batch = _mlp_params(), _mlp_batch()
  tx = _tx(name)
  choice = mo.resolve_engine(_mlp_loss, params, *batch, tx=tx, opt_state=tx.init(params))
  assert choice.mode == mode, choice.reason


def test_stacked_without_cheaper_products_or_with_perturbation():
  params, batch = _mlp_params(), _mlp_batch()
  big = tuple(jnp.tile(a, (64, 1)) for a in batch)   # N = 256 > K: the Gram is dearer
  assert mo.resolve_engine(_mlp_loss, params, *big).mode == "jacrev"
  assert mo.resolve_engine(_mlp_loss, params, *batch).mode == "factored"
  choice = mo.resolve_engine(_mlp_loss, params, *batch, perturbation=True)
  assert choice.mode == "jacrev" and "flat" in choice.reason


def test_unknown_transformation_is_not_factored():
  params, batch = _mlp_params(), _mlp_batch()
  tx = optax.sgd(0.1)   # not an aggregator: its trace fails on stacked gradients' shapes
  choice = mo.resolve_engine(_mlp_loss, params, *batch, tx=tx, opt_state=tx.init(params))
  assert choice.mode == "jacrev"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule")
def test_chunking_vmapped_for_convolutions_sequential_for_dense_on_cpu():
  params, batch = _conv_problem()
  assert mo.resolve_engine(_conv_loss, params, *batch).chunk_size is None
  # Dense model, stacked rows (batch too large to factor): tasks in sequence.
  big = tuple(jnp.tile(a, (64, 1)) for a in _mlp_batch())
  assert mo.resolve_engine(_mlp_loss, _mlp_params(), *big).chunk_size == 1
  # Every dense layer factored, batch small for the widths: only cotangents
  # propagate, vmapped.
  wide, x, y = _wide_problem()
  choice = mo.resolve_engine(_mlp_loss, wide, x, y)
  assert (choice.mode, choice.chunk_size) == ("factored", None), choice.reason
  # Part of the parameters stays stacked (84 % factored): sequential.
  choice = mo.resolve_engine(_mlp_loss, _mlp_params(), *_mlp_batch())
  assert (choice.mode, choice.chunk_size) == ("factored", 1), choice.reason
  # A convolution nested in a jitted function (as Flax modules produce) is found too.
  nested = jax.jit(_conv_loss)
  assert mo.resolve_engine(nested, params, *batch).chunk_size is None
  jaxpr = jax.make_jaxpr(lambda p: nested(p, *batch))(params).jaxpr
  assert task_grads_lib.resolve_chunk_size("auto", "t", jaxpr) is None
  assert task_grads_lib.resolve_chunk_size("auto", "t") == 1
  assert task_grads_lib.resolve_chunk_size(2, "t", jaxpr) == 2


def test_task_grads_auto_chunking_same_gradients():
  params, batch = _conv_problem()
  l_auto, g_auto = mo.task_grads(_conv_loss, params, *batch)
  l_seq, g_seq = mo.task_grads(_conv_loss, params, *batch, chunk_size=1)
  np.testing.assert_allclose(l_auto, l_seq, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_seq)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mgda", "config"])
def test_auto_step_equals_explicit_engine(name, caplog):
  params, batch = _mlp_params(), _mlp_batch()
  tx = _tx(name)
  with caplog.at_level(logging.INFO, logger="mtl_optax"):
    auto = mo.make_train_step(_mlp_loss, tx)(params, tx.init(params), *batch)
  assert any("mtl_optax step engine" in r.getMessage() for r in caplog.records)
  explicit = mo.make_train_step(_mlp_loss, tx, mode="jacrev", chunk_size=1)(
      params, tx.init(params), *batch)
  for a, b in zip(jax.tree.leaves(auto[0]), jax.tree.leaves(explicit[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_auto_step_with_model_state():
  params, batch = _mlp_params(), _mlp_batch()

  def loss(p, state, x, y):
    return _mlp_loss(p, x * state["scale"], y), {"scale": state["scale"] + 1.0}

  tx = _tx("mgda")
  state = {"scale": jnp.ones(())}
  choice = mo.resolve_engine(loss, params, state, *batch, tx=tx, opt_state=tx.init(params),
                             has_state=True)
  assert choice.mode == "factored"
  out = mo.make_train_step(loss, tx, has_state=True)(params, tx.init(params), state, *batch)
  ref = mo.make_train_step(loss, tx, has_state=True, mode="jacrev")(
      params, tx.init(params), state, *batch)
  np.testing.assert_allclose(out[2]["scale"], 2.0)
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(ref[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_mode_is_rejected():
  with pytest.raises(ValueError, match="mode must be"):
    mo.make_train_step(_mlp_loss, _tx("mgda"), mode="fast")


def test_validation_batch_methods_stay_stacked():
  params, batch = _mlp_params(), _mlp_batch()
  tx = optax.chain(mo.auto_lambda(_mlp_loss, num_tasks=M), optax.sgd(0.1))
  opt_state = tx.init(params)
  choice = mo.resolve_engine(_mlp_loss, params, *batch, tx=tx, opt_state=opt_state,
                             tx_kwargs={"val_batch": batch})
  assert choice.mode == "jacrev", choice.reason
  step = mo.make_train_step(_mlp_loss, tx)
  new_params = step(params, opt_state, *batch, val_batch=batch)[0]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new_params))


def test_row_readers_use_factors_only_when_forming_rows_is_cheap():
  wide, x, y = _wide_problem()
  tx = _tx("config")
  # N(K + mD)/(mKD) = 4·(64 + 192)/(3·64·64) ≈ 8 % extra flops: factored, vmapped.
  choice = mo.resolve_engine(_mlp_loss, wide, x, y, tx=tx, opt_state=tx.init(wide))
  assert (choice.mode, choice.chunk_size) == ("factored", None), choice.reason
  # The default tiny MLP: 4·(16 + 36)/(3·16·12) ≈ 36 % extra: stacked rows.
  params = _mlp_params()
  choice = mo.resolve_engine(_mlp_loss, params, *_mlp_batch(), tx=tx, opt_state=tx.init(params))
  assert choice.mode == "jacrev", choice.reason
