"""Task interference vs the gain of specialised optimisers over uniform loss (issue 15).

    python -m benchmarks.interference [--quick] [--sets classify8,mixed8,...] [--seeds 3]
    python -m benchmarks.interference --report [--tag TAG]   # summary + figure from the files

Gama & Grassi (2025) explain their multi-MNIST results by task interference:

1. the gap between the specialised multi-task optimisers (SMTOs) and uniform loss grows with
   the interference between the tasks, measured by the mean cosine similarity between each
   task's gradient and the average gradient (lower cosine = more interference);
2. fixed weights taken from an SMTO run (the EMA, β = 0.9, of its per-epoch mean weights)
   nearly match the SMTO;
3. where the tasks interfere little, every method is close to uniform loss and the weights
   stay near uniform.

This benchmark checks the three on many-task sets built from the same composites (8 tasks
each, :data:`TASK_SETS`; the task codes are those of `benchmarks.multimnist.TASKS`): digit
classes, binary attributes (parities, "≥ 5", "left > right"), the last digit of the sum,
reconstructions, and the sum as a raw regression (0..18, squared error: a loss scale ~100×
the others). Some sets multiply losses by a factor, which changes what the methods see and
not the metrics. Every set runs the multi-MNIST protocol of `benchmarks.multimnist` (STL
baselines per task, shared between the sets; lr grid selected on validation; ≥ 3 seeds; Δm%
on test at the best validation epoch) for uniform loss, the SMTOs and the fixed-weight
re-runs.

Measures, per set:

* interference = 1 − (Gama & Grassi's mean cosine, `mtl_optax.metrics.interference`, on the
  shared parameters), averaged over the steps, epochs and seeds of the **uniform-loss run**:
  a property of the task set under the baseline's training, the same x for every method;
* gap(method) = Δm%(method) − Δm%(uniform), paired per seed (same initialisation and
  batches), mean ± std over the seeds; the fixed-weight gap likewise;
* weight spread = the total-variation distance of the normalised task weights from 1/m,
  averaged over epochs and seeds.

The verdict of each claim is computed by :func:`verdicts` with the rule printed next to it.

Outputs: ``benchmarks/results/interference_<set>_<tag>.json`` (the harness's result file of
each set) and ``interference_<tag>.{json,png}`` (the summary and the figure).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

from benchmarks import multimnist
from mtl_optax import metrics

RESULTS_DIR = multimnist.RESULTS_DIR

# name -> comma list of task codes (benchmarks.multimnist.TASKS), 8 tasks each.
TASK_SETS = {
    "classify8": "CL,CR,PL,PR,HL,HR,GT,S10",          # 8 cross-entropies on digit classes
    "mixed8": "CL,CR,PL,PR,GT,S10,RL,RR",             # 6 cross-entropies + 2 reconstructions
    "mixed8_recon_x0.1": "CL,CR,PL,PR,GT,S10,RL*0.1,RR*0.1",  # ... reconstructions ×0.1
    "sum8": "CL,CR,PL,PR,HL,HR,GT,SUM",               # 7 cross-entropies + the raw sum
    "mixed8_sum": "CL,CR,PL,PR,GT,SUM,RL,RR",         # + the raw sum and 2 reconstructions
}
SMTOS = ("imtl", "cagrad", "nash_mtl", "famo", "mgda", "pcgrad", "uncertainty_weighting")
# Gama & Grassi's "balancing" group, the methods their explanation is about (their Table 3
# winners); claim 1 is judged on their mean gap.
BALANCING = ("imtl", "cagrad", "nash_mtl", "famo")
FIXED_FROM = ("imtl", "cagrad", "nash_mtl", "famo")
# The protocol of the CL_RR tables (MLP encoder), on fewer images to afford 5 sets x 12 runs.
DEFAULTS = dict(encoder="mlp", epochs=8, seeds=3, lrs="1e-3,3e-3", n_train=5000)
QUICK = dict(encoder="mlp", epochs=2, seeds=2, lrs="1e-3", n_train=512, n_val=256,
             n_test=256, batch_size=128)


def harness_args(task_set: str, args) -> argparse.Namespace:
  """The `benchmarks.multimnist` arguments of one task set."""
  methods = ",".join(("mean",) + tuple(args.method_list))
  argv = ["--tasks", TASK_SETS[task_set], "--methods", methods,
          "--fixed-from", ",".join(args.fixed_list), "--ls-grid", "",
          "--encoder", args.encoder, "--epochs", str(args.epochs), "--seeds", str(args.seeds),
          "--lrs", args.lrs, "--n-train", str(args.n_train), "--n-val", str(args.n_val),
          "--n-test", str(args.n_test), "--batch-size", str(args.batch_size),
          "--tag", args.tag]
  if args.no_progress:
    argv.append("--no-progress")
  return multimnist.parse_args(argv)


def run_sets(args) -> None:
  """Runs the harness on every set; one result file per set, written as each ends."""
  stl_cache: dict = {}   # the STL baselines of a task code are the same in every set
  for name in args.set_list:
    t0 = time.perf_counter()
    bench = multimnist.Benchmark(harness_args(name, args))
    bench.stl_cache = stl_cache
    res = bench.run()
    res["task_set"] = name
    path = set_path(name, args.tag, args.out_dir)
    with open(path, "w") as f:
      json.dump(res, f, indent=1)
    print(f"[interference] {name}: {time.perf_counter() - t0:.0f} s -> {path}", file=sys.stderr,
          flush=True)


def set_path(name: str, tag: str, out_dir: str = RESULTS_DIR) -> str:
  return os.path.join(out_dir, f"interference_{name}_{tag}.json")


# ---------------------------------------------------------------------------
# Summary.
# ---------------------------------------------------------------------------

def _weight_spread(weights) -> float:
  """Mean total-variation distance of the normalised per-epoch weights from uniform."""
  w = np.abs(np.asarray(weights, np.float64))   # (seeds, epochs, m)
  s = w.sum(-1, keepdims=True)
  w = np.where(s > 0, w / np.where(s > 0, s, 1.0), np.nan)
  return float(np.nanmean(0.5 * np.abs(w - 1.0 / w.shape[-1]).sum(-1)))


def _mean_cosine(entry: dict) -> float:
  """Gama & Grassi's measure of a method's runs: mean over seeds of the per-epoch means."""
  return float(np.mean([np.mean(x) for x in entry["interference"]]))


def summarize_set(res: dict) -> dict:
  """Interference, paired gaps to uniform loss and weight spreads of one set's results."""
  methods = res["methods"]
  ref = methods["mean"]
  ref_dm = np.asarray(ref["delta_m"], np.float64)
  cos = _mean_cosine(ref)
  rows = {}
  for name, v in methods.items():
    if name == "mean" or "error" in v:
      continue
    gap = np.asarray(v["delta_m"], np.float64) - ref_dm
    row = {"label": v["label"], "delta_m": float(np.mean(v["delta_m"])),
           "gap": float(gap.mean()), "gap_std": float(gap.std()),
           "gap_seeds": gap.tolist(),
           "own_interference": 1.0 - _mean_cosine(v)}
    if v.get("weighted"):
      row["weight_spread"] = _weight_spread(v["weights"])
    if "fixed_weights" in v:
      row["fixed_weights"] = v["fixed_weights"]
    rows[name] = row
  return {"tasks": res["config"]["tasks"], "task_names": res["config"]["task_names"],
          "interference": 1.0 - cos, "uniform_cosine": cos,
          "uniform_delta_m": float(ref_dm.mean()), "uniform_delta_m_std": float(ref_dm.std()),
          "methods": rows, "seconds": res.get("total_seconds")}


