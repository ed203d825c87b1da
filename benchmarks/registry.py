"""The methods the benchmarks run: one line per method, discovered at run time.

Every entry maps a benchmark name to ``Spec(factory, kwargs)``: ``factory`` is the
public name in ``mtl_optax`` and ``kwargs`` the hyper-parameters we use (the
papers' defaults unless stated). A method whose factory does not exist yet in
the installed ``mtl_optax`` is skipped silently, so the harness always runs
every method that exists. Public aggregator factories that are not listed here
are discovered automatically (built with their defaults) unless they are in
``EXCLUDED``.

Whether a method needs ``losses=`` and whether it is stochastic (takes
``seed=``) is read from the library (``mo.aggregator_info`` and the factory's
signature), not repeated here.

Flat (sharpness-aware) variants: the name ``f_<method>`` (e.g. ``f_cagrad``)
wraps the aggregator in ``mo.flat`` and trains with
``mo.sharpness_aware_task_grads`` (only when ``mo.flat`` exists).

Methods that need more than the per-task gradients and losses declare it, so
that a harness can supply it without knowing the method by name:

* ``needs``: ``"loss_fn"`` -- the factory takes the model's per-task loss
  function ``fn(params, *batch) -> losses (m,)`` as its first argument (passed
  to :func:`build` as ``loss_fn=``); ``"val_batch"`` / ``"train_batch"`` --
  ``tx.update`` takes a validation batch / the training batch of the gradients
  as keyword arguments (tuples of ``fn``'s positional arguments after params).
  The multi-MNIST harness draws ``val_batch`` from the validation split, which
  also selects the learning rate and the epoch (``--meta-split train``: from the
  training split, as Auto-Lambda's code does).
* ``engine``: how the per-task gradients are computed. ``"task_grads"``
  (default: ``mo.task_grads``); ``"samo"``: ``mo.samo_task_grads`` with a
  ``mo.samo_perturbation(**engine_kwargs)`` whose PRNG state the harness carries
  next to the optimizer state; ``"representation"``: ``mo.representation_update``
  (the aggregator on the per-task gradients w.r.t. the shared representation,
  one backward pass through the encoder; MGDA there is MGDA-UB); ``"rotograd"``:
  ``mo.rotograd_update`` (per-task rotations of the shared representation, held
  in the parameters next to the encoder and heads and trained by their own Adam
  at ``rotation_lr_scale`` times the model's learning rate; the aggregator acts
  on the gradients w.r.t. the representation).

Adding a method: one line in ``REGISTRY``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import mtl_optax as mo


@dataclasses.dataclass(frozen=True)
class Spec:
  factory: str
  kwargs: tuple = ()            # ((name, value), ...) -- hashable
  label: Optional[str] = None   # display name (defaults to the benchmark name)
  gradient_based: bool = True   # False for loss weightings (still run in the benchmarks)
  needs: tuple = ()             # of NEEDS (see the module docstring)
  engine: str = "task_grads"    # of ENGINES
  engine_kwargs: tuple = ()     # ((name, value), ...) of the engine's transformation


NEEDS = ("loss_fn", "val_batch", "train_batch")
# engine -> the mtl_optax names it uses (the method is unavailable without them).
ENGINES = {"task_grads": ("task_grads",), "samo": ("samo_perturbation", "samo_task_grads"),
           "representation": ("representation_update",),
           "rotograd": ("rotograd_update", "rotograd_rotations")}


def _s(factory, label=None, gradient_based=True, needs=(), engine="task_grads",
       engine_kwargs=None, **kwargs):
  assert set(needs) <= set(NEEDS) and engine in ENGINES, (needs, engine)
  return Spec(factory, tuple(sorted(kwargs.items())), label, gradient_based, tuple(needs),
              engine, tuple(sorted((engine_kwargs or {}).items())))


# name → Spec. Order = display order.
REGISTRY: dict[str, Spec] = {
    # fixed and loss-based weightings
    "mean": _s("mean", "Uniform loss", gradient_based=False),
    "uncertainty_weighting": _s("uncertainty_weighting", "UW", gradient_based=False),
    "dwa": _s("dwa", "DWA", gradient_based=False),
    "random_loss_weighting": _s("random_loss_weighting", "RLW", gradient_based=False),
    # Uniform on the simplex (Dirichlet(1, ..., 1)): Gama & Grassi's RLW-Dirichlet.
    "rlw_dirichlet": _s("random_loss_weighting", "RLW (Dirichlet)", gradient_based=False,
                        distribution="dirichlet"),
    "scale_invariant": _s("scale_invariant", "SI", gradient_based=False),
    "geometric_loss": _s("geometric_loss", "GLS", gradient_based=False),
    "famo": _s("famo", "FAMO", gradient_based=False),
    # The authors warm up 4 of 100 epochs; with the default (4 warm-up + 1 nadir epoch)
    # a run of <= 5 epochs never leaves the warm-up and is exactly SI. One warm-up epoch
    # keeps STCH itself active in our 5-10 epoch runs.
    "stch": _s("stch", "STCH", gradient_based=False, warmup_epochs=1),
    "go4align": _s("go4align", "GO4Align", gradient_based=False),
    "ldc_mtl": _s("ldc_mtl", "LDC-MTL", gradient_based=False),
    "gradnorm": _s("gradnorm", "GradNorm"),
    # gradient aggregators
    "mgda": _s("mgda", "MGDA"),
    # MGDA on the gradients w.r.t. the shared representation (Sener & Koltun's MGDA-UB), with
    # the harness MGDA's settings (no normalisation) so that only the gradients differ.
    "mgda_ub": _s("mgda", "MGDA-UB", engine="representation"),
    # ... with the representation gradients normalised before the min-norm solve (LibMTL's
    # mgda_gn "l2" and "loss+"; Sener & Koltun's code offers the same choices).
    "mgda_ub_l2": _s("mgda", "MGDA-UB (l2)", engine="representation", normalization="l2"),
    "mgda_ub_loss_plus": _s("mgda", "MGDA-UB (loss+)", engine="representation",
                            normalization="loss+"),
    "pcgrad": _s("pcgrad", "PCGrad"),
    "gradvac": _s("gradvac", "GradVac"),
    "graddrop": _s("graddrop", "GradDrop"),
    "cagrad": _s("cagrad", "CAGrad", c=0.4),
    "imtl": _s("imtl", "IMTL"),
    "nash_mtl": _s("nash_mtl", "Nash-MTL"),
    "fairgrad": _s("fairgrad", "FairGrad"),
    "aligned_mtl": _s("aligned_mtl", "Aligned-MTL"),
    "upgrad": _s("upgrad", "UPGrad"),
    "dualproj": _s("dualproj", "DualProj"),
    "config": _s("config", "ConFIG"),
    "edm": _s("edm", "EDM"),
    "cdtt": _s("cdtt", "CDTT"),
    "moco": _s("moco", "MoCo"),
    "db_mtl": _s("db_mtl", "DB-MTL"),
    "excess_mtl": _s("excess_mtl", "ExcessMTL"),
    "cosmos": _s("cosmos", "COSMOS", gradient_based=False),
    "pbi": _s("pbi", "PBI", gradient_based=False),
    "conicgrad": _s("conicgrad", "ConicGrad"),
    # Two tasks only; both minimised here (no forget task): the normalised gradient sum.
    "ngdiff": _s("ngdiff", "NGDiff", ascend_forget=False),
    # Wrappers, on MGDA: an EMA of its weights (CR-MOGM), MGDA per layer (grouped).
    "cr_mogm": _s("cr_mogm", "CR-MOGM (MGDA)", aggregator=mo.mgda()),
    # (The inner state is built for the harness's two tasks: constant scan carry.)
    "grouped_mgda": _s("grouped", "MGDA per layer", aggregator=mo.mgda(num_tasks=2)),
    # Bilevel methods: task weights trained on validation batches (the papers' defaults).
    "auto_lambda": _s("auto_lambda", "Auto-Lambda", needs=("loss_fn", "val_batch")),
    "moml": _s("moml", "MOML", needs=("loss_fn", "val_batch")),
    "forum": _s("forum", "FORUM", needs=("loss_fn", "train_batch", "val_batch")),
    # SAMO's SAM gradients on the uniform mean, the authors' defaults (rho 1e-3, alpha 0.5:
    # their --beta 0.5, layer-wise mix, no ASAM).
    "samo": _s("mean", "SAMO", engine="samo", engine_kwargs=dict(rho=1e-3, alpha=0.5)),
    # RotoGrad (Javaloy & Valera): rotations of the shared features + the gradient-norm
    # homogenisation on the representation gradients; the reference code's burn-in (20 steps).
    # Rotation learning rate = the model's: the reference example's fallback when no separate
    # rate is given (its README advises a smaller one; not tuned here).
    "rotograd": _s("rotograd", "RotoGrad", engine="rotograd", burn_in_period=20,
                   engine_kwargs=dict(rotation_lr_scale=1.0)),
}

# Public factories the generic harness does not run: they need a weight vector
# (linear_scalarization has its own tuned baseline), another aggregator, extra
# batches or a model change, or they are not meaningful with two tasks.
EXCLUDED = {
    "sum", "linear_scalarization", "flat", "task_perturbation", "sharpness_aware_task_grads",
    "sdmgrad", "modo", "krum", "trimmed_mean",
    "make_aggregator", "make_train_step", "make_nnx_train_step", "task_grads",
    "representation_grads", "representation_update", "aggregator_info", "diagnostics",
    "task_weights", "multi_batch_task_grads", "rotograd_rotation_loss", "rotograd_rotations",
    "rotograd_update", "cr_mogm", "grouped", "group_diagnostics",
    # SAMO is a gradient engine (a perturbation + per-task SAM gradients), not an
    # aggregator: registered as engine="samo" on an aggregator ("samo").
    "samo_perturbation", "samo_task_grads",
}

# The flat-vs-vanilla comparison of Phan et al. (Table 1).
FLAT_PAIRS = ("mgda", "pcgrad", "cagrad", "imtl", "nash_mtl", "fairgrad")


def _discover() -> dict[str, Spec]:
  """Public aggregator factories of mtl_optax not in REGISTRY (built with defaults)."""
  found = {}
  known = {s.factory for s in REGISTRY.values()}
  for name in sorted(dir(mo)):
    if name.startswith("_") or name in EXCLUDED or name in known or name in REGISTRY:
      continue
    fn = getattr(mo, name)
    if not inspect.isfunction(fn):
      continue
    try:
      tx = fn(num_tasks=2)
      mo.aggregator_info(tx)
    except Exception:  # not an aggregator, or needs arguments: not for the generic harness
      continue
    found[name] = Spec(name, (), name)
  return found


def available(include_discovered: bool = True) -> dict[str, Spec]:
  """Every registered method whose factory exists in the installed mtl_optax."""
  out = {k: v for k, v in REGISTRY.items()
         if hasattr(mo, v.factory) and all(hasattr(mo, n) for n in ENGINES[v.engine])}
  if include_discovered:
    out.update(_discover())
  return out


def has_flat() -> bool:
  return hasattr(mo, "flat") and hasattr(mo, "sharpness_aware_task_grads")


def label(name: str) -> str:
  if name.startswith("f_"):
    return "F-" + label(name[2:])
  spec = available().get(name)
  return (spec.label or name) if spec else name


def resolve(names: str, *, gradient_only: bool = False) -> list[str]:
  """Parses ``--methods``: comma list; ``all`` = every available method; ``flat`` =
  the f_ variants of FLAT_PAIRS present; unknown/unavailable names raise."""
  avail = available()
  out = []
  for raw in [n.strip() for n in names.split(",") if n.strip()]:
    if raw == "all":
      out += [n for n, s in avail.items() if s.gradient_based or not gradient_only]
    elif raw == "flat":
      if has_flat():
        out += [f"f_{n}" for n in FLAT_PAIRS if n in avail]
    elif raw == "pairs":
      out += [n for n in FLAT_PAIRS if n in avail]
      if has_flat():
        out += [f"f_{n}" for n in FLAT_PAIRS if n in avail]
    else:
      base_name = raw[2:] if raw.startswith("f_") else raw
      if base_name not in avail:
        raise ValueError(f"unknown or unavailable method {raw!r}; available: {sorted(avail)}")
      if raw.startswith("f_") and not has_flat():
        raise ValueError(f"{raw}: mo.flat / mo.sharpness_aware_task_grads are not available yet.")
      if raw.startswith("f_") and not plain(base_name):
        raise ValueError(f"{raw}: {base_name} has its own step inputs or gradient engine; it "
                         "has no flat variant in the harness.")
      out.append(raw)
  seen = set()
  return [n for n in out if not (n in seen or seen.add(n))]


def plain(name: str) -> bool:
  """Whether ``name`` runs on per-task gradients and losses alone (no needs, default engine)."""
  spec = available().get(name[2:] if name.startswith("f_") else name)
  return spec is not None and not spec.needs and spec.engine == "task_grads"


def build(name: str, *, num_tasks: int, task_specific=None, seed: int = 0,
          overrides: Optional[dict] = None, loss_fn=None):
  """The aggregator for benchmark method ``name``.

  Args:
    overrides: ``{method: {kwarg: value}}`` replacing registry hyper-parameters
    (e.g. the toy problem's CAGrad settings).
    loss_fn: ``fn(params, *batch) -> losses (m,)``, the first argument of the
      factories whose ``Spec.needs`` has ``"loss_fn"`` (required for them).

  Returns:
    ``(tx, info)``: the optax transformation (``mo.flat``-wrapped for ``f_``
    names) and a dict ``{"flat", "weighted", "needs_losses", "stochastic",
    "needs", "engine", "engine_kwargs"}`` (JSON-serialisable).
  """
  flat = name.startswith("f_")
  base_name = name[2:] if flat else name
  spec = available()[base_name]
  fn = getattr(mo, spec.factory)
  args = ()
  if "loss_fn" in spec.needs:
    if loss_fn is None:
      raise ValueError(f"{name}: the factory mo.{spec.factory} needs the model's loss function "
                       "(build(..., loss_fn=fn), fn(params, *batch) -> losses).")
    args = (loss_fn,)
  kwargs = dict(spec.kwargs)
  kwargs.update((overrides or {}).get(base_name, {}))
  params = inspect.signature(fn).parameters
  if "seed" in params:
    kwargs["seed"] = seed
  if "task_specific" in params:
    kwargs["task_specific"] = task_specific
  if "num_tasks" in params:
    kwargs["num_tasks"] = num_tasks
  tx = fn(*args, **kwargs)
  info = mo.aggregator_info(tx)
  meta = {"flat": flat, "weighted": bool(info.weighted), "needs_losses": bool(info.needs_losses),
          "stochastic": bool(info.stochastic), "needs": list(spec.needs),
          "engine": spec.engine, "engine_kwargs": dict(spec.engine_kwargs)}
  if flat:
    flat_params = inspect.signature(mo.flat).parameters
    fkw = {k: v for k, v in (("task_specific", task_specific), ("num_tasks", num_tasks))
           if k in flat_params}
    tx = mo.flat(tx, **fkw)
  return tx, meta


def fixed(weights, *, num_tasks: int, task_specific=None):
  """``mo.linear_scalarization`` with the given weights (a fixed-weight baseline)."""
  return mo.linear_scalarization(list(map(float, weights)), task_specific=task_specific,
                                 num_tasks=num_tasks)
