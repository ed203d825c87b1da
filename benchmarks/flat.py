"""Flat (sharpness-aware) vs vanilla MTL in the authors' regime: accuracy, calibration, robustness.

    python -m benchmarks.flat --tasks CL_CR --encoder resnet_small \
        --methods mean,mgda,pcgrad,cagrad,imtl,nash_mtl,fairgrad --settings both --seeds 3 \
        --epochs 15 --n-train 2000 [--ablation cagrad] [--quick] [--tag T] [--out DIR]

For every method A and seed s this trains, from the same initialisation and
the same data order (so every comparison is *paired over seeds*):

* ``vanilla``: A on the loss gradients (``mo.task_grads``);
* ``flat-authors``: ``mo.flat(A)`` at Phan et al.'s multi-MNIST setting
  (adaptive SAM, ρ = 2, one norm over shared + head leaves);
* ``flat-plain``: ``mo.flat(A)`` with plain SAM (ρ = 0.05, separate norms);
* ``direct-authors`` (methods in ``--ablation``): ``mo.flat(A, "direct")``,
  A applied to the SAM gradients themselves (the authors' ``a-`` variants),
  against the decomposed A(g) + A(h) at the same setting.

Protocol: the ``benchmarks.multimnist`` Trainer (a jitted epoch scan, BatchNorm
statistics carried as model state), Adam at one learning rate (no grid: the
same rate for every arm), the parameters of the best validation epoch (score =
mean over tasks of accuracy, or 1 − MSE / Var(target) for reconstruction).
At that epoch, on the in-domain test set and on a *shifted* test set
(``mtl_optax.datasets.digits_composites``: the same composites built from
scikit-learn's 8x8 ``load_digits``, upsampled):

* per-task accuracy (MSE for reconstruction) and Δm% against the vanilla
  uniform-loss (``mean``) runs (mean over seeds; ``mean`` is always run);
* for classification heads: ECE (15 bins), Brier, NLL, mean predictive
  entropy and the reliability diagram;
* accuracy of the classification heads under weight noise
  (``mo.metrics.noise_robustness``, filter-normalised directions, so a radius r
  moves every filter by r times its own norm: comparable between a flat and a
  vanilla model whose weight norms differ);
* sharpness L_i(θ + ε_i) − L_i(θ) and ‖g_i^SAM − g_i‖ (``mo.metrics.sharpness``)
  at plain radii (0.02, 0.05, 0.1) and at the adaptive radii (0.5, 2) on a
  fixed training batch, in inference mode; the plain ρ = 0.05 value also
  every epoch (sharpness over training);
* a 1-D slice of the training and test losses along a filter-normalised
  direction (the same random draw for every arm of a seed; seed 0 is plotted).

Outputs ``<out>/flat_<tag>.json`` (every number, per seed, written after each
method so a partial run keeps its results), ``flat_<tag>_*.png`` (paired gaps,
reliability diagrams, robustness curves, landscape slices, sharpness over
training) and prints the paired-gap table. ``--report JSON`` re-renders the
tables and figures from a results file.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import mtl_optax as mo
from benchmarks import models
from benchmarks import multimnist
from benchmarks import registry

RESULTS_DIR = multimnist.RESULTS_DIR

# SAM settings of the flat arms.
SETTINGS = {
    "authors": dict(rho=2.0, adaptive=True, sam_norm="joint"),   # FS-MTL multi-MNIST
    "plain": dict(rho=0.05, adaptive=False, sam_norm="separate"),  # Foret et al.'s SAM
}
ECE_BINS = 15
PLAIN_RHOS = (0.02, 0.05, 0.1)
ADAPTIVE_RHOS = (0.5, 2.0)
NOISE_RADII = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
LANDSCAPE_ALPHAS = 21
# (name, higher is better; None: no preferred direction) of the paired-gap table.
GAP_METRICS = (("acc", True), ("delta_m", True), ("ece", False), ("brier", False),
               ("nll", False), ("entropy", None))


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------

def load_shifted(task: str, n: int, seed: int = 0) -> multimnist.Split:
  """The load_digits composites of ``task`` as a `multimnist.Split`."""
  from mtl_optax import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.digits_composites(task, n, seed=seed)
  return multimnist.Split(np.asarray(d.images, np.float32),
                          tuple(np.asarray(t) for t in d.targets))


def _quality(val: np.ndarray, kinds, target_var) -> np.ndarray:
  """Per task, higher is better: accuracy, or 1 − MSE / Var(target) (an R²)."""
  return np.array([v if k == "CL" else 1.0 - v / tv
                   for v, k, tv in zip(val, kinds, target_var)])


# ---------------------------------------------------------------------------
# Measurements (jitted once per model).
# ---------------------------------------------------------------------------

def _calibration(logits, labels) -> dict:
  """ECE / Brier / NLL / entropy per classification head, reliability bins (traceable)."""
  rd = mo.metrics.reliability_diagram(logits, labels, ECE_BINS)
  ent = mo.metrics.predictive_entropy(logits, reduction="none")
  edges = jnp.linspace(0.0, math.log(10), 21)
  hist = jax.vmap(lambda e: jnp.histogram(e, bins=edges)[0])(ent)
  return {"ece": mo.metrics.expected_calibration_error(logits, labels, ECE_BINS),
          "brier": mo.metrics.brier_score(logits, labels),
          "nll": mo.metrics.negative_log_likelihood(logits, labels),
          "entropy": jnp.mean(ent, -1),
          "reliability": {"confidence": rd.confidence, "accuracy": rd.accuracy,
                          "count": rd.count},
          "entropy_hist": hist}


def _chunks(n: int) -> int:
  """The largest divisor of n up to 500 (evaluation in equal chunks, no padding)."""
  return max(d for d in range(1, min(n, 500) + 1) if n % d == 0)


@functools.lru_cache(maxsize=None)
def _measures(model: models.MultiTaskModel):
  """Jitted measurements of ``model`` in inference mode (running BatchNorm statistics).

  Everything measured at the selected epoch is one compiled program: measured
  eagerly, dozens of small programs are compiled per shape, which dominates a
  short run.
  """
  cl = tuple(i for i, k in enumerate(model.tasks) if k == "CL")

  def eval_losses(params, ms, batch):
    return model.task_losses(params, batch, ms or None)

  def cl_logits(params, ms, images):
    """(len(cl), N, 10) logits of the classification heads, in chunks."""
    n = images.shape[0]
    chunk = _chunks(n)
    imgs = images.reshape(n // chunk, chunk, *images.shape[1:])

    def one(x):
      z = model.encode(params["encoder"], model.inputs(x), ms or None)
      return jnp.stack([model.head(i, params["heads"][f"task{i}"], z) for i in cl])
    out = jax.lax.map(one, imgs)                      # (k, len(cl), chunk, 10)
    return jnp.moveaxis(out, 1, 0).reshape(len(cl), n, -1)

  def task_metrics(params, ms, images, targets):
    n = images.shape[0]
    chunk = _chunks(n)
    imgs = images.reshape(n // chunk, chunk, *images.shape[1:])
    tg = tuple(t.reshape(n // chunk, chunk, *t.shape[1:]) for t in targets)
    return jax.lax.map(lambda xs: model.task_metrics(
        params, {"images": xs[0], "targets": xs[1]}, ms or None), (imgs, tg)).mean(0)

  def sharp(params, ms, batch, rhos, adaptive, norm):
    return mo.metrics.sharpness(eval_losses, params, ms, batch, rhos=rhos, adaptive=adaptive,
                                norm=norm, task_specific=multimnist.heads_mask,
                                grad_diff_norm=True, chunk_size=1)

  @jax.jit
  def final(params, ms, probes, sets, key):
    out: dict[str, Any] = {}
    for split, (images, targets) in sets.items():
      res: dict[str, Any] = {"metrics": task_metrics(params, ms, images, targets)}
      if cl:
        res.update(_calibration(cl_logits(params, ms, images),
                                jnp.stack([targets[i] for i in cl])))
      out[split] = res
    plain = sharp(params, ms, probes["train"], jnp.asarray(PLAIN_RHOS), False, "separate")
    adapt = sharp(params, ms, probes["train"], jnp.asarray(ADAPTIVE_RHOS), True, "joint")
    out["sharpness"] = {"plain_loss_increase": plain.loss_increase,
                        "plain_grad_diff_norm": plain.grad_diff_norm,
                        "adaptive_loss_increase": adapt.loss_increase,
                        "adaptive_grad_diff_norm": adapt.grad_diff_norm}
    k_noise, k_land = jax.random.split(key)
    rob = mo.metrics.noise_robustness(
        lambda p: model.task_metrics(p, probes["test"], ms or None), params, k_noise,
        jnp.asarray(NOISE_RADII), num_directions=5, direction="filter")   # (R, D, m)
    out["robustness"] = {"mean": rob.mean(1), "std": rob.std(1)}
    d = mo.metrics.filter_normalized_direction(k_land, params)
    alphas = jnp.linspace(-1.0, 1.0, LANDSCAPE_ALPHAS)
    out["landscape"] = {"alphas": alphas, **{
        s: mo.metrics.loss_landscape_1d(eval_losses, params, d, alphas, ms, probes[s])
        for s in ("train", "test")}}
    return out

  @jax.jit
  def per_epoch(params, ms, val, test, probe):
    """Validation and test metrics and the plain ρ = 0.05 sharpness, one program."""
    return (task_metrics(params, ms, *val), task_metrics(params, ms, *test),
            sharp(params, ms, probe, jnp.asarray([0.05]), False, "separate").loss_increase[0])

  return dict(cl=cl, final=final, per_epoch=per_epoch)


def _tolist(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), tree)


# ---------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------

def train_and_measure(trainer: multimnist.Trainer, model: models.MultiTaskModel, dev: dict,
                      probes: dict, *, seed: int, epochs: int, lr: float, kinds,
                      target_var) -> dict:
  """Trains one arm (params at the best validation epoch) and measures it."""
  meas = _measures(model)
  t0 = time.perf_counter()
  params, opt_state, ms = trainer.init(seed)
  key = jax.random.key(10_000 + seed)   # the multimnist data order: identical for every arm
  hist: dict[str, list] = {"val": [], "test": [], "loss": [], "sharp_plain_0.05": [],
                           "weights": []}
  best = (-math.inf, -1, params, ms)
  diverged = False
  for e in range(epochs):
    key, sub = jax.random.split(key)
    params, opt_state, ms, stats = trainer.epoch_fn(
        params, opt_state, ms, sub, jnp.float32(lr), jnp.int32(e), *dev["train"])
    val, test, sh = meas["per_epoch"](params, ms, dev["val"], dev["test"], probes["train"])
    val = np.asarray(val, np.float64)
    hist["val"].append(val.tolist())
    hist["test"].append(np.asarray(test, np.float64).tolist())
    hist["loss"].append(np.asarray(stats["loss"], np.float64).tolist())
    hist["weights"].append(np.asarray(stats["weights"], np.float64).tolist())
    hist["sharp_plain_0.05"].append(np.asarray(sh, np.float64).tolist())
    score = float(np.mean(_quality(val, kinds, target_var)))
    if not bool(stats["finite"]) or not np.all(np.isfinite(val)):
      diverged = True
      break
    if score > best[0]:
      # Arrays are immutable and the epoch does not donate its inputs: keeping
      # references is a snapshot.
      best = (score, e, params, ms)
  train_seconds = time.perf_counter() - t0
  score, best_epoch, params, ms = best
  # The same key for every arm of a seed: the same noise and landscape directions.
  measured = _tolist(meas["final"](params, ms, probes,
                                   {"test": dev["test"], "shift": dev["shift"]},
                                   jax.random.key(50_000 + seed)))
  measured["sharpness"].update(plain_rhos=list(PLAIN_RHOS), adaptive_rhos=list(ADAPTIVE_RHOS))
  measured["robustness"]["radii"] = list(NOISE_RADII)
  return {"best_epoch": best_epoch, "val_score": score, "diverged": diverged, "history": hist,
          "train_seconds": train_seconds, **measured, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------

def arms(method: str, settings, ablation,
         vanilla: str = "vanilla") -> list[tuple[str, Optional[str], str]]:
  """``[(arm, setting, variant)]``: vanilla, flat-<setting>..., direct-authors."""
  out = [(vanilla, None, "")]
  out += [(f"flat-{s}", s, "decomposed") for s in settings]
  if method in ablation:
    out.append(("direct-authors", "authors", "direct"))
  return out


def build_trainer(model, method, setting, variant, batch_size, m):
  agg, meta = registry.build(method, num_tasks=m, task_specific=multimnist.heads_mask)
  if setting is None:
    return multimnist.Trainer(model, agg, False, meta["weighted"], batch_size, 0.0, False)
  cfg = SETTINGS[setting]
  agg = mo.flat(agg, variant, task_specific=multimnist.heads_mask)
  return multimnist.Trainer(model, agg, True, meta["weighted"], batch_size, cfg["rho"],
                            cfg["adaptive"], cfg["sam_norm"])


def run_task(task: str, args, results: dict, save) -> dict:
  """Every (method, seed, arm) of one task pair into ``results["tasks"][task]``."""
  kinds = models.TASK_KINDS[task]
  m = len(kinds)
  t0 = time.perf_counter()
  data = multimnist.load_data(task, args.n_train, args.n_val, args.n_test, seed=args.data_seed)
  data["shift"] = load_shifted(task, args.n_shift, seed=args.data_seed)
  dev = {s: multimnist._device_split(data[s], range(m))  # pylint: disable=protected-access
         for s in data}
  # Fixed probe batches: sharpness/landscape on training data, noise on test data.
  k = min(args.n_probe, args.n_train, args.n_test)
  probes = {s: {"images": dev[s][0][:k], "targets": tuple(t[:k] for t in dev[s][1])}
            for s in ("train", "test")}
  target_var = [float(np.var(data["train"].targets[i])) if kinds[i] == "RR" else 1.0
                for i in range(m)]
  model = models.make_model(task, encoder=args.encoder)
  entry = results["tasks"].setdefault(task, {"runs": {}})
  entry.update(kinds=list(kinds), task_names=list(multimnist.TASK_NAMES[task]),
               metric_names=[models.METRICS[k][0] for k in kinds],
               lower_is_better=[models.METRICS[k][1] for k in kinds],
               data_seconds=time.perf_counter() - t0)
  for method in args.method_list:
    trainers = {}
    for seed in args.seed_list:
      for arm, setting, variant in arms(method, args.setting_list, args.ablation_list,
                                        args.vanilla_name):
        key = f"{method}/{arm}"
        if key not in trainers:
          trainers[key] = build_trainer(model, method, setting, variant, args.batch_size, m)
        r = train_and_measure(trainers[key], model, dev, probes, seed=seed, epochs=args.epochs,
                              lr=args.lr, kinds=kinds, target_var=target_var)
        entry["runs"].setdefault(key, {})[str(seed)] = r
        acc = r["test"]["metrics"]
        print(f"[flat] {task} {key:<28} seed {seed}: test {np.round(acc, 4).tolist()} "
              f"(epoch {r['best_epoch']}, {r['seconds']:.0f} s)", file=sys.stderr, flush=True)
      save()
  return entry


# ---------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------

def _dm(values, ref, entry) -> float:
  lib = dict(enumerate(entry["lower_is_better"]))
  return mo.metrics.delta_m(dict(enumerate(map(float, values))),
                            dict(enumerate(map(float, ref))), lib)


def per_run_summary(entry: dict) -> dict:
  """``{arm_key: {seed: {split: {acc, delta_m, ece, brier, nll, entropy}, ...}}}``.

  acc: mean over classification heads (NaN if none); Δm% against the vanilla
  uniform-loss runs (their per-task mean over seeds) on the same split.
  """
  runs = entry["runs"]
  cl = [i for i, k in enumerate(entry["kinds"]) if k == "CL"]
  ref = {}
  for split in ("test", "shift"):
    base = runs.get("mean/vanilla", {})
    ref[split] = (np.mean([r[split]["metrics"] for r in base.values()], axis=0)
                  if base else None)
  out: dict = {}
  for key, by_seed in runs.items():
    out[key] = {}
    for seed, r in by_seed.items():
      row: dict = {}
      for split in ("test", "shift"):
        d = r[split]
        met = d["metrics"]
        row[split] = {
            "acc": float(np.mean([met[i] for i in cl])) if cl else math.nan,
            "delta_m": _dm(met, ref[split], entry) if ref[split] is not None else math.nan}
        for name in ("ece", "brier", "nll", "entropy"):
          row[split][name] = float(np.mean(d[name])) if name in d else math.nan
      rob = np.asarray(r["robustness"]["mean"])          # (R, m)
      # Accuracy under noise, on the classification heads (NaN without one: the raw
      # curves of reconstruction heads, MSE, stay in the results file).
      row["robust_auc"] = float(np.mean(rob[:, cl])) if cl else math.nan
      # The drop at r = 0.3 separates robustness from clean accuracy (which the mean
      # over radii, robust_auc, includes).
      radii = list(r["robustness"]["radii"])
      per_r = rob[:, cl].mean(-1) if cl else None
      row["noise_drop"] = (float(per_r[radii.index(0.3)] - per_r[0])
                           if per_r is not None and 0.3 in radii else math.nan)
      row["sharp_plain"] = float(np.mean(r["sharpness"]["plain_loss_increase"][1]))
      row["sharp_adaptive"] = float(np.mean(r["sharpness"]["adaptive_loss_increase"][-1]))
      row["gdiff_plain"] = float(np.mean(r["sharpness"]["plain_grad_diff_norm"][1]))
      out[key][seed] = row
  return out


def _get(row, metric, split):
  return row[split][metric] if split else row[metric]


def paired_gaps(entry: dict, summary: dict) -> list[dict]:
  """flat − vanilla (and direct − decomposed) per seed, for every metric and split."""
  rows = []
  pairs = []
  for key in summary:
    method, arm = key.split("/")
    if arm.startswith("flat-"):
      pairs.append((method, arm, f"{method}/vanilla", key))
    if arm == "direct-authors":
      pairs.append((method, "direct − decomposed (authors)", f"{method}/flat-authors", key))
    if arm.startswith("vanilla-"):   # a control, e.g. vanilla with 2x the epochs
      for flat_arm in ("flat-authors", "flat-plain"):
        if f"{method}/{flat_arm}" in summary:
          pairs.append((method, f"{flat_arm} − {arm}", key, f"{method}/{flat_arm}"))
  metrics_ = [(m_, hib, sp) for sp in ("test", "shift") for m_, hib in GAP_METRICS]
  metrics_ += [("robust_auc", True, None), ("noise_drop", True, None), ("sharp_plain", False, None),
               ("sharp_adaptive", False, None), ("gdiff_plain", False, None)]
  for method, arm, base_key, key in pairs:
    if base_key not in summary:
      continue
    seeds = sorted(set(summary[base_key]) & set(summary[key]), key=int)
    for name, hib, split in metrics_:
      a = np.array([_get(summary[key][s], name, split) for s in seeds])
      b = np.array([_get(summary[base_key][s], name, split) for s in seeds])
      diff = a - b
      if not np.all(np.isfinite(diff)):
        continue
      better = (diff > 0) if hib in (True, None) else (diff < 0)
      rows.append({"method": method, "arm": arm, "metric": name, "split": split or "",
                   "higher_is_better": hib, "diff": diff.tolist(), "mean": float(diff.mean()),
                   "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                   "agree": int(better.sum()), "seeds": len(diff),
                   "a_mean": float(a.mean()), "b_mean": float(b.mean())})
  return rows


PERCENT = ("acc", "ece", "robust_auc", "noise_drop")
GAP_COLUMNS = {
    "in-domain test": [(m_, "test") for m_, _ in GAP_METRICS],
    "shifted test (load_digits composites) and weight space":
        [(m_, "shift") for m_, _ in GAP_METRICS]
        + [("robust_auc", ""), ("noise_drop", ""), ("sharp_plain", ""), ("sharp_adaptive", "")],
}
COLUMN_NAMES = {"acc": "acc (pts)", "delta_m": "Δm%", "ece": "ECE (pts)", "brier": "Brier",
                "nll": "NLL", "entropy": "entropy", "robust_auc": "noise acc (pts)",
                "noise_drop": "noise drop r=.3 (pts)", "sharp_plain": "sharp. ρ=.05",
                "sharp_adaptive": "sharp. ASAM ρ=2"}


def format_gap_table(gaps: list[dict]) -> str:
  """Markdown, two tables: per method and arm, paired gap mean ± std (k/n seeds better)."""
  index = {(g["method"], g["arm"], g["metric"], g["split"]): g for g in gaps}
  keys = list(dict.fromkeys((g["method"], g["arm"]) for g in gaps))
  out = []
  for title, cols in GAP_COLUMNS.items():
    head = ["method", "arm"] + [COLUMN_NAMES[m_] for m_, _ in cols]
    lines = [f"*{title}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, arm in keys:
      cells = [registry.label(method), arm]
      for m_, sp in cols:
        g = index.get((method, arm, m_, sp))
        if g is None:
          cells.append("–")
          continue
        f = 100.0 if m_ in PERCENT else 1.0
        prec = 2 if f == 100.0 or m_ == "delta_m" else 3
        mark = "↑" if g["higher_is_better"] is None else ""
        cells.append(f"{g['mean'] * f:+.{prec}f} ± {g['std'] * f:.{prec}f} "
                     f"({g['agree']}/{g['seeds']}{mark})")
      lines.append("| " + " | ".join(cells) + " |")
    out.append("\n".join(lines))
  return "\n\n".join(out)


ARM_COLUMNS = {
    "in-domain test": [(m_, "test") for m_, _ in GAP_METRICS],
    "shifted test (load_digits composites)": [(m_, "shift") for m_, _ in GAP_METRICS],
    "weight space": [("robust_auc", None), ("noise_drop", None), ("sharp_plain", None),
                     ("sharp_adaptive", None), ("gdiff_plain", None)],
}
COLUMN_NAMES_ABS = {**COLUMN_NAMES, "acc": "acc %", "ece": "ECE %", "robust_auc": "noise acc %",
                    "noise_drop": "noise drop r=.3 (pts)", "gdiff_plain": "‖g^SAM − g‖ ρ=.05"}


def format_arm_table(entry: dict, summary: dict) -> str:
  """Markdown, three tables: per arm, mean ± std over seeds of the absolute numbers."""
  out = []
  for title, cols in ARM_COLUMNS.items():
    head = ["method / arm"] + [COLUMN_NAMES_ABS[m_] for m_, _ in cols]
    if title == "in-domain test":
      head.append("selected epochs")
    lines = [f"*{title}*", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_seed in summary.items():
      cells = [f"{registry.label(key.split('/')[0])} / {key.split('/')[1]}"]
      for name, split in cols:
        v = np.array([_get(r, name, split) for r in by_seed.values()])
        f = 100.0 if name in PERCENT else 1.0
        prec = 2 if f == 100.0 or name == "delta_m" else 3
        cells.append(f"{v.mean() * f:.{prec}f} ± {v.std() * f:.{prec}f}")
      if title == "in-domain test":
        cells.append(",".join(str(entry["runs"][key][s_]["best_epoch"] + 1) for s_ in by_seed))
      lines.append("| " + " | ".join(cells) + " |")
    out.append("\n".join(lines))
  return "\n\n".join(out)


# ---------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------

ARM_STYLE = {"vanilla": ("tab:blue", "-"), "flat-authors": ("tab:red", "-"),
             "flat-plain": ("tab:orange", "--"), "direct-authors": ("tab:purple", ":")}


def plot_all(task: str, entry: dict, summary: dict, gaps: list[dict], stem: str) -> list[str]:
  """The study's PNGs for one task pair; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []

  def save(fig, name):
    fig.tight_layout()
    path = f"{stem}_{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  runs = entry["runs"]
  methods = list(dict.fromkeys(k.split("/")[0] for k in runs))
  cl = [i for i, k in enumerate(entry["kinds"]) if k == "CL"]

  # 1. Paired gaps: one panel per metric and split, one group per (method, arm).
  panels = [(m_, sp) for sp in ("test", "shift") for m_, _ in GAP_METRICS]
  panels += [("robust_auc", ""), ("noise_drop", ""), ("sharp_plain", ""), ("sharp_adaptive", "")]
  groups = list(dict.fromkeys((g["method"], g["arm"]) for g in gaps))
  if groups:
    ncol = 4
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 0.35 * len(groups) * nrow + 2.5),
                             squeeze=False)
    index = {(g["method"], g["arm"], g["metric"], g["split"]): g for g in gaps}
    for ax, (m_, sp) in zip(axes.flat, panels):
      for j, (method, arm) in enumerate(groups):
        g = index.get((method, arm, m_, sp))
        if g is None:
          continue
        f = 100.0 if m_ in ("acc", "ece", "robust_auc", "noise_drop") else 1.0
        color = ARM_STYLE.get(arm, ("tab:purple", ":"))[0]
        ax.barh(j, g["mean"] * f, color=color, alpha=0.5)
        ax.scatter(np.asarray(g["diff"]) * f, np.full(len(g["diff"]), j), color="k", s=10,
                   zorder=3)
      ax.axvline(0, color="k", lw=0.8)
      ax.set_yticks(range(len(groups)))
      ax.set_yticklabels([f"{registry.label(a)} {b[:22]}" for a, b in groups], fontsize=7)
      ax.invert_yaxis()
      unit = " (points)" if m_ in ("acc", "ece", "robust_auc", "noise_drop") else ""
      where = {"test": "in-domain", "shift": "shifted", "": ""}[sp]
      ax.set_title(f"{m_} {where}{unit}", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
      ax.axis("off")
    fig.suptitle(f"{task}: arm − baseline per seed (dots) and mean (bars); flat − vanilla, "
                 "direct − decomposed", fontsize=10)
    save(fig, "gaps")

  # 2. Reliability diagrams: bins pooled over seeds and classification heads.
  if cl:
    show = [m_ for m_ in ("cagrad", "mgda", "mean") if f"{m_}/vanilla" in runs][:1] or methods[:1]
    method = show[0]
    arm_keys = [k for k in runs if k.startswith(method + "/")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, split in zip(axes, ("test", "shift")):
      ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
      for key in arm_keys:
        cnt = conf = acc = 0.0
        for r in runs[key].values():
          rd = r[split]["reliability"]
          c = np.asarray(rd["count"], np.float64)
          cnt = cnt + c.sum(0)
          conf = conf + (np.asarray(rd["confidence"]) * c).sum(0)
          acc = acc + (np.asarray(rd["accuracy"]) * c).sum(0)
        ok = cnt > 0
        ece = np.mean([_get(summary[key][s], "ece", split) for s in summary[key]]) * 100
        arm = key.split("/")[1]
        color, ls = ARM_STYLE.get(arm, ("gray", "-"))
        ax.plot((conf / np.where(ok, cnt, 1))[ok], (acc / np.where(ok, cnt, 1))[ok], marker="o",
                ms=3, color=color, ls=ls, label=f"{arm} (ECE {ece:.1f} %)")
      ax.set_xlabel("confidence")
      ax.set_ylabel("accuracy")
      ax.set_title(f"{registry.label(method)}, {'in-domain' if split == 'test' else 'shifted'} "
                   f"test (pooled over seeds, heads)", fontsize=9)
      ax.legend(fontsize=8)
    save(fig, "reliability")

  # 3. Robustness and 4. landscape slices and 5. sharpness over training: one panel per method.
  def per_method(fname, title, draw, ylabel, xlabel):
    fig, axes = plt.subplots(1, len(methods), figsize=(3.8 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
      for key in [k for k in runs if k.startswith(method + "/")]:
        arm = key.split("/")[1]
        color, ls = ARM_STYLE.get(arm, ("gray", "-"))
        draw(ax, runs[key], color, ls, arm)
      ax.set_title(registry.label(method), fontsize=9)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{task}: {title}", fontsize=10)
    save(fig, fname)

  def draw_rob(ax, by_seed, color, ls, arm):
    curves = np.array([np.asarray(r["robustness"]["mean"])[:, cl].mean(-1)
                       for r in by_seed.values()])
    radii = next(iter(by_seed.values()))["robustness"]["radii"]
    ax.errorbar(radii, curves.mean(0) * 100, yerr=curves.std(0) * 100, color=color, ls=ls,
                capsize=2, label=arm)

  def draw_land(ax, by_seed, color, ls, arm):
    r = next(iter(v for v in by_seed.values() if "landscape" in v), None)
    if r is None:
      return
    a = r["landscape"]["alphas"]
    ax.plot(a, np.sum(r["landscape"]["train"], -1), color=color, ls=ls, label=f"{arm} train")
    ax.plot(a, np.sum(r["landscape"]["test"], -1), color=color, ls=ls, alpha=0.45, lw=2.5)
    ax.set_yscale("log")

  def draw_sharp(ax, by_seed, color, ls, arm):
    curves = np.array([np.mean(r["history"]["sharp_plain_0.05"], -1) for r in by_seed.values()])
    ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), color=color, ls=ls, label=arm)

  if cl:
    per_method("robustness", "accuracy of θ + r·d\n(d filter-normalised; mean over 5 "
               "directions, ± std over seeds)", draw_rob, "accuracy % (classification heads)",
               "noise radius r (fraction of each filter's norm)")
  per_method("landscape", "Σ task losses along θ + α·d\n(seed 0; thin: train batch, wide "
             "pale: test batch)", draw_land, "Σ_i L_i", "α (filter-normalised direction)")
  per_method("sharpness", "sharpness over training, plain ρ = 0.05\n(mean over tasks and "
             "seeds)",
             draw_sharp, "L(θ+ε) − L(θ)", "epoch")
  return paths


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------

# Every code path but the plain setting's (the same code as the authors' with other
# constants); compilation dominates, one epoch program per arm.
QUICK = dict(n_train=128, n_val=64, n_test=64, n_shift=64, n_probe=32, epochs=1, seeds=1,
             batch_size=64, encoder="mlp", methods="mean", ablation="mean", settings="authors")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default="CL_CR", help="comma list of CL_CR, CL_RR, RL_RR")
  p.add_argument("--encoder", default="resnet_small", choices=models.ENCODERS)
  p.add_argument("--methods", default="mean,mgda,cagrad",
                 help="comma list ('pairs' = uniform loss and " + ",".join(registry.FLAT_PAIRS)
                 + "); 'mean' (the Δm% reference) is always added")
  p.add_argument("--settings", default="both", choices=("authors", "plain", "both", "none"),
                 help="SAM settings of the flat arms ('none': vanilla arms only, e.g. a "
                      "control with other epochs, see --vanilla-name)")
  p.add_argument("--vanilla-name", default="vanilla",
                 help="arm name of the vanilla runs; 'vanilla-<x>' names a control that "
                      "--merge pairs with the flat arms of another file")
  p.add_argument("--ablation", default="cagrad",
                 help="methods that also run mo.flat(A, 'direct') at the authors' setting")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epochs", type=int, default=15)
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (every arm)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--n-train", type=int, default=2000)
  p.add_argument("--n-val", type=int, default=500)
  p.add_argument("--n-test", type=int, default=2000)
  p.add_argument("--n-shift", type=int, default=2000, help="load_digits composites")
  p.add_argument("--n-probe", type=int, default=500,
                 help="examples of the sharpness / noise / landscape probes")
  p.add_argument("--data-seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
  p.add_argument("--tag", default=None)
  p.add_argument("--out", default=RESULTS_DIR, help="output directory")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--report", default=None, help="re-render tables/figures from this JSON")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="union of the runs of these result files (e.g. disjoint method lists "
                      "run one after the other) into flat_<tag>.json, then report")
  p.add_argument("--no-reference", action="store_true",
                 help="do not add the uniform-loss reference runs (when they are in another "
                      "file to --merge with)")
  args = p.parse_args(argv)
  if args.quick:
    multimnist.apply_quick_defaults(p, args, QUICK)
  names = ",".join(["mean", *registry.FLAT_PAIRS]) if args.methods == "pairs" else args.methods
  if not args.no_reference:
    names = "mean," + names   # the Δm% reference
  args.method_list = registry.resolve(names)
  args.setting_list = {"both": ["authors", "plain"], "none": []}.get(args.settings,
                                                                    [args.settings])
  args.ablation_list = [x for x in args.ablation.split(",") if x]
  if "authors" not in args.setting_list:
    args.ablation_list = []   # direct vs decomposed is compared at the authors' setting
  args.seed_list = list(range(args.seeds))
  args.task_list = [t for t in args.tasks.split(",") if t]
  for t in args.task_list:
    if t not in models.TASK_KINDS:
      raise ValueError(f"unknown task {t!r}; one of {sorted(models.TASK_KINDS)}")
  if args.tag is None:
    args.tag = "quick" if args.quick else f"{args.encoder}_n{args.n_train}_e{args.epochs}"
  return args


def report(results: dict, stem: str, plot: bool = True) -> str:
  """Tables (returned) and figures (``stem_<task>_*.png``) of a results dict."""
  text = []
  for task, entry in results["tasks"].items():
    if not entry.get("runs"):
      continue
    summary = per_run_summary(entry)
    gaps = paired_gaps(entry, summary)
    entry["summary"] = summary
    entry["paired_gaps"] = gaps
    text.append(f"## {task}: per arm (mean ± std over seeds)\n\n{format_arm_table(entry, summary)}")
    text.append(f"## {task}: paired gaps, arm − baseline (mean ± std over seeds; (k/n): seeds "
                f"where the arm is better; ↑: seeds where it is higher)\n\n"
                f"{format_gap_table(gaps)}")
    if plot:
      entry["figures"] = plot_all(task, entry, summary, gaps, f"{stem}_{task}")
  return "\n\n".join(text)


def merge(paths, stem: str, plot: bool = True) -> dict:
  """The union of the runs of several result files (same tasks and protocol), reported."""
  parts = []
  for pth in paths:
    with open(pth) as f:
      parts.append(json.load(f))
  res = parts[0]
  res["merged_from"] = list(paths)
  res["config"]["method_list"] = list(res["config"]["method_list"])
  for other in parts[1:]:
    # Epochs may differ: a vanilla control with more epochs is merged under its own arm name.
    for key in ("n_train", "encoder", "lr", "batch_size", "n_test", "n_shift", "data_seed"):
      if other["config"][key] != res["config"][key]:
        raise ValueError(f"merge: {key} differs ({other['config'][key]} vs {res['config'][key]})")
    for task, entry in other["tasks"].items():
      mine = res["tasks"].setdefault(task, {**entry, "runs": {}})
      mine["runs"].update(entry["runs"])
    res["config"]["method_list"] += [m_ for m_ in other["config"]["method_list"]
                                     if m_ not in res["config"]["method_list"]]
    res["total_seconds"] = res.get("total_seconds", 0.0) + other.get("total_seconds", 0.0)
  text = report(res, stem, plot=plot)
  with open(stem + ".json", "w") as f:
    json.dump(res, f, indent=1)
  print(text)
  return res


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.makedirs(args.out, exist_ok=True)
  if args.report:
    with open(args.report) as f:
      results = json.load(f)
    stem = os.path.splitext(args.report)[0]
    print(report(results, stem, plot=not args.no_plot))
    with open(args.report, "w") as f:
      json.dump(results, f, indent=1)
    return results
  stem = os.path.join(args.out, f"flat_{args.tag}")
  if args.merge:
    return merge(args.merge, stem, plot=not args.no_plot)
  t0 = time.perf_counter()
  results: dict = {"config": {k: v for k, v in vars(args).items()}, "tasks": {},
                   "settings": SETTINGS,
                   "measures": {"ece_bins": ECE_BINS, "noise_radii": NOISE_RADII,
                                "noise_direction": "filter", "noise_directions": 5,
                                "plain_rhos": PLAIN_RHOS, "adaptive_rhos": ADAPTIVE_RHOS,
                                "selection": "best validation epoch",
                                "delta_m_reference": "vanilla uniform loss (mean over seeds)"},
                   "env": {"jax": jax.__version__, "python": platform.python_version(),
                           "backend": jax.default_backend(), "machine": platform.machine(),
                           "cpus": os.cpu_count()}}

  def save():
    results["total_seconds"] = time.perf_counter() - t0
    with open(stem + ".json", "w") as f:
      json.dump(results, f, indent=1)

  print(f"[flat] tasks={args.task_list} encoder={args.encoder} methods={args.method_list} "
        f"settings={args.setting_list} ablation={args.ablation_list} seeds={args.seeds} "
        f"epochs={args.epochs} n_train={args.n_train}", file=sys.stderr, flush=True)
  for task in args.task_list:
    run_task(task, args, results, save)
  text = report(results, stem, plot=not args.no_plot)
  save()
  print(text)
  print(f"\n[{results['total_seconds']:.0f} s total] results: {stem}.json")
  return results


if __name__ == "__main__":
  main()