def _spearman(x, y) -> float:
  """Spearman's ρ; NaN under 3 sets (two points always correlate ±1)."""
  return metrics.spearman(x, y) if len(x) >= 3 else float("nan")


def verdicts(sets: dict) -> list[dict]:
  """Gama & Grassi's three claims judged on the summaries; each with its rule and numbers."""
  names = sorted(sets, key=lambda k: sets[k]["interference"])
  x = [sets[k]["interference"] for k in names]
  out = []

  def mean_gap(k, methods):
    gs = [sets[k]["methods"][m]["gap"] for m in methods if m in sets[k]["methods"]]
    return float(np.mean(gs)) if gs else float("nan")

  balancing = [m for m in BALANCING if all(m in sets[k]["methods"] for k in names)]
  y = [mean_gap(k, balancing) for k in names]
  rho = _spearman(x, y)
  per = {m: _spearman(x, [sets[k]["methods"][m]["gap"] for k in names])
         for m in SMTOS if all(m in sets[k]["methods"] for k in names)}
  out.append({
      "claim": "the SMTO-minus-uniform gap grows with task interference",
      "rule": "Spearman rho(interference, mean gap of the balancing methods "
              f"{'/'.join(balancing)}) >= 0.8 over the {len(names)} sets",
      # Rank correlations of n points are multiples of 6/(n³ − n): compared after rounding.
      "held": None if np.isnan(rho) else bool(round(rho, 9) >= 0.8), "spearman": rho,
      "per_method_spearman": per,
      "sets_by_interference": [{"set": k, "interference": sets[k]["interference"],
                                "mean_balancing_gap": g} for k, g in zip(names, y)]})

  pairs = []
  for k in names:
    for m, row in sets[k]["methods"].items():
      if m.startswith("fixed_") and m[len("fixed_"):] in sets[k]["methods"]:
        src = sets[k]["methods"][m[len("fixed_"):]]
        pairs.append({"set": k, "method": m[len("fixed_"):], "smto_gap": src["gap"],
                      "fixed_gap": row["gap"]})
  gained = [p for p in pairs if p["smto_gap"] > 1.0]
  for p in gained:
    p["recovered"] = p["fixed_gap"] / p["smto_gap"]
  med = float(np.median([p["recovered"] for p in gained])) if gained else float("nan")
  out.append({
      "claim": "fixed weights from an SMTO run nearly match the SMTO",
      "rule": "median of fixed gap / SMTO gap >= 0.75 over the (set, method) pairs where the "
              "SMTO gains > 1 point (Gama & Grassi's MNIST: (8.952-3.251)/(8.952-2.137) = 0.84)",
      "held": None if np.isnan(med) else bool(med >= 0.75), "median_recovered": med, "pairs": pairs,
      "pairs_judged": len(gained)})

  low = names[0]
  gaps = {m: r["gap"] for m, r in sets[low]["methods"].items() if not m.startswith("fixed_")}
  spreads = {m: r["weight_spread"] for m, r in sets[low]["methods"].items()
             if "weight_spread" in r and not m.startswith("fixed_")}
  worst = max(abs(g) for g in gaps.values()) if gaps else float("nan")
  out.append({
      "claim": "with little interference every method is close to uniform loss",
      "rule": f"on the least-interfering set ({low}), every |gap| < 2 Δm% points",
      "held": bool(worst < 2.0), "set": low, "max_abs_gap": worst, "gaps": gaps,
      "weight_spread": spreads})
  return out


