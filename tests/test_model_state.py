"""Models with state (BatchNorm statistics, dropout) through every training path.

The semantics under test (``has_state=True``, ``make_nnx_train_step``):

* running statistics advance once per step, from the forward pass at θ on the
  whole batch — identical to a plain Flax step on the summed loss; with m tasks
  they are not updated m times;
* the perturbed passes of a flat (SAM) step never touch them, and normalise
  with the batch statistics at the perturbed point (training mode);
* dropout: fresh masks every step from the key in the state, one mask shared by
  every task's gradient within a step;
* evaluation mode uses the trained statistics.

References are plain Flax code: ``jax.grad`` of the summed loss with
``mutable=["batch_stats"]``, per-task ``jax.grad`` with the same dropout key,
``nnx.value_and_grad`` for NNX.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import mtl_optax as mo

M = 3
BATCH, D_IN, HIDDEN = 16, 6, 12
STEPS = 3
DROP = 0.25


def is_head(path, leaf):
  del leaf
  return "head" in jax.tree_util.keystr(path)


# --- a Linen model: Dense -> BatchNorm -> ReLU -> Dropout -> m heads ---------

class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    z = nn.Dense(HIDDEN, name="trunk")(x)
    z = nn.BatchNorm(use_running_average=not train, momentum=0.8, name="bn")(z)
    # Dropout before the ReLU so that the returned features show the mask alone.
    z = nn.Dropout(DROP, deterministic=not train)(z)
    outs = jnp.stack([nn.Dense(1, name=f"head_{i}")(nn.relu(z))[:, 0] for i in range(M)])
    return outs, z


LINEN = LinenNet()


def batches(n=STEPS, seed=0):
  out = []
  for k in jax.random.split(jax.random.PRNGKey(seed), n):
    kx, ky = jax.random.split(k)
    x = jax.random.normal(kx, (BATCH, D_IN)) * 2.0 + 1.0
    out.append((x, jax.random.normal(ky, (BATCH, M))))
  return out


def linen_losses(params, batch_stats, dropout_key, x, y, train=True):
  (pred, feats), updates = LINEN.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=train,
      mutable=["batch_stats"], rngs={"dropout": dropout_key})
  return jnp.mean((pred.T - y) ** 2, axis=0), updates["batch_stats"], feats


def linen_loss_fn(params, state, x, y):
  """The recipe of the docs: the dropout key lives in the model state."""
  key, dropout_key = jax.random.split(state["key"])
  losses, batch_stats, feats = linen_losses(params, state["batch_stats"], dropout_key, x, y)
  return losses, ({"batch_stats": batch_stats, "key": key}, feats)


def linen_init():
  variables = LINEN.init(jax.random.PRNGKey(1), batches(1)[0][0], train=False)
  return variables["params"], {"batch_stats": variables["batch_stats"],
                               "key": jax.random.PRNGKey(7)}


def plain_flax_steps(params, state, lr, data):
  """A plain Flax step on the mean loss (jax.grad, SGD), the reference trajectory."""
  history = []
  for x, y in data:
    key, dropout_key = jax.random.split(state["key"])

    def total(p, dropout_key=dropout_key, x=x, y=y):
      losses, stats, _ = linen_losses(p, state["batch_stats"], dropout_key, x, y)
      return jnp.mean(losses), stats

    g, stats = jax.grad(total, has_aux=True)(params)
    params = jax.tree.map(lambda p, d: p - lr * d, params, g)
    state = {"batch_stats": stats, "key": key}
    history.append((params, state))
  return history


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                        rtol=rtol, atol=atol), a, b)


def aggregator(name):
  if name == "flat_cagrad":
    return mo.flat(mo.cagrad(task_specific=is_head, num_tasks=M), task_specific=is_head)
  return getattr(mo, name)(task_specific=is_head, num_tasks=M)


PERTURB = mo.task_perturbation(0.05, 0.05, task_specific=is_head)

ENGINES = {
    "jacrev_seq": dict(mode="jacrev", chunk_size=1),
    "jacrev_vmap": dict(mode="jacrev", chunk_size=None),
    "vmap": dict(mode="vmap", chunk_size=None),
    "factored": dict(mode="factored", chunk_size=1),
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_linen_mean_step_equals_plain_flax_step(engine):
  """mean + SGD is the plain summed-loss step: parameters, statistics and key agree."""
  params, state = linen_init()
  data = batches()
  tx = optax.chain(mo.mean(), optax.sgd(0.1))
  step = mo.make_train_step(linen_loss_fn, tx, has_state=True, has_aux=True, **ENGINES[engine])
  opt_state = tx.init(params)
  want = plain_flax_steps(params, state, 0.1, data)
  for (x, y), (want_params, want_state) in zip(data, want):
    params, opt_state, state, losses, feats = step(params, opt_state, state, x, y)
    assert losses.shape == (M,) and feats.shape == (BATCH, HIDDEN)
  assert_trees_close(params, want_params)
  assert_trees_close(state["batch_stats"], want_state["batch_stats"])
  np.testing.assert_array_equal(jax.random.key_data(state["key"]) if jnp.issubdtype(
      state["key"].dtype, jax.dtypes.prng_key) else state["key"], want_state["key"])


def statistics_reference(param_history, state0, data):
  """Statistics of the forward pass at each recorded θ_t on batch t (train mode)."""
  state = state0
  for params, (x, y) in zip(param_history, data):
    (_, (state, _)) = linen_loss_fn(params, state, x, y)
  return state


@pytest.mark.parametrize("name,engine", [
    ("mgda", "jacrev_seq"), ("mgda", "factored"), ("mgda", "vmap"),
    ("cagrad", "jacrev_vmap"), ("nash_mtl", "jacrev_seq"), ("flat_cagrad", "jacrev_seq"),
    ("cagrad", "factored")])
def test_linen_statistics_come_from_one_forward_pass_per_step(name, engine):
  """After 3 steps the statistics are those of the forward passes at θ_0, θ_1, θ_2."""
  params, state = linen_init()
  state0, data = state, batches()
  tx = optax.chain(aggregator(name), optax.adam(1e-2))
  flat = name.startswith("flat")
  step = mo.make_train_step(linen_loss_fn, tx, has_state=True, has_aux=True,
                            perturbation=PERTURB if flat else None, **ENGINES[engine])
  opt_state = tx.init(params)
  history = []
  for x, y in data:
    history.append(params)
    params, opt_state, state, _, _ = step(params, opt_state, state, x, y)
  # The parameters moved (a frozen model would make the check vacuous).
  assert not np.allclose(history[-1]["trunk"]["kernel"], history[0]["trunk"]["kernel"])
  want = statistics_reference(history, state0, data)
  assert_trees_close(state["batch_stats"], want["batch_stats"])
  # Updated m times, the running mean would have moved further from its initial zeros.
  assert not np.allclose(state["batch_stats"]["bn"]["mean"], 0)


def test_flat_step_statistics_equal_vanilla_step_statistics():
  """The SAM passes at θ + ε_i leave the statistics (and the key) alone."""
  params, state = linen_init()
  x, y = batches(1)[0]
  out = {}
  for name in ("cagrad", "flat_cagrad"):
    tx = optax.chain(aggregator(name), optax.sgd(0.1))
    step = mo.make_train_step(linen_loss_fn, tx, has_state=True, has_aux=True, chunk_size=1,
                              perturbation=PERTURB if name == "flat_cagrad" else None)
    out[name] = step(params, tx.init(params), state, x, y)
  new_params = {k: v[0] for k, v in out.items()}
  assert not np.allclose(new_params["cagrad"]["trunk"]["kernel"],
                         new_params["flat_cagrad"]["trunk"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, out["cagrad"][2], out["flat_cagrad"][2])


@pytest.mark.parametrize("chunk_size", [1, None])
def test_sam_gradients_use_batch_statistics_and_the_steps_dropout_mask(chunk_size):
  """g_i^SAM = ∇L_i(θ + ε_i) in training mode, with the unperturbed pass's dropout key."""
  params, state = linen_init()
  x, y = batches(1)[0]
  (losses, (new_state, _)), grads, sam = mo.sharpness_aware_task_grads(
      linen_loss_fn, params, state, x, y, perturbation=PERTURB, has_state=True, has_aux=True,
      chunk_size=chunk_size)
  _, dropout_key = jax.random.split(state["key"])
  offsets, _ = PERTURB.update(grads, PERTURB.init(params), params)
  for i in range(M):
    eps_i = jax.tree.map(lambda e, i=i: e[i], offsets)
    point = jax.tree.map(jnp.add, params, eps_i)
    # A fresh batch-statistics pass at the perturbed point; its update is thrown away.
    f = lambda p, i=i: linen_losses(p, state["batch_stats"], dropout_key, x, y)[0][i]
    want = jax.grad(f)(point)
    assert_trees_close(jax.tree.map(lambda g, i=i: g[i], sam), want, rtol=1e-5, atol=1e-6)
    # And the loss gradient at θ, per task, with the same mask.
    want_g = jax.grad(f)(params)
    assert_trees_close(jax.tree.map(lambda g, i=i: g[i], grads), want_g, rtol=1e-5, atol=1e-6)
  want_losses, want_stats, _ = linen_losses(params, state["batch_stats"], dropout_key, x, y)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  assert_trees_close(new_state["batch_stats"], want_stats)
  if chunk_size == 1:
    # The sharpness metric on the same stateful loss: L_i(θ + ε_i) − L_i(θ), batch statistics.
    sharp = mo.metrics.sharpness(linen_loss_fn, params, state, x, y, rho_shared=0.05,
                                 task_specific=is_head, has_state=True, has_aux=True)
    want_sharp = [linen_losses(jax.tree.map(lambda p, e, i=i: p + e[i], params, offsets),
                               state["batch_stats"], dropout_key, x, y)[0][i] - want_losses[i]
                  for i in range(M)]
    np.testing.assert_allclose(sharp, want_sharp, rtol=1e-4, atol=1e-6)


