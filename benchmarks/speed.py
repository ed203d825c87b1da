"""Speed and memory of mtl_optax against the plain step and the PyTorch peers.

Sections (all figures are medians of ≥ 5 repeats after warm-up, with
``jax.block_until_ready``; ratios are measured side by side in one run):

* ``engine``: per-task gradient engines (jacrev, vmap, chunked jacrev,
  shared-representation; stacked vs factored with the Gram matrix) relative to
  the plain summed-loss step, and relative
  to the cost of "1 forward + m backward passes" measured on the same model
  (m separate jitted ``jax.grad`` calls of single task losses, minus (m − 1)
  forward passes); peak temporary memory from XLA's compiled memory analysis
  (``compiled.memory_analysis().temp_size_in_bytes``: deterministic, what the
  executable allocates besides its arguments and outputs), and the output size
  (the m stacked gradients vs the one summed gradient).
* ``aggregators``: time of each method's update (weights + recombination) vs
  the Gram matrix alone, for m tasks and P shared parameters.
* ``full``: full training step (task gradients + aggregator + Adam), with the
  stacked and the factored (``mode="factored"``) engines, against TorchJD
  (``mtl_backward`` + ``jac_to_grad``), TorchJD's Gramian engine
  (``torchjd.autogram.Engine``) and a LibMTL-style loop of
  per-task ``autograd.grad`` calls, same MLP, batch and threads; the PyTorch
  side runs in ``.venv-torch`` (CPU torch wheel for Python 3.11) as a
  subprocess of this script, interleaved with the JAX measurements.

Run: ``python -m benchmarks.speed [--quick] [--sections engine,aggregators,full]``.
Writes ``benchmarks/results/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mo

RESULTS = Path(__file__).parent / "results"
TORCH_PY = Path(__file__).resolve().parent.parent / ".venv-torch" / "bin" / "python"


def timeit_interleaved(calls, repeats=7, warmup=2):
  """Median wall times (s) of several ``name -> (fn, args)``, measured round-robin.

  Interleaving puts every function under the same background load: on a shared
  2-core machine, consecutive blocks of repeats drift by 20-30 % between blocks,
  which sequential timing turns into spurious ratios.
  """
  for fn, args in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def memory_bytes(jitted, *args):
  """(temporary, output) bytes of a jitted function's executable, or (None, None).

  Temporary = what the executable allocates besides its arguments and outputs
  (activations, backward residuals); output = its results (for task_grads the
  m stacked gradients, which every aggregator needing J must hold).
  """
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None, None
  if analysis is None:
    return None, None
  return int(analysis.temp_size_in_bytes), int(analysis.output_size_in_bytes)


# ---------------------------------------------------------------------------
# The multi-task MLP: trunk 784-512-512-512, one linear head per task (stacked).
# ---------------------------------------------------------------------------

def init_mlp(key, m, widths=(784, 512, 512, 512), out=10):
  keys = jax.random.split(key, len(widths))
  trunk = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
           for k, a, b in zip(keys, widths[:-1], widths[1:])]
  heads = {"w": jax.random.normal(keys[-1], (m, widths[-1], out)) / np.sqrt(widths[-1]),
           "b": jnp.zeros((m, out))}
  return {"trunk": trunk, "heads": heads}


def trunk_fn(trunk, x):
  for layer in trunk:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x


def heads_loss_fn(heads, z, y):
  logits = jnp.einsum("bd,mdo->mbo", z, heads["w"]) + heads["b"][:, None, :]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], axis=1)


def loss_fn(params, x, y):
  return heads_loss_fn(params["heads"], trunk_fn(params["trunk"], x), y)


HEADS = lambda path, leaf: "heads" in jax.tree_util.keystr(path)


def batch(m, b=256, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((b, 784)), jnp.float32),
          jnp.asarray(rng.integers(0, 10, size=(m, b)), jnp.int32))


# ---------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------

def _with_gram(losses, jac):
  """The Jacobian and the Gram matrix of its trunk rows (either form)."""
  if isinstance(jac, mo.FactoredJacobian):
    trunk = [l for l, path in enumerate(_leaf_paths(jac.shapes)) if "trunk" in path]
    return losses, jac, jac.gram(trunk)
  return losses, jac, mo.linalg.gram_matrix(jax.tree_util.tree_leaves(jac["trunk"]))


def _leaf_paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def bench_engine(task_counts, repeats):
  rows = []
  for m in task_counts:
    params = init_mlp(jax.random.PRNGKey(0), m)
    x, y = batch(m)
    plain = jax.jit(jax.grad(lambda p, x, y: jnp.sum(loss_fn(p, x, y))))
    fwd = jax.jit(loss_fn)
    single = jax.jit(jax.grad(lambda p, x, y: loss_fn(p, x, y)[0]))
    engines = {
        # The default (chunk_size="auto": tasks in sequence on CPU) and all tasks in one
        # vmapped call (chunk_size=None, the accelerator default).
        "jacrev": jax.jit(lambda p, x, y: mo.task_grads(loss_fn, p, x, y)),
        "jacrev_vmapped": jax.jit(lambda p, x, y: mo.task_grads(loss_fn, p, x, y,
                                                                chunk_size=None)),
        "vmap": jax.jit(lambda p, x, y: mo.task_grads(loss_fn, p, x, y, mode="vmap")),
        "jacrev_chunk4": jax.jit(lambda p, x, y: mo.task_grads(loss_fn, p, x, y, chunk_size=4)),
        "representation": jax.jit(lambda p, x, y: mo.representation_grads(
            trunk_fn, heads_loss_fn, p["trunk"], p["heads"], (x,), (y,))[:3]),
        # What a Gram-based method needs before its weights: per-task gradients + the
        # trunk's Gram matrix, stacked (task_grads) vs factored (factored_task_grads).
        "jacrev_gram": jax.jit(lambda p, x, y: _with_gram(*mo.task_grads(loss_fn, p, x, y))),
        "factored_gram": jax.jit(lambda p, x, y: _with_gram(
            *mo.factored_task_grads(loss_fn, p, x, y))),
    }
    args = (params, x, y)
    times = timeit_interleaved(
        {"plain": (plain, args), "fwd": (fwd, args), "single": (single, args),
         **{name: (fn, args) for name, fn in engines.items()}}, repeats=repeats)
    t_plain, t_fwd, t_single = times["plain"], times["fwd"], times["single"]
    # 1 forward + m backward passes: m full gradient calls share one forward.
    t_ref = m * t_single - (m - 1) * t_fwd
    mem_plain, out_plain = memory_bytes(plain, params, x, y)
    row = {"m": m, "plain_ms": 1e3 * t_plain, "forward_ms": 1e3 * t_fwd,
           "one_fwd_m_bwd_ms": 1e3 * t_ref, "plain_temp_mb": (mem_plain or 0) / 2**20,
           "plain_out_mb": (out_plain or 0) / 2**20}
    for name, fn in engines.items():
      t = times[name]
      mem, out = memory_bytes(fn, params, x, y)
      row[f"{name}_ms"] = 1e3 * t
      row[f"{name}_vs_plain"] = t / t_plain
      row[f"{name}_vs_1f_mb"] = t / t_ref
      row[f"{name}_temp_mb"] = (mem or 0) / 2**20
      row[f"{name}_out_mb"] = (out or 0) / 2**20
      row[f"{name}_temp_vs_plain"] = (mem / mem_plain) if mem and mem_plain else None
    rows.append(row)
    print(f"engine m={m:3d}: plain {row['plain_ms']:.1f} ms | jacrev {row['jacrev_vs_plain']:.2f}x "
          f"(vs 1F+mB {row['jacrev_vs_1f_mb']:.2f}x; vmapped {row['jacrev_vmapped_vs_1f_mb']:.2f}x)"
          f" | vmap {row['vmap_vs_plain']:.2f}x | "
          f"chunk4 {row['jacrev_chunk4_vs_plain']:.2f}x | "
          f"repr {row['representation_vs_plain']:.2f}x"
          f" | temp MB plain {row['plain_temp_mb']:.0f} jacrev {row['jacrev_temp_mb']:.0f} "
          f"chunk4 {row['jacrev_chunk4_temp_mb']:.0f} vmapped {row['jacrev_vmapped_temp_mb']:.0f}"
          f" | out MB plain {row['plain_out_mb']:.0f} jacrev {row['jacrev_out_mb']:.0f}"
          f" | with Gram: jacrev {row['jacrev_gram_ms']:.1f} ms, factored "
          f"{row['factored_gram_ms']:.1f} ms", flush=True)
  return rows


AGGREGATORS = ["mean", "mgda", "pcgrad", "cagrad", "imtl", "upgrad", "dualproj", "nash_mtl",
               "fairgrad", "aligned_mtl", "config"]


def bench_aggregators(task_counts, sizes, repeats):
  rows = []
  for p_size in sizes:
    for m in task_counts:
      if m * p_size > 1e8:  # > 400 MB of float32 gradients: skip on a 2-core box
        continue
      g = {"w": jax.random.normal(jax.random.PRNGKey(m), (m, int(p_size)))}
      params = {"w": jnp.zeros(int(p_size))}
      gram_only = jax.jit(lambda g: mo.linalg.gram_matrix([g["w"]]))
      calls = {"gram": (gram_only, (g,))}
      losses = jnp.ones((m,))
      for name in AGGREGATORS:
        factory = getattr(mo, name, None)
        if factory is None:
          continue
        tx = factory(num_tasks=m)
        fn = jax.jit(lambda g, s, l, tx=tx, params=params: tx.update(g, s, params, losses=l))
        calls[name] = (fn, (g, tx.init(params), losses))
      times = timeit_interleaved(calls, repeats=repeats)
      row = {"m": m, "P": int(p_size)}
      row.update({f"{name}_ms": 1e3 * t for name, t in times.items()})
      for name in AGGREGATORS:
        if f"{name}_ms" in row:
          row[f"{name}_vs_gram"] = row[f"{name}_ms"] / row["gram_ms"]
      rows.append(row)
      jax.clear_caches()   # ~200 executables per P: keep XLA:CPU's memory maps bounded
      print(f"aggregators P={int(p_size):>9d} m={m:3d}: gram {row['gram_ms']:.2f} ms | " +
            " ".join(f"{k[:-3]} {v:.2f}" for k, v in row.items() if k.endswith("_ms")
                     and k != "gram_ms") + " ms", flush=True)
  return rows


FULL_METHODS = ["mean", "mgda", "cagrad", "upgrad", "nash_mtl"]


def jax_full_steps(m, repeats):
  """Full steps, task gradients alone and each aggregator's update alone, interleaved."""
  params = init_mlp(jax.random.PRNGKey(0), m)
  x, y = batch(m)
  plain_tx = optax.adam(1e-3)

  @jax.jit
  def plain_step(p, s, x, y):
    g = jax.grad(lambda p: jnp.sum(loss_fn(p, x, y)))(p)
    u, s = plain_tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  calls = {"plain_sum": (plain_step, (params, plain_tx.init(params), x, y))}
  tg = jax.jit(lambda p: mo.task_grads(loss_fn, p, x, y))
  calls["task_grads_only"] = (tg, (params,))
  losses, grads = tg(params)
  fg = jax.jit(lambda p: mo.factored_task_grads(loss_fn, p, x, y))
  calls["factored_grads_only"] = (fg, (params,))
  _, factors = fg(params)
  update_fn = lambda tx: jax.jit(lambda g, s, p, l: tx.update(g, s, p, losses=l))
  # Pieces of the update, to split the aggregation into Gram / weights + recombination / Adam.
  w = jnp.full((m,), 1.0 / m)
  trunk = [l for l, path in enumerate(_leaf_paths(factors.shapes)) if "trunk" in path]
  calls["gram_only"] = (jax.jit(lambda g: mo.linalg.gram_matrix(
      jax.tree_util.tree_leaves(g["trunk"]))), (grads,))
  calls["combine_only"] = (jax.jit(lambda g, w: [mo.linalg.combine(w, l) for l in
                                                 jax.tree_util.tree_leaves(g["trunk"])]),
                           (grads, w))
  calls["factored_gram_only"] = (jax.jit(lambda f: f.gram(trunk)), (factors,))
  calls["factored_combine_only"] = (jax.jit(lambda f, w: [f.combine(w, l) for l in trunk]),
                                    (factors, w))
  adam = optax.adam(1e-3)
  calls["adam_only"] = (jax.jit(lambda g, s, p: adam.update(g, s, p)),
                        (params, adam.init(params), params))

  memory = {}

  def add(name, factory, **step_kwargs):
    tx = optax.chain(factory(task_specific=HEADS, num_tasks=m), optax.adam(1e-3))
    step = mo.make_train_step(loss_fn, tx, **step_kwargs)
    calls[name] = (lambda p, s, step=step: step(p, s, x, y)[:2], (params, tx.init(params)))
    if name.startswith("upgrad"):
      memory[f"{name}_temp_bytes"] = memory_bytes(step, params, tx.init(params), x, y)[0]
    return tx

  for name in FULL_METHODS:
    factory = getattr(mo, name, None)
    if factory is None:
      continue
    tx = add(name, factory)
    # The aggregator and Adam alone, on precomputed task gradients.
    calls[f"{name}_update_only"] = (update_fn(tx), (grads, tx.init(params), params, losses))
    # The Jacobian's dense-layer blocks as factors (mo.factored_task_grads), and the
    # aggregator + Adam alone on precomputed factors (the Gram products from the
    # factors, weights, Aᵀ(Σ w_i Δ_i), Adam).
    tx = add(f"{name}_factored", factory, mode="factored")
    calls[f"{name}_factored_update_only"] = (update_fn(tx), (factors, tx.init(params), params,
                                                             losses))
  # The accelerator layout (all tasks in one vmapped backward pass) on this CPU.
  add("mean_vmapped", mo.mean, chunk_size=None)
  times = timeit_interleaved(calls, repeats=repeats)
  return times, memory


