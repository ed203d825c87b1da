"""`make demo`: a quick multi-MNIST comparison on CPU, with the printed table.

    python -m benchmarks.demo [--encoder lenet|mlp] [extra benchmarks.multimnist flags]

Uniform loss (``mean``) vs CAGrad vs F-CAGrad (when ``mo.flat`` exists) on
CL_RR (classify the left digit, reconstruct the right one), against
single-task baselines: 4 000 training composites, 4 epochs, one seed, Adam
1e-3, the fast LeNet encoder, F-CAGrad with plain SAM (ρ = 0.05). A few minutes on a 2-core CPU.
The full
protocol (learning-rate grid, several seeds, every method, tuned linear
scalarisation, fixed weights) is ``python -m benchmarks.multimnist``; see
benchmarks/README.md.
"""

from __future__ import annotations

import sys

from benchmarks import multimnist
from benchmarks import registry

DEMO_ARGS = ["--tasks", "CL_RR", "--seeds", "1", "--epochs", "4", "--lrs", "1e-3",
             "--n-train", "4000", "--n-val", "1000", "--n-test", "2000", "--encoder", "lenet",
             "--ls-grid", "", "--fixed-from", "", "--tag", "demo",
             # The SAM setting under which flat beat vanilla in benchmarks/README.md (plain
             # SAM, ρ = 0.05, separate norms); the harness default (adaptive, ρ = 2) is
             # FS-MTL's ResNet setting and does not help these small encoders.
             "--rho", "0.05", "--no-adaptive", "--sam-norm", "separate"]


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  methods = "mean,cagrad" + (",f_cagrad" if registry.has_flat() else "")
  print(f"mtl_optax demo: multi-MNIST CL_RR, methods {methods} (Δm% vs single-task; "
        "higher is better)", flush=True)
  return multimnist.main(["--methods", methods] + DEMO_ARGS + argv)


if __name__ == "__main__":
  main()