def test_dropout_masks_fresh_every_step_and_shared_by_tasks():
  params, state = linen_init()
  x, y = batches(1)[0]
  tx = optax.chain(mo.mgda(task_specific=is_head, num_tasks=M), optax.sgd(0.0))
  step = mo.make_train_step(linen_loss_fn, tx, has_state=True, has_aux=True)
  opt_state = tx.init(params)
  masks, keys = [], []
  for _ in range(2):
    keys.append(state["key"])
    params, opt_state, state, _, feats = step(params, opt_state, state, x, y)
    masks.append(np.asarray(feats) != 0)
  assert 0.5 < masks[0].mean() < 0.95          # about 1 - DROP kept
  assert (masks[0] != masks[1]).mean() > 0.1    # a new mask at the next step
  # Within a step every task's gradient saw the step's one mask: the stacked rows equal
  # per-task jax.grad with that key (another mask per task would change the rows).
  (_, (_, feats)), grads = mo.task_grads(linen_loss_fn, params, {**state, "key": keys[1]},
                                         x, y, has_state=True, has_aux=True, mode="vmap")
  np.testing.assert_array_equal(np.asarray(feats) != 0, masks[1])
  _, dropout_key = jax.random.split(keys[1])
  for i in range(M):
    want = jax.grad(lambda p, i=i: linen_losses(p, state["batch_stats"], dropout_key,
                                                x, y)[0][i])(params)
    assert_trees_close(jax.tree.map(lambda g, i=i: g[i], grads), want, rtol=1e-5, atol=1e-6)


