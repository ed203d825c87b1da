"""The flat-vs-vanilla study (benchmarks.flat): quick path end to end, shifted composites."""

import json

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")

from benchmarks import flat  # noqa: E402
from mtl_optax import datasets  # noqa: E402


def test_digits_composites_shapes_and_labels():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = datasets.digits_composites("CL_RR", n=64, seed=3)
  assert d.images.shape == (64, 36, 36, 1) and d.images.dtype == np.float32
  assert 0.0 <= d.images.min() and d.images.max() <= 1.0
  labels = load_digits().target
  np.testing.assert_array_equal(d.targets[0], labels[d.left_index])
  np.testing.assert_array_equal(d.left_label, labels[d.left_index])
  np.testing.assert_array_equal(d.right_label, labels[d.right_index])
  assert d.targets[1].shape == (64, 784) and d.targets[1].dtype == np.float32
  assert np.all(d.left_index != d.right_index)
  assert np.all(np.abs(d.shifts) <= 2)
  # Composed as multi_mnist composes: the pixel-wise max of the two pasted digits, so the
  # left digit (unshifted upsampled image, placed at its offset) lies under the composite.
  digits = d.targets[1].reshape(-1, 28, 28)   # the right digits, unshifted
  i = 0
  r, c = 8 + d.shifts[i, 1]
  canvas = np.zeros((40, 40), np.float32)
  canvas[2 + r:2 + r + 28, 2 + c:2 + c + 28] = digits[i]
  assert np.all(d.images[i, :, :, 0] + 1e-6 >= canvas[2:38, 2:38])
  # Deterministic given the seed; another seed gives other pairs.
  again = datasets.digits_composites("CL_RR", n=64, seed=3)
  np.testing.assert_array_equal(again.images, d.images)
  other = datasets.digits_composites("CL_CR", n=64, seed=4)
  assert other.targets[1].shape == (64,)
  assert not np.array_equal(other.left_index, d.left_index)


def test_flat_quick_end_to_end(tmp_path):
  res = flat.main(["--quick", "--out", str(tmp_path)])
  with open(tmp_path / "flat_quick.json") as f:
    saved = json.load(f)
  runs = saved["tasks"]["CL_CR"]["runs"]
  assert set(runs) == {"mean/vanilla", "mean/flat-authors", "mean/direct-authors"}
  for key, by_seed in runs.items():
    r = by_seed["0"]
    for split in ("test", "shift"):
      assert len(r[split]["metrics"]) == 2, key
      assert all(np.isfinite(r[split][k]).all() for k in ("ece", "brier", "nll", "entropy"))
      assert sum(map(sum, r[split]["reliability"]["count"])) == 2 * 64
    assert np.asarray(r["robustness"]["mean"]).shape == (len(flat.NOISE_RADII), 2)
    assert np.asarray(r["landscape"]["train"]).shape == (flat.LANDSCAPE_ALPHAS, 2)
    assert np.asarray(r["sharpness"]["plain_loss_increase"]).shape == (3, 2)
  # For the uniform mean, A(g + h) = A(g) + A(h): direct and decomposed are one method.
  np.testing.assert_allclose(runs["mean/direct-authors"]["0"]["test"]["metrics"],
                             runs["mean/flat-authors"]["0"]["test"]["metrics"], atol=1e-6)
  gaps = res["tasks"]["CL_CR"]["paired_gaps"]
  assert {(g["arm"], g["metric"]) for g in gaps} >= {("flat-authors", "acc"),
                                                     ("flat-authors", "ece")}
  for name in ("gaps", "reliability", "robustness", "landscape", "sharpness"):
    assert (tmp_path / f"flat_quick_CL_CR_{name}.png").exists()
