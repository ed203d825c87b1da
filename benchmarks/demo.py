"""`make demo`: what mtl_optax is for, in two paired multi-MNIST comparisons (~3 min on 2 cores).

    python -m benchmarks.demo [--seeds N]

1. **Gradient balancing** on CL_RR (classify the left digit, reconstruct the
   right one: a classification loss ~1 and a reconstruction loss ~0.05, so
   uniform loss weighting lets the classifier dominate the shared encoder):
   uniform loss vs CAGrad vs Nash-MTL.
2. **Flat (sharpness-aware) vs vanilla** on CL_CR with 2 000 training images
   (small data, where generalisation is the bottleneck): CAGrad vs F-CAGrad
   (Phan et al., ICCV 2025) with plain SAM, ρ = 0.05, one perturbation per
   task, separate norms.

Both on the bundled multi-MNIST digits with the MLP encoder, Adam 1e-3, the same
seeds for every method, Δm% against single-task baselines trained with the
same seeds. Each comparison is reported *paired over the seeds* (method A minus
method B on the same seed and data), and the one-line conclusion says "better"
or "worse" only when every seed agrees; otherwise it says there is no
consistent difference. Nothing is tuned per seed or picked after the fact.

What this does not show: the authors' own regime (ResNet-18 with BatchNorm,
adaptive SAM ρ = 2, 100 epochs) is beyond a 3-minute CPU budget; see
benchmarks/README.md ("Flat methods") for what we measured there.

Writes ``benchmarks/results/demo.json`` and ``demo.png`` (paired differences).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from benchmarks import multimnist

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

COMMON = ["--lrs", "1e-3", "--encoder", "mlp", "--ls-grid", "", "--fixed-from", "",
          "--no-plot", "--no-progress", "--n-val", "1000", "--n-test", "2000"]

PARTS = (
    dict(key="balancing",
         title="Gradient balancing: CL_RR (classify left digit, reconstruct right digit)",
         args=["--tasks", "CL_RR", "--methods", "mean,cagrad,nash_mtl", "--epochs", "6",
               "--n-train", "4000", "--tag", "demo_balancing"],
         pairs=(("cagrad", "mean"), ("nash_mtl", "mean"))),
    dict(key="flat",
         title="Flat vs vanilla: CL_CR with 2 000 training images (plain SAM, rho = 0.05)",
         args=["--tasks", "CL_CR", "--methods", "cagrad,f_cagrad", "--epochs", "30",
               "--n-train", "2000", "--rho", "0.05", "--no-adaptive", "--sam-norm", "separate",
               "--tag", "demo_flat"],
         pairs=(("f_cagrad", "cagrad"),)),
)

LABELS = {"mean": "uniform loss", "cagrad": "CAGrad", "nash_mtl": "Nash-MTL",
          "f_cagrad": "F-CAGrad"}


def paired(results: dict, a: str, b: str) -> dict:
  """Δm%(a) − Δm%(b) per seed, and a verdict that needs every seed to agree."""
  da = np.asarray(results["methods"][a]["delta_m"])
  db = np.asarray(results["methods"][b]["delta_m"])
  diff = da - db
  wins = int(np.sum(diff > 0))
  if wins == len(diff):
    verdict = "better"
  elif wins == 0:
    verdict = "worse"
  else:
    verdict = "no consistent difference"
  return {"a": a, "b": b, "delta_m_a": da.tolist(), "delta_m_b": db.tolist(),
          "diff": diff.tolist(), "mean": float(diff.mean()),
          "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
          "wins": wins, "seeds": len(diff), "verdict": verdict}


def conclusion(p: dict) -> str:
  a, b = LABELS.get(p["a"], p["a"]), LABELS.get(p["b"], p["b"])
  per_seed = ", ".join(f"{d:+.2f}" for d in p["diff"])
  if p["verdict"] == "no consistent difference":
    head = f"{a} vs {b}: no consistent difference"
  else:
    head = f"{a} is {p['verdict']} than {b}"
  return (f"{head}: Δm {np.mean(p['delta_m_a']):+.2f}% vs {np.mean(p['delta_m_b']):+.2f}%, "
          f"paired difference {p['mean']:+.2f} ± {p['std']:.2f} points "
          f"(per seed: {per_seed}; {a} ahead in {p['wins']}/{p['seeds']} seeds)")


def plot(report: dict, path: pathlib.Path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  pairs = [p for part in report["parts"] for p in part["pairs"]]
  fig, ax = plt.subplots(figsize=(7, 3.2))
  for i, p in enumerate(pairs):
    color = {"better": "tab:green", "worse": "tab:red"}.get(p["verdict"], "tab:gray")
    ax.bar(i, p["mean"], color=color, alpha=0.6)
    ax.scatter(np.full(len(p["diff"]), i), p["diff"], color="k", s=12, zorder=3)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(range(len(pairs)))
  ax.set_xticklabels([f"{LABELS.get(p['a'], p['a'])}\n− {LABELS.get(p['b'], p['b'])}"
                      for p in pairs])
  ax.set_ylabel("Δm% difference (points)")
  ax.set_title("mtl_optax demo: paired differences per seed (dots), mean (bars)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out-dir", default=str(RESULTS))
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  out_dir = pathlib.Path(args.out_dir)
  t0 = time.perf_counter()
  report = {"seeds": args.seeds, "parts": []}
  for part in PARTS:
    print(f"\n== {part['title']} ==", flush=True)
    results = multimnist.main(part["args"] + COMMON + ["--seeds", str(args.seeds),
                                                       "--out-dir", str(out_dir)])
    pairs = [paired(results, a, b) for a, b in part["pairs"]]
    report["parts"].append({"key": part["key"], "title": part["title"], "pairs": pairs,
                            "seconds": results["total_seconds"]})
  report["total_seconds"] = time.perf_counter() - t0
  print(f"\n== Conclusions (paired over {args.seeds} seeds; Δm% vs single-task, higher is "
        "better) ==")
  for part in report["parts"]:
    for p in part["pairs"]:
      print("- " + conclusion(p))
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "demo.json").write_text(json.dumps(report, indent=1))
  png = plot(report, out_dir / "demo.png")
  print(f"\n[{report['total_seconds']:.0f} s] wrote {out_dir / 'demo.json'}"
        + (f" and {png}" if png else ""))
  return report


if __name__ == "__main__":
  main()