def summarize(paths: list[str]) -> dict:
  sets = {}
  for pth in paths:
    with open(pth) as f:
      res = json.load(f)
    sets[res.get("task_set", os.path.basename(pth))] = summarize_set(res)
  return {"sets": sets, "verdicts": verdicts(sets) if len(sets) >= 2 else [],
          "files": [os.path.basename(p) for p in paths]}


def format_report(summary: dict) -> str:
  sets = summary["sets"]
  names = sorted(sets, key=lambda k: sets[k]["interference"])
  methods = [m for m in SMTOS if any(m in sets[k]["methods"] for k in names)]
  labels = {m: next(sets[k]["methods"][m]["label"] for k in names if m in sets[k]["methods"])
            for m in methods}
  lines = ["| set | tasks | interference (1 − cos) | uniform Δm% | "
           + " | ".join(labels[m] for m in methods) + " |",
           "|---|---|---|---|" + "---|" * len(methods)]
  for k in names:
    s = sets[k]
    cells = []
    for m in methods:
      r = s["methods"].get(m)
      cells.append("–" if r is None else f"{r['gap']:+.2f} ± {r['gap_std']:.2f}")
    lines.append(f"| {k} | {s['tasks']} | {s['interference']:.3f} | "
                 f"{s['uniform_delta_m']:.2f} ± {s['uniform_delta_m_std']:.2f} | "
                 + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Gap to uniform loss (Δm% points, paired per seed, mean ± std); positive = better "
               "than uniform.")
  fixed = sorted({m[len("fixed_"):] for k in names for m in sets[k]["methods"]
                  if m.startswith("fixed_")}, key=lambda m: SMTOS.index(m) if m in SMTOS else 99)
  if fixed:
    lines += ["", "| set | " + " | ".join(f"{labels.get(m, m)}: SMTO → fixed" for m in fixed)
              + " |", "|---|" + "---|" * len(fixed)]
    for k in names:
      cells = []
      for m in fixed:
        r, f = sets[k]["methods"].get(m), sets[k]["methods"].get("fixed_" + m)
        cells.append("–" if r is None or f is None else f"{r['gap']:+.2f} → {f['gap']:+.2f}")
      lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Gap to uniform of each SMTO and of its fixed-weight re-run (EMA β = 0.9 of the "
                 "per-epoch mean weights, normalised).")
  lines.append("")
  for v in summary["verdicts"]:
    verdict = {True: "held", False: "not held", None: "undetermined"}[v["held"]]
    lines.append(f"- **{v['claim']}: {verdict}.** Rule: {v['rule']}.")
    if "spearman" in v:
      per = ", ".join(f"{labels.get(m, m)} {r:+.2f}" for m, r in v["per_method_spearman"].items())
      lines.append(f"  Spearman ρ = {v['spearman']:+.2f} (per method: {per}).")
    if "median_recovered" in v:
      lines.append(f"  Median recovered share {v['median_recovered']:.2f} over "
                   f"{v['pairs_judged']} pairs.")
    if "max_abs_gap" in v:
      spread = ", ".join(f"{labels.get(m, m)} {s:.3f}" for m, s in v["weight_spread"].items())
      lines.append(f"  Largest |gap| {v['max_abs_gap']:.2f}; weight spread (TV distance from "
                   f"1/m): {spread}.")
  return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sets = summary["sets"]
  names = sorted(sets, key=lambda k: sets[k]["interference"])
  x = np.array([sets[k]["interference"] for k in names])
  methods = [m for m in SMTOS if any(m in sets[k]["methods"] for k in names)]
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  span = float(x.max() - x.min()) or 1.0
  for i, m in enumerate(methods):   # each method: points, nudged sideways to stay apart
    ks = [k for k in names if m in sets[k]["methods"]]
    dx = (i - (len(methods) - 1) / 2) * 0.006 * span
    xs = np.array([sets[k]["interference"] for k in ks]) + dx
    ax.errorbar(xs, [sets[k]["methods"][m]["gap"] for k in ks],
                yerr=[sets[k]["methods"][m]["gap_std"] for k in ks], fmt="o", ms=4,
                capsize=2, color=colors[i % 10], alpha=0.75,
                label=sets[ks[0]]["methods"][m]["label"])
    fk = [k for k in ks if "fixed_" + m in sets[k]["methods"]]
    ax.plot([sets[k]["interference"] + dx for k in fk],
            [sets[k]["methods"]["fixed_" + m]["gap"] for k in fk], "o", mfc="white", ms=5,
            color=colors[i % 10], alpha=0.75)
  mean_gap = [np.mean([sets[k]["methods"][m]["gap"] for m in BALANCING
                       if m in sets[k]["methods"]]) for k in names]
  mean_fixed = [np.mean([sets[k]["methods"]["fixed_" + m]["gap"] for m in BALANCING
                         if "fixed_" + m in sets[k]["methods"]] or [np.nan]) for k in names]
  ax.plot(x, mean_gap, "k-s", lw=2.5, ms=7, label="mean of " + "/".join(
      sets[names[0]]["methods"][m]["label"] for m in BALANCING if m in sets[names[0]]["methods"]))
  ax.plot(x, mean_fixed, "k--s", lw=1.5, ms=7, mfc="white", label="... their fixed weights")
  ax.axhline(0.0, color="0.4", lw=0.8)
  for j, (k, xi) in enumerate(zip(names, x)):   # set names along the top, staggered
    ax.annotate(k, (xi, 1.0), xycoords=("data", "axes fraction"), textcoords="offset points",
                xytext=(0, 4 + 10 * (j % 3)), ha="center", fontsize=7, color="0.3")
  ax.set_xlabel("task interference: 1 − mean cos(g_i, ḡ) under uniform loss")
  ax.set_ylabel("Δm% − Δm%(uniform loss)   (> 0: better than uniform)")
  ax.set_title("Gain over uniform loss vs interference (8-task sets; hollow: fixed weights)",
               pad=38)
  ax.legend(fontsize=7, ncol=2, loc="upper left")
  pairs = next((v["pairs"] for v in summary["verdicts"] if "pairs" in v), [])
  if pairs:
    sg = np.array([p["smto_gap"] for p in pairs])
    fg = np.array([p["fixed_gap"] for p in pairs])
    for i, m in enumerate(methods):
      sel = [j for j, p in enumerate(pairs) if p["method"] == m]
      if sel:
        ax2.scatter(sg[sel], fg[sel], color=colors[i % 10], s=25,
                    label=sets[names[0]]["methods"].get(m, {"label": m})["label"])
    lim = [min(sg.min(), fg.min(), 0) - 1, max(sg.max(), fg.max(), 0) + 1]
    ax2.plot(lim, lim, "k--", lw=0.8, label="fixed = SMTO")
    ax2.axhline(0, color="0.6", lw=0.6)
    ax2.axvline(0, color="0.6", lw=0.6)
    ax2.set_xlabel("SMTO gap over uniform")
    ax2.set_ylabel("fixed-weight gap over uniform")
    ax2.set_title("Do fixed weights from the run match it?")
    ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(tag: str, out_dir: str = RESULTS_DIR, plot_png: bool = True) -> dict:
  paths = sorted(glob.glob(os.path.join(out_dir, f"interference_*_{tag}.json")))
  paths = [p for p in paths if os.path.basename(p) != f"interference_{tag}.json"]
  if not paths:
    raise FileNotFoundError(f"no interference_<set>_{tag}.json under {out_dir}")
  summary = summarize(paths)
  summary["tag"] = tag
  stem = os.path.join(out_dir, f"interference_{tag}")
  with open(stem + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  if plot_png and len(summary["sets"]) >= 2:
    plot(summary, stem + ".png")
  print(format_report(summary))
  print(f"\nsummary: {stem}.json" + (f", {stem}.png" if plot_png else ""))
  return summary


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sets", default=",".join(TASK_SETS), help=f"of {sorted(TASK_SETS)}")
  p.add_argument("--methods", default=",".join(SMTOS), help="compared with uniform loss")
  p.add_argument("--fixed-from", default=",".join(FIXED_FROM))
  p.add_argument("--encoder", default=DEFAULTS["encoder"])
  p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
  p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
  p.add_argument("--lrs", default=DEFAULTS["lrs"])
  p.add_argument("--n-train", type=int, default=DEFAULTS["n_train"])
  p.add_argument("--n-val", type=int, default=2000)
  p.add_argument("--n-test", type=int, default=4000)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--tag", default=None)
  p.add_argument("--out-dir", default=RESULTS_DIR)
  p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
  p.add_argument("--report", action="store_true", help="only summarise the existing files")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    multimnist.apply_quick_defaults(p, args, QUICK)
  if args.tag is None:
    args.tag = "quick" if args.quick else f"{args.encoder}_e{args.epochs}_s{args.seeds}"
  args.set_list = [s for s in args.sets.split(",") if s]
  unknown = [s for s in args.set_list if s not in TASK_SETS]
  if unknown:
    p.error(f"unknown task sets {unknown}; of {sorted(TASK_SETS)}")
  args.method_list = [m for m in args.methods.split(",") if m and m != "mean"]
  args.fixed_list = [m for m in args.fixed_from.split(",") if m in args.method_list]
  return args


def main(argv=None):
  args = parse_args(argv)
  if not args.report:
    os.makedirs(args.out_dir, exist_ok=True)
    run_sets(args)
  return report(args.tag, args.out_dir, plot_png=not args.no_plot)


if __name__ == "__main__":
  main()
