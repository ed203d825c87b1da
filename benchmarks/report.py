"""Markdown tables for benchmarks/README.md from the multi-MNIST result files.

    python -m benchmarks.report [--clrr FILE] [--clcr-full FILE] [--rlrr FILE]
                                [--clcr FILE] [--clcr2 FILE] [--toy FILE] [--gg FILE ...]

Prints: Gama & Grassi's 16 CL_RR methods ranked against their Table 3 (per encoder,
from merged result files), per task pair, our table (Gama & Grassi's Table 3 alongside for CL_RR,
with the Spearman correlation of the two rankings over the methods in both),
the paired gaps of the gradient methods to uniform loss, and each SMTO next to
its fixed-weight re-run; the flat-vs-vanilla pairs next to Phan et al.'s
Table 1; the toy table.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mtl_optax import metrics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Gama & Grassi (2025), Table 3, multi-MNIST CL_RR: their 16 methods, (CL, RR, avg) Δm%,
# keyed by our benchmark name. Their "MGDA" is MGDA-UB (MGDA on the shared representation:
# our ``mgda_ub``); a result file without ``mgda_ub`` is matched on our parameter-level
# ``mgda`` instead (``GG_FALLBACK``), and the table says which one was used.
GAMA_GRASSI_CLRR = {
    "mean": (-1.043, -16.86, -8.952), "auto_lambda": (-1.232, -7.186, -4.209),
    "cagrad": (-1.685, -2.590, -2.137), "cdtt": (-1.546, -3.596, -2.571),
    "edm": (-1.613, -2.993, -2.303), "famo": (-4.587, -0.745, -2.666),
    "graddrop": (-1.076, -22.04, -11.56), "imtl": (-2.513, -1.975, -2.244),
    "mgda_ub": (-1.448, -11.26, -6.352), "nash_mtl": (-1.695, -4.430, -3.063),
    "pcgrad": (-1.039, -15.36, -8.201), "random_loss_weighting": (-1.100, -18.53, -9.817),
    "rlw_dirichlet": (-1.145, -19.48, -10.31),
    "rotograd": (-2.705, -1.572, -2.139), "scale_invariant": (-0.962, -27.47, -14.21),
    "uncertainty_weighting": (-1.109, -26.30, -13.70),
}
GG_LABELS = {
    "mean": "Unit. Scal.", "auto_lambda": "Auto-Lambda", "cagrad": "CAGrad", "cdtt": "CDTT",
    "edm": "EDM", "famo": "FAMO", "graddrop": "GradDrop", "imtl": "IMTL", "mgda_ub": "MGDA-UB",
    "nash_mtl": "Nash-MTL", "pcgrad": "PCGrad", "random_loss_weighting": "RLW-Normal",
    "rlw_dirichlet": "RLW-Dirichlet", "rotograd": "RotoGrad", "scale_invariant": "SI",
    "uncertainty_weighting": "UW",
}
GG_FALLBACK = {"mgda_ub": "mgda"}


def gg_matches(methods) -> dict:
  """{G&G key: our method key in ``methods``} for the G&G rows that have a run."""
  out = {}
  for k in GAMA_GRASSI_CLRR:
    ours = k if k in methods else GG_FALLBACK.get(k)
    if ours in methods and "error" not in methods[ours]:
      out[k] = ours
  return out


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


def method_table(res, published=None):
  """Our table for one task pair; ``published``: {method: (Δtask1, Δtask2, avg)} alongside."""
  names = res["config"]["task_names"]
  metric = res["config"].get("metric_names", ["", ""])
  rows = [(k, v) for k, v in res["methods"].items() if "error" not in v]
  rows.sort(key=lambda kv: -kv[1]["delta_m_mean"])
  head = (f"| method | {names[0]} {metric[0]} | {names[1]} {metric[1]} | Δ{names[0]}% | "
          f"Δ{names[1]}% | Δm% (± std) | MR | interference |")
  sep = "|---|---|---|---|---|---|---|---|"
  if published:
    head += " G&G Δ1 | G&G Δ2 | G&G avg |"
    sep += "---|---|---|"
  out = [head, sep]
  stl = res["stl"]
  out.append(f"| STL | {stl[names[0]]['test_mean']:.4f} | {stl[names[1]]['test_mean']:.4f} |"
             " 0 | 0 | 0 | | |" + (" | | |" if published else ""))
  match = gg_matches(res["methods"]) if published else {}
  published_for = {ours: published[gg] for gg, ours in match.items()} if published else {}
  for k, v in rows:
    inter = np.nanmean([np.nanmean(x) for x in v["interference"]])
    line = (f"| {v['label']} | {v['test_mean'][0]:.4f} | {v['test_mean'][1]:.4f} | "
            f"{v['delta_task_mean'][0]:.2f} | {v['delta_task_mean'][1]:.2f} | "
            f"{v['delta_m_mean']:.2f} ± {v['delta_m_std']:.2f} | "
            f"{v.get('mean_rank', float('nan')):.2f} | {inter:.3f} |")
    if published:
      gg = published_for.get(k)
      line += (" " + " | ".join(f"{x:.3f}" for x in gg) + " |") if gg else " | | |"
    out.append(line)
  common = [k for k, _ in rows if k in published_for]
  rho = metrics.spearman([res["methods"][k]["delta_m_mean"] for k in common],
                         [published_for[k][2] for k in common]) if len(common) > 2 else float("nan")
  return "\n".join(out), common, rho


def gg_ranking_table(res) -> tuple[str, float, int]:
  """Gama & Grassi's 16 methods: our Δm% and rank next to theirs, and Spearman's ρ.

  Returns ``(markdown, rho, n)`` over the ``n`` methods with a run in ``res``.
  """
  match = gg_matches(res["methods"])
  keys = list(match)
  ours = np.array([res["methods"][match[k]]["delta_m_mean"] for k in keys])
  theirs = np.array([GAMA_GRASSI_CLRR[k][2] for k in keys])
  rank = lambda x: (-x).argsort().argsort() + 1
  r_ours, r_theirs = rank(ours), rank(theirs)
  lines = ["| G&G method | our run | our Δm% | our rank | G&G avg Δm% | G&G rank |",
           "|---|---|---|---|---|---|"]
  for i in np.argsort(r_theirs):
    k = keys[i]
    v = res["methods"][match[k]]
    lines.append(f"| {GG_LABELS[k]} | {v['label']} | {ours[i]:.2f} ± {v['delta_m_std']:.2f} | "
                 f"{r_ours[i]} | {theirs[i]:.3f} | {r_theirs[i]} |")
  missing = [GG_LABELS[k] for k in GAMA_GRASSI_CLRR if k not in match]
  if missing:
    lines.append(f"\nNo run: {', '.join(missing)}.")
  rho = metrics.spearman(list(ours), list(theirs)) if len(keys) > 2 else float("nan")
  return "\n".join(lines), rho, len(keys)


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


def fixed_table(res):
  """Each SMTO next to the re-run with its extracted fixed weights (paired by seed)."""
  lines = ["| source method | method Δm% | fixed weights (seed 0) | fixed-weight Δm% | "
           "fixed − method (paired) |", "|---|---|---|---|---|"]
  n = 0
  for v in res["methods"].values():
    src = v.get("source") if isinstance(v, dict) else None
    if not src or "error" in v or src not in res["methods"]:
      continue
    s = res["methods"][src]
    d = np.asarray(v["delta_m"]) - np.asarray(s["delta_m"])
    w0 = ", ".join(f"{x:.3f}" for x in v["fixed_weights"][0])
    lines.append(f"| {s['label']} | {s['delta_m_mean']:.2f} ± {s['delta_m_std']:.2f} | ({w0}) | "
                 f"{v['delta_m_mean']:.2f} ± {v['delta_m_std']:.2f} | {d.mean():+.2f} ± "
                 f"{d.std():.2f} |")
    n += 1
  return "\n".join(lines) if n else ""


def similar_tasks_table(res) -> str:
  """Gama & Grassi's CL_CR / RL_RR claim, per method: the paired gap to uniform loss and how
  far the task weights stray from uniform (w₁ / (w₁ + w₂) over the epochs and seeds)."""
  lines = ["| method | Δm% (± std) | gap to uniform (paired) | seeds > 0 | "
           "w₁/(w₁+w₂): mean (min–max over epochs) |", "|---|---|---|---|---|"]
  order = sorted((k for k, v in res["methods"].items() if "error" not in v),
                 key=lambda k: -res["methods"][k]["delta_m_mean"])
  for k, label, gap, gap_std, pos, n in gaps(res, order):
    v = res["methods"][k]
    share = "–"
    w = np.abs(np.asarray(v["weights"], np.float64))   # (seeds, epochs, 2)
    if v.get("weighted") and k != "mean" and w.size and np.all(w.sum(-1) > 0):
      r = w[..., 0] / w.sum(-1)
      share = f"{r.mean():.3f} ({r.min():.3f}–{r.max():.3f})"
    lines.append(f"| {label} | {v['delta_m_mean']:.2f} ± {v['delta_m_std']:.2f} | "
                 f"{gap:+.2f} ± {gap_std:.2f} | {pos}/{n} | {share} |")
  return "\n".join(lines)


def toy_table(res):
  """Final (L1, L2) per start, ✓ within the distance tolerance of the Pareto set; max Pareto
  stationarity (min-norm element of the gradients' convex hull) over the starts."""
  starts = res["starts"]
  lines = ["| method | " + " | ".join(str(tuple(x)) for x in starts) +
           " | reached | max stationarity |", "|---|" + "---|" * (len(starts) + 2)]
  for k, rs in res["results"].items():
    cells = [f"({r['final_losses'][0]:.2f}, {r['final_losses'][1]:.2f}) "
             f"{'✓' if r['reached'] else '✗ d=%.2f' % r['distance']}" for r in rs]
    station = max(r["stationarity"] for r in rs)
    lines.append(f"| {k} | " + " | ".join(cells) + f" | {sum(r['reached'] for r in rs)}/5 | "
                 f"{station:.1e} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser()
  f = lambda name: os.path.join(RESULTS, name)
  p.add_argument("--clrr", default=f("multimnist_CL_RR_full_mlp.json"))
  p.add_argument("--clcr-full", default=f("multimnist_CL_CR_full_mlp.json"))
  p.add_argument("--rlrr", default=f("multimnist_RL_RR_full_mlp.json"))
  p.add_argument("--clcr", default=f("multimnist_CL_CR_flat_small_mlp.json"),
                 help="flat vs vanilla, FS-MTL SAM setting")
  p.add_argument("--clcr2", default=f("multimnist_CL_CR_flat_small_rho005_mlp.json"),
                 help="flat vs vanilla, plain SAM rho 0.05")
  p.add_argument("--toy", default=f("toy_scale1.json"))
  p.add_argument("--gg", nargs="*", default=[f("multimnist_CL_RR_gg16_mlp.json"),
                                            f("multimnist_CL_RR_gg16_lenet.json")],
                 help="CL_RR result files (one per encoder) ranked against G&G's 16 methods")
  p.add_argument("--similar", nargs="*",
                 default=[f("multimnist_CL_CR_gg16_lenet_n5000.json"),
                          f("multimnist_RL_RR_gg16_lenet_n5000.json")],
                 help="CL_CR / RL_RR files of the 16 methods (Gama & Grassi's similar tasks)")
  p.add_argument("--interference", default=f("interference_mlp_e8_s3.json"),
                 help="summary of python -m benchmarks.interference")
  a = p.parse_args(argv)
  toy = _load(a.toy)
  if toy:
    print("### Toy\n")
    print(toy_table(toy))
    print()
  for path in a.gg:
    res = _load(path)
    if not res:
      continue
    table, rho, n = gg_ranking_table(res)
    print(f"### Gama & Grassi's methods on CL_RR, {res['config']['encoder']} encoder "
          f"({os.path.basename(path)})\n")
    print(table)
    print(f"\nSpearman ρ of the Δm% rankings over the {n} methods: {rho:.3f}\n")
    fixed = fixed_table(res)
    if fixed:
      print(fixed)
      print()
  for path in a.similar:
    res = _load(path)
    if not res:
      continue
    print(f"### {res['config']['tasks']}, {res['config']['encoder']} encoder, Gama & Grassi's "
          f"methods ({os.path.basename(path)})\n")
    print(method_table(res)[0])
    print()
    print(similar_tasks_table(res))
    print()
  summary = _load(a.interference)
  if summary:
    from benchmarks import interference  # pylint: disable=g-import-not-at-top
    print(f"### Interference vs gap ({os.path.basename(a.interference)})\n")
    print(interference.format_report(summary))
    print()
  gradient_methods = ("mgda", "pcgrad", "cagrad", "imtl", "nash_mtl", "fairgrad", "edm", "cdtt",
                      "famo", "upgrad", "aligned_mtl", "config")
  for title, path in (("CL_RR", a.clrr), ("CL_CR", a.clcr_full), ("RL_RR", a.rlrr)):
    res = _load(path)
    if not res:
      continue
    table, common, rho = method_table(
        res, GAMA_GRASSI_CLRR if title == "CL_RR" else None)
    print(f"### {title}\n")
    print(table)
    if title == "CL_RR":
      print(f"\nSpearman correlation of the Δm% ranking with Gama & Grassi Table 3 over the "
            f"{len(common)} methods in both ({', '.join(common)}): ρ = {rho:.3f}")
    print()
    print(gap_table(res, title, methods=gradient_methods))
    print()
    fixed = fixed_table(res)
    if fixed:
      print(fixed)
      print()
  clcr = _load(a.clcr)
  if clcr:
    print("### CL_CR flat vs vanilla (adaptive SAM, rho 2, joint norm)\n")
    print(flat_table(clcr))
    print()
  clcr2 = _load(a.clcr2)
  if clcr2:
    print("### CL_CR flat vs vanilla (plain SAM, rho 0.05, separate norms)\n")
    print(flat_table(clcr2))
    print()


if __name__ == "__main__":
  main()
