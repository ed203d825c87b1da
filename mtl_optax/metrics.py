"""Multi-task evaluation metrics: Δm%, mean rank, interference, fixed weights, sharpness.

``import mtl_optax as mo; mo.metrics.delta_m(...)``. See `mtl_optax._src.metrics` and
`mtl_optax._src.sharpness` (``sharpness``: per-task L_i(θ + ε_i) − L_i(θ)).
"""

from mtl_optax._src.metrics import delta_m
from mtl_optax._src.metrics import fixed_weights
from mtl_optax._src.metrics import interference
from mtl_optax._src.metrics import interference_from_gram
from mtl_optax._src.metrics import mean_rank
from mtl_optax._src.metrics import spearman
from mtl_optax._src.sharpness import sharpness

__all__ = (
    "delta_m",
    "fixed_weights",
    "interference",
    "interference_from_gram",
    "mean_rank",
    "sharpness",
    "spearman",
)
