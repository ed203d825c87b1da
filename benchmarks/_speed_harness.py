# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Shared JAX-side driver of the JAX-vs-PyTorch step benchmarks.

Used by `benchmarks/lenet_speed.py` and `benchmarks/resnet_speed.py`. A script
describes itself with a `Benchmark` (its JAX step builders, the rows pairing a
JAX step with a PyTorch step, its torch script, defaults, table and plot
layout) and calls `main`, which parses the common command line, runs the
benchmark and writes ``benchmarks/results/<name>.json`` (``<name>_quick.json``
with ``--quick``, or ``--out``) and a PNG bar chart next to it.

The PyTorch side (``benchmarks/<torch_script>``) runs in a subprocess with the
torch venv's python, driven over JSON lines (`TorchSide`; the protocol is in
`benchmarks/_torch_harness.py`). After the JAX steps are built, compiled and
warmed up and the torch steps warmed up, repeats are interleaved (every JAX
step, then every torch step, with a short pause after each) so that both sides
see the same machine load; each row reports the median and minimum of both and
the ratio of medians JAX / torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"
BATCH = 256

Runner = Callable[[], None]
Row = tuple[str, str]   # (JAX step, PyTorch step doing the same work)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """What differs between the speed scripts.

  Attributes:
    name: script name: the results file stem and the progress label.
    torch_script: the PyTorch server, a file in ``benchmarks/``.
    build: ``build(jax_step_name, batch)`` -> zero-argument callable doing one
      jitted, blocking training step (see `runner`).
    rows: the default rows.
    quick_rows: the rows of ``--quick``.
    extra_rows: rows only run when named with ``--steps``.
    available: whether a JAX step can be built (rows failing it are dropped).
    repeats: default number of interleaved repeats (``--quick``: 3).
    warmup: default ``--warmup``.
    quick_help: help text of ``--quick``.
    batch_flag: whether the script has a ``--batch`` flag (else batch `BATCH`).
    progress: ``"tqdm"`` (a progress bar, if tqdm is installed) or ``"log"``
      (one stderr line per repeat).
    compile_times: whether each row records
      ``jax_compile_and_first_step_s``.
    report_extra: extra report entries (placed after ``batch``).
    title: table title (``"<title>, batch B, median of ..."``).
    table_widths: widths of the JAX step, torch step and timing columns.
    number_widths: widths of the median and minimum numbers.
    plot_title: plot title (``"<plot_title>, batch B, 2-core CPU"``).
    figsize: plot size in inches.
    log_scale: logarithmic y axis.
  """
  name: str
  torch_script: str
  build: Callable[[str, int], Runner]
  rows: tuple[Row, ...]
  quick_rows: tuple[Row, ...]
  extra_rows: tuple[Row, ...] = ()
  available: Callable[[str], bool] = lambda name: True
  repeats: int = 11
  warmup: int = 3
  quick_help: str = "3 repeats"
  batch_flag: bool = False
  progress: str = "tqdm"
  compile_times: bool = False
  report_extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  title: str = "step"
  table_widths: tuple[int, int, int] = (14, 12, 16)
  number_widths: tuple[int, int] = (8, 5)
  plot_title: str = "step"
  figsize: tuple[float, float] = (7, 3.5)
  log_scale: bool = False


def is_head(path, _) -> bool:
  """``task_specific`` predicate: the parameters under ``heads``."""
  return getattr(path[0], "key", None) == "heads"


def runner(step_fn, state: Sequence, batch) -> Runner:
  """Zero-argument callable: one jitted step, blocking, state carried over.

  Args:
    step_fn: ``step_fn(*state, batch) -> (*new_state, loss)``.
    state: the initial state (e.g. params, optimizer state[, model state]).
    batch: the batch, put on the device once.
  """
  state = list(state)
  batch = jax.device_put(batch)

  def run():
    *new_state, loss = step_fn(*state, batch)
    state[:] = new_state
    jax.block_until_ready(loss)
  return run


class TorchSide:
  """A PyTorch server process (``benchmarks/<script>``), driven over JSON lines."""

  def __init__(self, script: str, python: pathlib.Path, steps, batch: int,
               seed: int = 0):
    env = dict(os.environ, PYTHONPATH="")
    self.proc = subprocess.Popen(
        [str(python), str(ROOT / "benchmarks" / script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._ask({"cmd": "setup", "batch": batch, "seed": seed,
                           "threads": 2, "steps": sorted(set(steps))})

  def _ask(self, msg: dict) -> dict:
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the torch process died (see its stderr above)")
    return json.loads(line)

  def run(self, step: str, n: int = 1) -> list[float]:
    return self._ask({"cmd": "run", "step": step, "n": n})["times"]

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()


def stats(times: list[float]) -> dict:
  """Median, minimum and all times, in milliseconds."""
  ms = np.asarray(times) * 1e3
  return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
          "times_ms": [round(float(t), 3) for t in ms]}


def _repeats(bench: Benchmark, repeats: int) -> Iterable[int]:
  """``range(repeats)`` with the benchmark's progress reporting."""
  if bench.progress == "log":
    def logged():
      for i in range(repeats):
        yield i
        print(f"[{bench.name}] repeat {i + 1}/{repeats}", file=sys.stderr,
              flush=True)
    return logged()
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return range(repeats)
  return tqdm(range(repeats), desc=bench.name, unit="repeat")


