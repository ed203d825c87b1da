"""Smoke test of examples/instance_wise_risk.py (IWRM) at a tiny size."""

import importlib.util
import pathlib

import numpy as np


def load_example():
  path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "instance_wise_risk.py"
  spec = importlib.util.spec_from_file_location("instance_wise_risk", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_instance_wise_risk_example_runs(capsys):
  example = load_example()
  results = example.main(["--batch", "8", "--steps", "4", "--n-train", "32"])
  assert set(results) == {"mean", "upgrad", "mgda"}
  for name, r in results.items():
    for key in ("train_mse", "train_worst", "test_mse"):
      assert np.isfinite(r[key]) and r[key] >= 0, (name, key)
    assert r["train_worst"] >= r["train_mse"]
  assert "m = 8 tasks per step" in capsys.readouterr().out
