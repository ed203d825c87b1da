"""task_grads equals explicit per-task jax.grad calls, in every mode."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo

pytestmark = pytest.mark.accelerator   # run on the device by benchmarks.accelerator

M = 3


def init_params(key, stacked_heads):
  k1, k2, k3 = jax.random.split(key, 3)
  trunk = {"w": jax.random.normal(k1, (4, 5)) * 0.5, "b": jnp.zeros(5)}
  if stacked_heads:  # all heads in one array, leading axis = task
    heads = {"w": jax.random.normal(k2, (M, 5, 2)) * 0.5}
  else:
    heads = {f"t{i}": jax.random.normal(k, (5, 2)) * 0.5
             for i, k in enumerate(jax.random.split(k3, M))}
  return {"trunk": trunk, "heads": heads}


def head_weight(params, i, stacked_heads):
  return params["heads"]["w"][i] if stacked_heads else params["heads"][f"t{i}"]


def make_loss_fn(stacked_heads):
  def loss_fn(params, x, y):
    z = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
    losses = [jnp.mean((z @ head_weight(params, i, stacked_heads) - y[i]) ** 2) * (i + 1)
              for i in range(M)]
    return jnp.stack(losses), {"z_mean": jnp.mean(z)}
  return loss_fn


def data():
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  y = jax.random.normal(jax.random.PRNGKey(2), (M, 8, 2))
  return x, y


def explicit(loss_fn, params, x, y):
  rows = [jax.grad(lambda p, i=i: loss_fn(p, x, y)[0][i])(params) for i in range(M)]
  return jax.tree.map(lambda *r: jnp.stack(r), *rows)


@pytest.mark.parametrize("stacked_heads", [False, True])
@pytest.mark.parametrize("mode,chunk_size", [("jacrev", None), ("jacrev", 2), ("jacrev", 1),
                                             ("jacrev", "auto"), ("vmap", None), ("vmap", 2),
                                             ("vmap", "auto")])
def test_equals_explicit_per_task_grads(stacked_heads, mode, chunk_size):
  params = init_params(jax.random.PRNGKey(0), stacked_heads)
  x, y = data()
  loss_fn = make_loss_fn(stacked_heads)
  (losses, aux), grads = jax.jit(
      lambda p: mo.task_grads(loss_fn, p, x, y, mode=mode, chunk_size=chunk_size, has_aux=True)
  )(params)
  want_losses, want_aux = loss_fn(params, x, y)
  chex.assert_trees_all_close(losses, want_losses, rtol=1e-6)
  chex.assert_trees_all_close(aux, want_aux, rtol=1e-6)
  chex.assert_trees_all_close(grads, explicit(loss_fn, params, x, y), rtol=1e-5, atol=1e-7)
  chex.assert_tree_shape_prefix(grads, (M,))


def test_without_aux_and_kwargs():
  params = init_params(jax.random.PRNGKey(0), False)
  x, y = data()
  loss_fn = make_loss_fn(False)
  f = lambda p, x, *, y: loss_fn(p, x, y)[0]
  losses, grads = mo.task_grads(f, params, x, y=y)
  chex.assert_trees_all_close(grads, explicit(loss_fn, params, x, y), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses, loss_fn(params, x, y)[0], rtol=1e-6)


def test_heads_get_their_own_gradient_rows():
  params = init_params(jax.random.PRNGKey(0), True)
  x, y = data()
  _, grads = mo.task_grads(lambda p: make_loss_fn(True)(p, x, y)[0], params)
  hw = np.asarray(grads["heads"]["w"])  # (task, head, 5, 2)
  for i in range(M):
    for j in range(M):
      assert (np.abs(hw[i, j]).max() > 0) == (i == j)


@pytest.mark.parametrize("bad,match", [
    (lambda p: jnp.sum(p["w"]), "shape \\(m,\\)"),
    (lambda p: jnp.ones((2, 2)) * jnp.sum(p["w"]), "shape \\(m,\\)"),
])
def test_bad_loss_fn_raises(bad, match):
  with pytest.raises(ValueError, match=match):
    mo.task_grads(bad, {"w": jnp.ones(3)})


def test_bad_arguments_raise():
  f = lambda p: p["w"]
  with pytest.raises(ValueError, match="mode"):
    mo.task_grads(f, {"w": jnp.ones(3)}, mode="forward")
  for bad in (0, -2, 1.5, True, "all"):
    with pytest.raises(ValueError, match="chunk_size must be a positive int, None or 'auto'"):
      mo.task_grads(f, {"w": jnp.ones(3)}, chunk_size=bad)
  with pytest.raises(TypeError, match="floating"):
    mo.task_grads(lambda p: jnp.arange(3), {"w": jnp.ones(3)})


def test_auto_chunk_size_is_sequential_on_cpu_only(monkeypatch):
  """"auto" = tasks in sequence (lax.map) on CPU, one vmapped call on accelerators."""
  from mtl_optax._src import task_grads as task_grads_lib
  resolve = task_grads_lib.resolve_chunk_size
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert resolve("auto", "t") == 1
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert resolve("auto", "t") is None
  assert resolve(None, "t") is None and resolve(3, "t") == 3
  # The program really differs: a scan (while loop) for sequence, none for one vmap.
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  params = init_params(jax.random.PRNGKey(0), False)
  x, y = data()
  loss_fn = make_loss_fn(False)
  jaxpr = lambda cs: str(jax.make_jaxpr(
      lambda p: mo.task_grads(loss_fn, p, x, y, chunk_size=cs, has_aux=True))(params))
  assert "scan" in jaxpr("auto") and "scan" in jaxpr(1) and "scan" not in jaxpr(None)