def run(bench: Benchmark, rows, repeats: int, warmup: int, torch_python,
        pause: float, batch: int = BATCH) -> dict:
  """Builds, warms up and times every row, interleaving JAX and torch."""
  rows = [r for r in rows if bench.available(r[0])]
  jax_names = list(dict.fromkeys(r[0] for r in rows))
  load_before = os.getloadavg()
  t_build = time.perf_counter()
  jax_run, compile_s = {}, {}
  for name in jax_names:
    t0 = time.perf_counter()
    jax_run[name] = bench.build(name, batch)
    for i in range(max(warmup, 1)):   # compile + first step, then warm up
      jax_run[name]()
      if i == 0:
        compile_s[name] = time.perf_counter() - t0
  torch = None
  if torch_python is not None and pathlib.Path(torch_python).exists():
    torch = TorchSide(bench.torch_script, torch_python, [r[1] for r in rows],
                      batch)
    for name in torch.info["steps"]:
      torch.run(name, warmup)
  build_s = time.perf_counter() - t_build
  jax_times = {n: [] for n in jax_names}
  torch_times = {r[1]: [] for r in rows}
  for _ in _repeats(bench, repeats):
    for name in jax_names:
      t0 = time.perf_counter()
      jax_run[name]()
      jax_times[name].append(time.perf_counter() - t0)
      time.sleep(pause)   # let spinning worker threads of either side settle
    if torch is not None:
      for name in torch_times:
        if name in torch.info["steps"]:
          torch_times[name] += torch.run(name)
          time.sleep(pause)
  if torch is not None:
    torch.close()
  results = []
  for jax_name, torch_name in rows:
    row = {"jax_step": jax_name, "torch_step": torch_name,
           "jax": stats(jax_times[jax_name])}
    if bench.compile_times:
      row["jax_compile_and_first_step_s"] = compile_s[jax_name]
    if torch_times.get(torch_name):
      row["torch"] = stats(torch_times[torch_name])
      row["ratio_median"] = row["jax"]["median_ms"] / row["torch"]["median_ms"]
    results.append(row)
  return {
      "rows": results, "repeats": repeats, "warmup": warmup, "batch": batch,
      **bench.report_extra,
      "load_before": load_before, "load_after": os.getloadavg(),
      "build_and_warmup_s": build_s,
      "versions": {"python": platform.python_version(),
                   "jax": jax.__version__, "optax": optax.__version__,
                   "torch": None if torch is None else torch.info["torch"]},
      "cpu_count": os.cpu_count(), "platform": platform.platform(),
      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
  }


def print_table(bench: Benchmark, report: dict) -> None:
  """Prints one line per row: JAX and torch median (min) ms and their ratio."""
  step_w, torch_step_w, col_w = bench.table_widths
  med_w, min_w = bench.number_widths
  print(f"\n{bench.title}, batch {report['batch']}, median of "
        f"{report['repeats']} interleaved repeats (load "
        f"{report['load_before'][0]:.2f} -> {report['load_after'][0]:.2f})")
  print(f"{'JAX step':{step_w}s} {'JAX ms (min)':>{col_w}s} "
        f"{'torch step':>{torch_step_w}s} {'torch ms (min)':>{col_w}s} "
        f"{'JAX/torch':>10s}")

  def ms(s):
    return f"{s['median_ms']:{med_w}.1f} ({s['min_ms']:{min_w}.1f})"

  for r in report["rows"]:
    t = r.get("torch")
    tcol = ms(t) if t else "-"
    ratio = f"{r['ratio_median']:9.2f}x" if t else "-"
    print(f"{r['jax_step']:{step_w}s} {ms(r['jax'])} "
          f"{r['torch_step']:>{torch_step_w}s} {tcol:>{col_w}s} {ratio:>10s}")


def plot(bench: Benchmark, report: dict, path: pathlib.Path) -> None:
  """Bar chart of the JAX and torch medians per row (needs matplotlib)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  rows = report["rows"]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=bench.figsize)
  ax.bar(x - 0.2, [r["jax"]["median_ms"] for r in rows], 0.4, label="JAX")
  ax.bar(x + 0.2, [r.get("torch", {}).get("median_ms", 0) for r in rows], 0.4,
         label="PyTorch")
  ax.set_xticks(x, [r["jax_step"] for r in rows], rotation=15)
  if bench.log_scale:
    ax.set_yscale("log")
  ax.set_ylabel("ms / step (median)")
  ax.set_title(f"{bench.plot_title}, batch {report['batch']}, 2-core CPU")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(bench: Benchmark, description: str, argv=None) -> dict:
  """Command line of a speed script: parse, run, print, write JSON and PNG."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help=bench.quick_help)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=bench.warmup)
  if bench.batch_flag:
    parser.add_argument("--batch", type=int, default=BATCH)
  parser.add_argument("--steps", nargs="*", default=None,
                      help="JAX step names (default: every row)")
  parser.add_argument("--torch-python", default=os.environ.get(
      "MTL_OPTAX_TORCH_PYTHON", str(TORCH_PYTHON)))
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--pause", type=float, default=0.05)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = bench.quick_rows if args.quick else bench.rows
  if args.steps:
    rows = tuple(r for r in bench.rows + bench.extra_rows
                 if r[0] in args.steps)
  repeats = args.repeats or (3 if args.quick else bench.repeats)
  report = run(bench, rows, repeats, 1 if args.quick else args.warmup,
               None if args.no_torch else args.torch_python, args.pause,
               getattr(args, "batch", BATCH))
  print_table(bench, report)
  out = pathlib.Path(args.out) if args.out else RESULTS / (
      f"{bench.name}_quick.json" if args.quick else f"{bench.name}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  plot(bench, report, out.with_suffix(".png"))
  print(f"wrote {out}")
  return report