def test_linen_eval_mode_uses_the_trained_statistics():
  params, state = linen_init()
  tx = optax.chain(mo.mgda(task_specific=is_head, num_tasks=M), optax.adam(1e-2))
  step = mo.make_train_step(linen_loss_fn, tx, has_state=True, has_aux=True)
  opt_state = tx.init(params)
  for x, y in batches():
    params, opt_state, state, _, _ = step(params, opt_state, state, x, y)
  x = batches(1, seed=5)[0][0]
  variables = {"params": params, "batch_stats": state["batch_stats"]}
  pred, feats = LINEN.apply(variables, x, train=False)
  # By hand: the running statistics, no dropout.
  bs, p = state["batch_stats"]["bn"], params["bn"]
  h = x @ params["trunk"]["kernel"] + params["trunk"]["bias"]
  h = (h - bs["mean"]) / jnp.sqrt(bs["var"] + 1e-5) * p["scale"] + p["bias"]
  np.testing.assert_allclose(feats, h, rtol=1e-5, atol=1e-5)
  assert pred.shape == (M, BATCH)


def test_perturbation_groups_never_split_the_state():
  """Float state goes to every group whole; the new state is the groups' mean."""
  params, state = linen_init()
  x, y = batches(1)[0]
  groups = 2

  def loss_fn(p, s, x, y):   # batch statistics only, no dropout key
    losses, stats, _ = linen_losses(p, s, jax.random.PRNGKey(0), x, y)
    return losses, stats

  (losses, new_stats), _, _ = mo.sharpness_aware_task_grads(
      loss_fn, params, state["batch_stats"], x, y, perturbation=PERTURB, has_state=True,
      perturbation_groups=groups)
  # HIDDEN = 12 statistics would be split by 2 along axis 0 if treated as batch.
  assert new_stats["bn"]["mean"].shape == (HIDDEN,)
  parts = [loss_fn(params, state["batch_stats"], xg, yg)
           for xg, yg in zip(jnp.split(x, groups), jnp.split(y, groups))]
  want = jax.tree.map(lambda *s: sum(s) / groups, *[s for _, s in parts])
  assert_trees_close(new_stats, want)
  np.testing.assert_allclose(losses, sum(l for l, _ in parts) / groups, rtol=1e-6)
  with pytest.raises(ValueError, match="non-floating leaf"):
    mo.sharpness_aware_task_grads(linen_loss_fn, params, state, x, y, perturbation=PERTURB,
                                  has_state=True, has_aux=True, perturbation_groups=groups)