def torch_full_steps(m, repeats, threads):
  if not TORCH_PY.exists():
    return {"error": f"{TORCH_PY} not found (create it: see benchmarks/README.md)"}
  cmd = [str(TORCH_PY), str(Path(__file__).parent / "_torch_speed.py"), "--m", str(m),
         "--repeats", str(repeats), "--threads", str(threads)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    return {"error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_full(task_counts, repeats, threads, rounds=2):
  """Interleaves JAX and PyTorch measurements (rounds) and keeps per-side medians."""
  rows = []
  for m in task_counts:
    jax_runs, torch_runs = [], []
    for _ in range(rounds):
      times, memory = jax_full_steps(m, repeats)
      jax_runs.append(times)
      torch_runs.append(torch_full_steps(m, repeats, threads))
    med = lambda runs, k: statistics.median(r[k] for r in runs if k in r)
    row = {"m": m, **memory}
    for k in jax_runs[0]:
      row[f"jax_{k}_ms"] = 1e3 * med(jax_runs, k)
    if "error" in torch_runs[0]:
      row["torch_error"] = torch_runs[0]["error"]
    else:
      for k in torch_runs[0]:
        row[f"torch_{k}_ms"] = 1e3 * med(torch_runs, k)
    for name in FULL_METHODS:
      tj = row.get(f"torch_torchjd_{name}_ms")
      if tj and f"jax_{name}_ms" in row:
        row[f"{name}_vs_torchjd"] = row[f"jax_{name}_ms"] / tj
      loop = row.get(f"torch_loop_{name}_ms")
      if loop and f"jax_{name}_ms" in row:
        row[f"{name}_vs_autograd_loop"] = row[f"jax_{name}_ms"] / loop
      factored = row.get(f"jax_{name}_factored_ms")
      if factored and tj:
        row[f"{name}_factored_vs_torchjd"] = factored / tj
      if factored:
        row[f"{name}_factored_vs_jacrev"] = factored / row[f"jax_{name}_ms"]
      autogram = row.get(f"torch_autogram_{name}_ms")
      if factored and autogram:
        row[f"{name}_factored_vs_torchjd_autogram"] = factored / autogram
    if "torch_plain_sum_ms" in row:
      row["plain_vs_torch"] = row["jax_plain_sum_ms"] / row["torch_plain_sum_ms"]
    for name in FULL_METHODS:
      if f"jax_{name}_ms" in row:
        # Two estimates of the aggregation's share of the step: the standalone update
        # (aggregator + Adam on precomputed gradients) over the step, and one minus the
        # task gradients' share.
        row[f"{name}_update_share"] = row[f"jax_{name}_update_only_ms"] / row[f"jax_{name}_ms"]
        row[f"{name}_aggregation_share"] = 1 - row["jax_task_grads_only_ms"] / row[f"jax_{name}_ms"]
      if f"jax_{name}_factored_update_only_ms" in row:
        row[f"{name}_factored_update_share"] = (row[f"jax_{name}_factored_update_only_ms"]
                                                / row[f"jax_{name}_factored_ms"])
      # The update split: Gram matrix | weights + recombination (+ diagnostics, checks) | Adam.
      for engine, step_key in (("", f"jax_{name}_ms"), ("factored_", f"jax_{name}_factored_ms")):
        upd = row.get(f"jax_{name}_{engine}update_only_ms")
        gram = row.get(f"jax_{engine}gram_only_ms")
        if upd and gram and "jax_adam_only_ms" in row:
          step_ms = row[step_key]
          row[f"{name}_{engine}gram_share"] = gram / step_ms
          row[f"{name}_{engine}weights_recombination_share"] = (
              upd - gram - row["jax_adam_only_ms"]) / step_ms
          row[f"{name}_{engine}adam_share"] = row["jax_adam_only_ms"] / step_ms
    rows.append(row)
    print(f"full step m={m}: " + ", ".join(
        f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)), flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
  parser.add_argument("--sections", default="engine,aggregators,full")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--out", default=str(RESULTS / "speed.json"))
  args = parser.parse_args(argv)
  sections = args.sections.split(",")
  repeats = 3 if args.quick else 11
  result = {"meta": {"jax": jax.__version__, "python": platform.python_version(),
                     "devices": str(jax.devices()), "cpu_count": os.cpu_count(),
                     "load_avg_at_start": os.getloadavg(), "quick": args.quick,
                     "date": time.strftime("%Y-%m-%d %H:%M")}}
  if "engine" in sections:
    result["engine"] = bench_engine([2, 4] if args.quick else [2, 4, 8, 16, 40], repeats)
  if "aggregators" in sections:
    result["aggregators"] = bench_aggregators(
        [2, 8] if args.quick else [2, 4, 8, 16, 40],
        [1e5] if args.quick else [1e5, 1e6, 1e7], repeats)
  if "full" in sections:
    result["full"] = bench_full([2] if args.quick else [8], repeats, args.threads,
                                rounds=1 if args.quick else 2)
  result["meta"]["load_avg_at_end"] = os.getloadavg()
  result["meta"]["sections"] = sections
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.exists():   # keep the sections this run did not measure (with their own meta)
    previous = json.loads(out.read_text())
    for key, value in previous.items():
      if key != "meta" and key not in result:
        result[key] = value
        kept = previous.get("meta_of_kept_sections", {})
        result.setdefault("meta_of_kept_sections", {})[key] = kept.get(key, previous.get("meta"))
  out.write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
