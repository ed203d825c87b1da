"""Tests of the multi-task ResNet (`mtl_optax.models`): shapes, parameters,
the fast CPU path against `flax.linen.Conv`, BatchNorm state, a training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")

import mtl_optax as mo  # noqa: E402
from mtl_optax import models  # noqa: E402

TINY = dict(width=4, stage_sizes=(1, 1, 1, 1), head_sizes=(10, 3))


def _images(n=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((n, 36, 36, 1), np.float32))


@pytest.fixture(scope="module")
def tiny():
  fast = models.MultiTaskResNet(**TINY, conv_impl="patches")
  ref = models.MultiTaskResNet(**TINY, conv_impl="flax")
  variables = jax.jit(lambda k, x: fast.init(k, x, train=False))(jax.random.key(0), _images(2))
  return fast, ref, variables


def _everything(model, variables, x):
  """One compilation per model: train outputs, new stats, eval outputs, grads."""
  def f(v):
    outs, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    moved = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    evals = model.apply(moved, x, train=False)
    eval_first = model.apply(moved, x[:1], train=False)
    eval_init = model.apply(v, x, train=False)
    train_pair = model.apply(v, x[:2], train=True, mutable=["batch_stats"])[0]

    def loss(p):
      o, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
      return sum(jnp.sum(t ** 2) for t in o)
    return dict(outs=outs, stats=upd["batch_stats"], evals=evals, eval_first=eval_first,
                eval_init=eval_init, train_pair=train_pair,
                grads=jax.grad(loss)(v["params"]))
  return jax.jit(f)(variables)


@pytest.fixture(scope="module")
def results(tiny):
  fast, ref, variables = tiny
  x = _images(4, seed=1)
  return _everything(fast, variables, x), _everything(ref, variables, x)


def test_output_shapes_and_parameter_tree(tiny, results):
  fast, ref, variables = tiny
  assert set(variables) == {"params", "batch_stats"}
  params = variables["params"]
  assert set(params) == {"encoder", "heads"}
  assert set(params["heads"]) == {"task0", "task1"}
  assert set(variables["batch_stats"]) == {"encoder"}     # the heads have no state
  enc = params["encoder"]
  assert {"conv1", "bn1", "fc", "stage0_block0", "stage3_block0"} <= set(enc)
  assert enc["conv1"]["conv"]["kernel"].shape == (7, 7, 1, 4)
  assert enc["stage3_block0"]["conv2"]["conv"]["kernel"].shape == (3, 3, 32, 32)
  assert "down_conv" in enc["stage1_block0"] and "down_conv" not in enc["stage0_block0"]
  assert enc["fc"]["kernel"].shape == (32, 100)
  assert params["heads"]["task1"]["kernel"].shape == (100, 3)
  # Both implementations declare the same parameters.
  ref_vars = jax.eval_shape(lambda: ref.init(jax.random.key(0), _images(2), train=False))
  assert (jax.tree_util.tree_structure(ref_vars)
          == jax.tree_util.tree_structure(variables))
  assert [o.shape for o in results[0]["outs"]] == [(4, 10), (4, 3)]
  assert [o.shape for o in results[0]["eval_first"]] == [(1, 10), (1, 3)]


def test_resnet18_matches_the_fs_mtl_network():
  # torchvision resnet18 with a 1-channel 7x7 conv1, fc 512 -> 100, 2 heads 100 -> 10:
  # 11 689 512 - 9 408 (3-channel conv1) + 3 136 - 513 000 (fc 512 -> 1000)
  # + 51 300 + 2 * 1 010 parameters (BatchNorm scales and offsets included).
  model = models.multi_task_resnet18()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _images(2), train=False))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
  assert n == 11_689_512 - 9_408 + 3_136 - 513_000 + 51_300 + 2 * 1_010
  outs = jax.eval_shape(lambda v: model.apply(v, _images(2), train=False), shapes)
  assert [o.shape for o in outs] == [(2, 10), (2, 10)]
  small = models.multi_task_resnet_small(num_tasks=3)
  assert small.width == 16 and tuple(small.stage_sizes) == (1, 1, 1, 1)
  assert tuple(small.head_sizes) == (10, 10, 10)


def test_fast_path_equals_flax_conv_path(results):
  fast, ref = results
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for key in ("outs", "stats", "evals", "eval_first", "eval_init", "train_pair"):
    jax.tree_util.tree_map(close, fast[key], ref[key])     # train and eval modes
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         fast["grads"], ref["grads"])


def test_batch_norm_state(tiny, results):
  _, _, variables = tiny
  r = results[0]
  old = variables["batch_stats"]["encoder"]["bn1"]
  new = r["stats"]["encoder"]["bn1"]
  # Running statistics move towards the batch statistics (momentum 0.9).
  assert not np.allclose(old["mean"], new["mean"])
  assert not np.allclose(old["var"], new["var"])
  # Eval mode uses the running averages: per-example outputs, which depend on the stats.
  np.testing.assert_allclose(r["evals"][0][:1], r["eval_first"][0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(r["eval_init"][0], r["evals"][0], atol=1e-4)
  # Train mode normalises with the batch: an example's output depends on the others.
  assert not np.allclose(r["outs"][0][:2], r["train_pair"][0], atol=1e-4)


def test_make_train_step_with_state_mgda(tiny):
  fast, _, variables = tiny
  x = _images(4, seed=3)
  labels = (jnp.array([1, 2, 3, 4]), jnp.array([0, 1, 2, 0]))

  def loss_fn(params, state, images, labels):
    outs, upd = fast.apply({"params": params, "batch_stats": state["batch_stats"]}, images,
                           train=True, mutable=["batch_stats"])
    losses = jnp.stack([optax.softmax_cross_entropy_with_integer_labels(o, y).mean()
                        for o, y in zip(outs, labels)])
    return losses, {"batch_stats": upd["batch_stats"]}

  tx = optax.chain(mo.mgda(), optax.sgd(0.1))
  step = mo.make_train_step(loss_fn, tx, has_state=True)
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  new_params, _, new_state, losses, aux = step(params, tx.init(params), state, x, labels)
  assert losses.shape == (2,) and np.all(np.isfinite(losses)) and aux is None
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  assert not np.allclose(new_state["batch_stats"]["encoder"]["bn1"]["mean"],
                         state["batch_stats"]["encoder"]["bn1"]["mean"])
  assert not np.allclose(new_params["encoder"]["fc"]["kernel"],
                         params["encoder"]["fc"]["kernel"])
