"""Markdown tables for benchmarks/README.md from the multi-MNIST result files.

    python -m benchmarks.report [--clrr FILE] [--clcr FILE] [--rlrr FILE]

Prints: our CL_RR table next to Gama & Grassi's Table 3 with the Spearman
correlation of the two rankings (methods present in both), the paired gaps of
the gradient-balancing methods to uniform loss (per task pair), and the
flat-vs-vanilla pairs next to Phan et al.'s Table 1.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mtl_optax import metrics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Gama & Grassi (2025), Table 3, multi-MNIST CL_RR: (CL, RR, avg) Δm%.
GAMA_GRASSI_CLRR = {
    "mean": (-1.043, -16.86, -8.952), "auto_lambda": (-1.232, -7.186, -4.209),
    "cagrad": (-1.685, -2.590, -2.137), "cdtt": (-1.546, -3.596, -2.571),
    "edm": (-1.613, -2.993, -2.303), "famo": (-4.587, -0.745, -2.666),
    "graddrop": (-1.076, -22.04, -11.56), "imtl": (-2.513, -1.975, -2.244),
    "mgda": (-1.448, -11.26, -6.352), "nash_mtl": (-1.695, -4.430, -3.063),
    "pcgrad": (-1.039, -15.36, -8.201), "random_loss_weighting": (-1.100, -18.53, -9.817),
    "rotograd": (-2.705, -1.572, -2.139), "scale_invariant": (-0.962, -27.47, -14.21),
    "uncertainty_weighting": (-1.109, -26.30, -13.70),
}
# Gama & Grassi's gradient-balancing methods that beat uniform loss on CL_RR.
BALANCING = ("imtl", "cagrad", "edm", "cdtt", "famo", "nash_mtl")
# Phan et al. (2025), Table 1, MultiMNIST average accuracy (vanilla, flat).
PHAN = {"mgda": (95.05, 95.68), "pcgrad": (95.06, 95.92), "cagrad": (95.01, 95.95),
        "imtl": (95.28, 95.85), "nash_mtl": (95.01, 95.94), "fairgrad": (94.92, 95.91)}


def _load(path):
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def clrr_table(res):
  names = res["config"]["task_names"]
  rows = [(k, v) for k, v in res["methods"].items() if "error" not in v]
  rows.sort(key=lambda kv: -kv[1]["delta_m_mean"])
  out = ["| method | CL acc | RR MSE | ΔCL% | ΔRR% | Δm% (± std) | MR | interference | G&G ΔCL | G&G ΔRR | G&G avg |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  stl = res["stl"]
  out.append(f"| STL | {stl[names[0]]['test_mean']:.4f} | {stl[names[1]]['test_mean']:.5f} |"
             " 0 | 0 | 0 | | | | | |")
  for k, v in rows:
    gg = GAMA_GRASSI_CLRR.get(k)
    ggs = " | ".join(f"{x:.3f}" for x in gg) if gg else " | | "
    inter = np.mean([np.mean(x) for x in v["interference"]])
    out.append(f"| {v['label']} | {v['test_mean'][0]:.4f} | {v['test_mean'][1]:.5f} | "
               f"{v['delta_task_mean'][0]:.2f} | {v['delta_task_mean'][1]:.2f} | "
               f"{v['delta_m_mean']:.2f} ± {v['delta_m_std']:.2f} | "
               f"{v.get('mean_rank', float('nan')):.2f} | {inter:.3f} | {ggs} |")
  common = [k for k, _ in rows if k in GAMA_GRASSI_CLRR]
  rho = metrics.spearman([res["methods"][k]["delta_m_mean"] for k in common],
                         [GAMA_GRASSI_CLRR[k][2] for k in common]) if len(common) > 2 else float("nan")
  return "\n".join(out), common, rho


def gaps(res, methods=BALANCING, ref="mean"):
  """Paired (same seed: same init and data order) Δm gaps to ``ref``."""
  out = []
  if res is None or ref not in res["methods"]:
    return out
  base = np.asarray(res["methods"][ref]["delta_m"])
  for k in methods:
    v = res["methods"].get(k)
    if not v or "error" in v:
      continue
    d = np.asarray(v["delta_m"]) - base
    out.append((k, v["label"], float(d.mean()), float(d.std()), int((d > 0).sum()), len(d)))
  return out


def gap_table(res, title, methods=BALANCING):
  rows = gaps(res, methods)
  if not rows:
    return ""
  lines = [f"**{title}** (Δm% of the method − Δm% of uniform loss, paired by seed)", "",
           "| method | gap (mean ± std) | seeds with gap > 0 |", "|---|---|---|"]
  for _, label, m, s, pos, n in rows:
    lines.append(f"| {label} | {m:+.2f} ± {s:.2f} | {pos}/{n} |")
  return "\n".join(lines)


def flat_table(res, flat_res=None):
  """Flat vs vanilla; the flat runs come from ``flat_res`` when given (same seeds/data)."""
  flat_res = flat_res or res
  lines = ["| pair | vanilla avg acc % | flat avg acc % | flat − vanilla (paired, ± std) | "
           "seeds flat better | vanilla Δm% | flat Δm% | Phan et al. vanilla → flat |",
           "|---|---|---|---|---|---|---|---|"]
  for k, (pv, pf) in PHAN.items():
    v, f = res["methods"].get(k), flat_res["methods"].get("f_" + k)
    if not v or not f or "error" in v or "error" in f:
      continue
    av = np.asarray(v["test"]).mean(1) * 100
    af = np.asarray(f["test"]).mean(1) * 100
    d = af - av
    lines.append(f"| {v['label']} | {av.mean():.2f} ± {av.std():.2f} | {af.mean():.2f} ± "
                 f"{af.std():.2f} | {d.mean():+.2f} ± {d.std():.2f} | {(d > 0).sum()}/{len(d)} | "
                 f"{v['delta_m_mean']:.2f} | {f['delta_m_mean']:.2f} | {pv} → {pf} |")
  m = res["methods"].get("mean")
  if m:
    am = np.asarray(m["test"]).mean(1) * 100
    lines.append(f"| Uniform loss (ref.) | {am.mean():.2f} ± {am.std():.2f} | | | | "
                 f"{m['delta_m_mean']:.2f} | | |")
  stl = np.mean([res["stl"][n]["test_mean"] for n in res["config"]["task_names"]]) * 100
  lines.append(f"| STL | {stl:.2f} | | | | 0 | | 94.74 |")
  return "\n".join(lines)


def toy_table(res):
  starts = res["starts"]
  lines = ["| method | " + " | ".join(str(tuple(x)) for x in starts) + " | reached |",
           "|---|" + "---|" * (len(starts) + 1)]
  for k, rs in res["results"].items():
    cells = [f"({r['final_losses'][0]:.2f}, {r['final_losses'][1]:.2f}) "
             f"{'✓' if r['reached'] else '✗ d=%.2f' % r['distance']}" for r in rs]
    lines.append(f"| {k} | " + " | ".join(cells) + f" | {sum(r['reached'] for r in rs)}/5 |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--clrr", default=os.path.join(RESULTS, "multimnist_CL_RR_full_mlp.json"))
  p.add_argument("--clcr", default=os.path.join(RESULTS, "multimnist_CL_CR_flat_mlp.json"))
  p.add_argument("--clcr2",
                 default=os.path.join(RESULTS, "multimnist_CL_CR_flat_rho005_mlp.json"))
  p.add_argument("--rlrr", default=os.path.join(RESULTS, "multimnist_RL_RR_mlp.json"))
  p.add_argument("--toy", default=os.path.join(RESULTS, "toy_scale1.json"))
  a = p.parse_args(argv)
  toy = _load(a.toy)
  if toy:
    print("### Toy\n")
    print(toy_table(toy))
    print()
  clrr, clcr, rlrr = _load(a.clrr), _load(a.clcr), _load(a.rlrr)
  if clrr:
    table, common, rho = clrr_table(clrr)
    print("### CL_RR\n")
    print(table)
    print(f"\nSpearman correlation of the Δm% ranking with Gama & Grassi Table 3 over the "
          f"{len(common)} methods in both ({', '.join(common)}): ρ = {rho:.3f}\n")
    print(gap_table(clrr, "CL_RR"))
    print()
  if clcr:
    print(gap_table(clcr, "CL_CR", methods=("mgda", "pcgrad", "cagrad", "imtl", "nash_mtl",
                                            "fairgrad", "edm", "cdtt", "famo")))
    print("\n### CL_CR flat vs vanilla\n")
    print(flat_table(clcr))
    print()
    clcr2 = _load(a.clcr2)
    if clcr2:
      print("\n### CL_CR flat (plain SAM, rho 0.05) vs vanilla\n")
      print(flat_table(clcr, clcr2))
      print()
  if rlrr:
    print(gap_table(rlrr, "RL_RR"))


if __name__ == "__main__":
  main()
