"""Independent NumPy reference helpers used by several method test files."""

import numpy as np


def simplex_projection_ref(v):
  """Euclidean projection onto the simplex by bisection on the threshold."""
  lo, hi = v.min() - 1.0, v.max()
  for _ in range(200):
    tau = 0.5 * (lo + hi)
    if np.maximum(v - tau, 0).sum() > 1:
      lo = tau
    else:
      hi = tau
  return np.maximum(v - 0.5 * (lo + hi), 0)