def test_stateful_errors_are_clear():
  params, state = linen_init()
  x, y = batches(1)[0]
  with pytest.raises(ValueError, match="model state as the first argument"):
    mo.task_grads(linen_loss_fn, params, has_state=True)
  bad = lambda p, s, x, y: linen_loss_fn(p, s, x, y)[0]   # forgets the new state
  with pytest.raises(ValueError, match=r"must return \(losses, new_model_state\)"):
    mo.task_grads(bad, params, state, x, y, has_state=True)
  with pytest.raises(ValueError, match=r"\(losses, \(new_model_state, aux\)\)"):
    mo.factored_task_grads(lambda p, s, x, y: (bad(p, s, x, y), s), params, state, x, y,
                           has_state=True, has_aux=True)
  tx = optax.chain(mo.mean(), optax.sgd(0.1))
  step = mo.make_train_step(linen_loss_fn, tx, has_state=True, has_aux=True)
  with pytest.raises(ValueError, match="model_state"):
    step(params, tx.init(params))
  with pytest.raises(ValueError, match="do not pass has_state"):
    mo.make_nnx_train_step(lambda model: None, tx, has_state=True)
  with pytest.raises(ValueError, match="has_state is not supported"):
    mo.multi_batch_task_grads(linen_loss_fn, params, [(state, x, y)] * 3, has_state=True)


# --- NNX: nnx.BatchNorm, nnx.Dropout and nnx.Rngs inside the model ---------

class NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
    self.bn = nnx.BatchNorm(HIDDEN, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(DROP, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(HIDDEN, 1, rngs=rngs) for _ in range(M)]) if hasattr(
        nnx, "List") else [nnx.Linear(HIDDEN, 1, rngs=rngs) for _ in range(M)]

  def __call__(self, x):
    z = self.drop(self.bn(self.trunk(x)))
    return jnp.stack([h(nnx.relu(z))[:, 0] for h in self.heads]), z


def nnx_loss_fn(model, x, y):
  pred, feats = model(x)
  return jnp.mean((pred.T - y) ** 2, axis=0), feats


def nnx_plain_step(model, x, y, lr):
  """A plain NNX step on the mean loss: nnx.value_and_grad, SGD by hand."""
  grads = nnx.grad(lambda mdl: jnp.mean(nnx_loss_fn(mdl, x, y)[0]))(model)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, g: p - lr * g, params, grads))


def _nnx_state(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.Param)),
                      is_leaf=lambda v: isinstance(v, jax.Array))


def _array_leaves(tree):
  return [np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
                     else v) for v in jax.tree.leaves(tree)]


@pytest.mark.parametrize("mode", ["jacrev", "factored"])
def test_nnx_mean_step_equals_plain_nnx_step(mode):
  ours, ref = NnxNet(nnx.Rngs(0)), NnxNet(nnx.Rngs(0))
  tx = optax.chain(mo.mean(), optax.sgd(0.1))
  step = mo.make_nnx_train_step(nnx_loss_fn, tx, has_aux=True, mode=mode)
  opt_state = tx.init(nnx.state(ours, nnx.Param))
  plain = nnx.jit(nnx_plain_step, static_argnums=3)
  for x, y in batches():
    opt_state, losses, feats = step(ours, opt_state, x, y)
    plain(ref, x, y, 0.1)
  for a, b in zip(_array_leaves(nnx.state(ours)), _array_leaves(nnx.state(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert not np.allclose(ours.bn.mean[...], 0)


@pytest.mark.parametrize("name", ["mgda", "cagrad", "nash_mtl", "flat_cagrad"])
def test_nnx_statistics_and_rng_advance_once_per_step(name):
  model = NnxNet(nnx.Rngs(0))
  flat = name.startswith("flat")
  tx = optax.chain(aggregator(name), optax.adam(1e-2))
  step = mo.make_nnx_train_step(nnx_loss_fn, tx, has_aux=True,
                                perturbation=PERTURB if flat else None)
  opt_state = tx.init(nnx.state(model, nnx.Param))
  masks = []
  for x, y in batches():
    # Reference: one train-mode forward pass of a copy of the model at this θ.
    copy = nnx.clone(model)
    _, want_feats = nnx_loss_fn(copy, x, y)
    opt_state, losses, feats = step(model, opt_state, x, y)
    np.testing.assert_allclose(feats, want_feats, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.bn.mean[...], copy.bn.mean[...], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.bn.var[...], copy.bn.var[...], rtol=1e-6, atol=1e-7)
    for a, b in zip(_array_leaves(nnx.state(model, nnx.RngState)),
                    _array_leaves(nnx.state(copy, nnx.RngState))):
      np.testing.assert_array_equal(a, b)
    masks.append(np.asarray(feats) != 0)
    assert np.all(np.isfinite(losses))
  assert (masks[0] != masks[1]).mean() > 0.1
  # Evaluation mode: running statistics, no dropout, deterministic.
  model.eval()
  x = batches(1, seed=5)[0][0]
  out1, feats = model(x)
  out2, _ = model(x)
  np.testing.assert_array_equal(out1, out2)
  h = model.trunk(x)
  h = (h - model.bn.mean[...]) / jnp.sqrt(model.bn.var[...] + 1e-5)
  h = h * model.bn.scale[...] + model.bn.bias[...]
  np.testing.assert_allclose(feats, h, rtol=1e-5, atol=1e-5)
  model.train()
