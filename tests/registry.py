"""Every public aggregator of mtl_optax, with how to build it for m tasks.

Adding a method to the library = one line here; ``test_registry_is_complete``
fails if a public factory is missing. Each entry: a builder ``(m) -> tx`` and
the facts the generic suites need.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import mtl_optax as mo

# `make test` runs the costliest sweeps in a reduced form (fewer task counts in the
# adversarial-input sweep, the stateful methods only in the checkpoint sweep, fewer
# methods on the 8-device mesh); `make test-all` sets MTL_OPTAX_FULL_TESTS=1 and runs
# every sweep in full. Each reduced sweep says what it keeps.
FULL_TESTS = os.environ.get("MTL_OPTAX_FULL_TESTS") == "1"


@dataclasses.dataclass(frozen=True)
class Entry:
  build: Callable[[int], object]
  non_conflicting: bool = False
  deterministic: bool = True
  weighted: bool = True
  extra: Callable[[int], dict] | None = None  # extra update kwargs besides losses
  # Methods undefined for fewer tasks (Krum's scores need m ≥ n_byzantine + 3, the
  # trimmed mean m ≥ 2·trim + 1) raise a clear error below this m instead.
  min_tasks: int = 1
  # Largest row norm of the (possibly normalised) rows the solver works on, from
  # the true row norms and the losses: sets the round-off scale of J d ≥ 0.
  solver_row_scale: Callable = lambda norms, losses: max(norms.max(), 0.0)


def _get(name):
  return getattr(mo, name, None)


def _entries():
  e = {
      "sum": Entry(lambda m: mo.sum(num_tasks=m)),
      "mean": Entry(lambda m: mo.mean(num_tasks=m)),
      "linear_scalarization": Entry(
          lambda m: mo.linear_scalarization([1.0 + i for i in range(m)], num_tasks=m)),
      "mgda": Entry(lambda m: mo.mgda(num_tasks=m), non_conflicting=True),
      "mgda_loss+": Entry(lambda m: mo.mgda("loss+", num_tasks=m), non_conflicting=True,
                          solver_row_scale=lambda norms, losses: (1.0 / losses).max()),
      "pcgrad": Entry(lambda m: mo.pcgrad(num_tasks=m), deterministic=False),
      "cagrad": Entry(lambda m: mo.cagrad(num_tasks=m)),
      "cagrad_c1": Entry(lambda m: mo.cagrad(c=1.0, num_tasks=m), non_conflicting=True),
      "imtl": Entry(lambda m: mo.imtl(num_tasks=m)),
  }
  optional = {
      # UPGrad/DualProj solve a QP regularised by reg_eps·I (TorchJD's default 1e-4):
      # non-conflicting only up to that ridge, which adversarial rows with scale
      # ratios of 1e30 amplify; their exact non-conflict is tested on the
      # property suite in tests/test_qp_methods.py.
      "upgrad": lambda: Entry(lambda m: mo.upgrad(num_tasks=m)),
      "dualproj": lambda: Entry(lambda m: mo.dualproj(num_tasks=m)),
      "nash_mtl": lambda: Entry(lambda m: mo.nash_mtl(num_tasks=m), non_conflicting=True),
      "fairgrad": lambda: Entry(lambda m: mo.fairgrad(num_tasks=m)),
      "aligned_mtl": lambda: Entry(lambda m: mo.aligned_mtl(num_tasks=m)),
      "config": lambda: Entry(lambda m: mo.config(num_tasks=m)),
      "edm": lambda: Entry(lambda m: mo.edm(num_tasks=m)),
      "cdtt": lambda: Entry(lambda m: mo.cdtt(num_tasks=m)),
      "krum": lambda: Entry(lambda m: mo.krum(num_tasks=m), min_tasks=3),
      "trimmed_mean": lambda: Entry(lambda m: mo.trimmed_mean(num_tasks=m), weighted=False,
                                    min_tasks=3),
      "uncertainty_weighting": lambda: Entry(lambda m: mo.uncertainty_weighting(num_tasks=m)),
      "dwa": lambda: Entry(lambda m: mo.dwa(num_tasks=m)),
      "random_loss_weighting": lambda: Entry(
          lambda m: mo.random_loss_weighting(num_tasks=m), deterministic=False),
      "scale_invariant": lambda: Entry(lambda m: mo.scale_invariant(num_tasks=m)),
      "geometric_loss": lambda: Entry(lambda m: mo.geometric_loss(num_tasks=m)),
      "famo": lambda: Entry(lambda m: mo.famo(num_tasks=m)),
      "stch": lambda: Entry(lambda m: mo.stch(num_tasks=m)),
      "gradnorm": lambda: Entry(lambda m: mo.gradnorm(num_tasks=m)),
      "gradvac": lambda: Entry(lambda m: mo.gradvac(num_tasks=m), deterministic=False),
      "graddrop": lambda: Entry(lambda m: mo.graddrop(num_tasks=m), deterministic=False,
                                weighted=False),
      "moco": lambda: Entry(lambda m: mo.moco(num_tasks=m), weighted=False),
      "db_mtl": lambda: Entry(lambda m: mo.db_mtl(num_tasks=m), weighted=False),
      "excess_mtl": lambda: Entry(lambda m: mo.excess_mtl(num_tasks=m)),
      "go4align": lambda: Entry(lambda m: mo.go4align(num_groups=min(2, m), num_tasks=m)),
      "ldc_mtl": lambda: Entry(lambda m: mo.ldc_mtl(num_tasks=m)),
      "cosmos": lambda: Entry(lambda m: mo.cosmos(num_tasks=m)),
      "pbi": lambda: Entry(lambda m: mo.pbi(num_tasks=m)),
      "conicgrad": lambda: Entry(lambda m: mo.conicgrad(num_tasks=m)),
      "cr_mogm": lambda: Entry(lambda m: mo.cr_mogm(mo.mgda(), num_tasks=m)),
  }
  for name, make in optional.items():
    if _get(name) is not None:
      e[name] = make()
  return e


ENTRIES = _entries()

# Public factories deliberately not in ENTRIES (need several batches, a model or
# another aggregator): they have their own tests.
NOT_GENERIC = {"flat", "rotograd", "auto_lambda", "sdmgrad", "modo", "task_perturbation",
               "moml", "forum",
               "ngdiff", "grouped", "group_diagnostics"}  # ngdiff: exactly two tasks
