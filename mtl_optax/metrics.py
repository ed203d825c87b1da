"""Multi-task evaluation metrics: Δm%, mean rank, interference, sharpness, calibration, ...

Δm%, mean rank, interference, fixed weights, sharpness, calibration, weight-noise
robustness and loss-landscape slices.
``import mtl_optax as mo; mo.metrics.delta_m(...)``. See `mtl_optax._src.metrics`,
`mtl_optax._src.sharpness` (``sharpness``: per-task L_i(θ + ε_i) − L_i(θ) and
‖g_i^SAM − g_i‖), `mtl_optax._src.calibration` (ECE, Brier score, NLL, predictive
entropy, reliability diagrams) and `mtl_optax._src.landscape` (filter-normalised
directions, accuracy under weight noise, 1-D/2-D loss slices).
"""

from mtl_optax._src.calibration import ReliabilityDiagram
from mtl_optax._src.calibration import brier_score
from mtl_optax._src.calibration import expected_calibration_error
from mtl_optax._src.calibration import negative_log_likelihood
from mtl_optax._src.calibration import predictive_entropy
from mtl_optax._src.calibration import reliability_diagram
from mtl_optax._src.landscape import filter_normalized_direction
from mtl_optax._src.landscape import loss_landscape_1d
from mtl_optax._src.landscape import loss_landscape_2d
from mtl_optax._src.landscape import noise_robustness
from mtl_optax._src.metrics import delta_m
from mtl_optax._src.metrics import fixed_weights
from mtl_optax._src.metrics import interference
from mtl_optax._src.metrics import interference_from_gram
from mtl_optax._src.metrics import mean_rank
from mtl_optax._src.metrics import spearman
from mtl_optax._src.sharpness import SharpnessReport
from mtl_optax._src.sharpness import sharpness

__all__ = (
    "ReliabilityDiagram",
    "SharpnessReport",
    "brier_score",
    "delta_m",
    "expected_calibration_error",
    "filter_normalized_direction",
    "fixed_weights",
    "interference",
    "interference_from_gram",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "mean_rank",
    "negative_log_likelihood",
    "noise_robustness",
    "predictive_entropy",
    "reliability_diagram",
    "sharpness",
    "spearman",
)
