# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Nash-MTL weights the way the PyTorch peers compute them: cvxpy + ECOS on the host.

Imported by the peer side of `benchmarks/solvers.py`, which runs with the
torch/cvxpy venv's python (this file imports neither jax nor mtl_optax).

The algorithm re-implements the reference (Navon et al., ICML 2022; the same
procedure in LibMTL's Nash-MTL): G is normalised by its Frobenius norm, then a
sequence of convex problems (concave part linearised at the previous α)

    min_α  1ᵀGα + φ'(α_prev)ᵀ(α − α_prev)
    s.t.   −log(α_i · s) − log((Gα)_i) ≤ 0   for every i,   α ≥ 0,

with G the normalised matrix G/s, s = ‖G‖_F, φ'(α) = 1/α + Gᵀ(1/(Gα)), solved by ECOS
(max_iters 100) for at most 20 rounds, stopping when ‖Gα − 1/α‖ < 1e-3 or α
moves by < 1e-6. The cvxpy problem is built once per m with parameters (as
the reference does), so the timed part is the solve loop only.
"""

import cvxpy as cp
import numpy as np


class NashProblem:
  """One parametrised cvxpy problem per number of tasks."""

  def __init__(self, m):
    self.m = m
    self.alpha = cp.Variable(m, nonneg=True)
    self.prev = cp.Parameter(m, value=np.ones(m))
    self.gram = cp.Parameter((m, m), value=np.eye(m))
    self.scale = cp.Parameter(1, value=np.ones(1))
    g_prev = self.gram @ self.prev
    slope = 1 / self.prev + (1 / g_prev) @ self.gram
    g_alpha = self.gram @ self.alpha
    cons = [-cp.log(self.alpha[i] * self.scale) - cp.log(g_alpha[i]) <= 0 for i in range(m)]
    obj = cp.Minimize(cp.sum(g_alpha) + slope @ (self.alpha - self.prev) / self.scale)
    self.problem = cp.Problem(obj, cons)

  def solve(self, gram, rounds=20):
    scale = np.linalg.norm(gram)
    self.gram.value = gram / scale
    self.scale.value = np.array([scale])
    prev = np.ones(self.m)
    for _ in range(rounds):
      self.alpha.value = prev
      self.prev.value = prev
      try:
        self.problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
      except cp.error.SolverError:
        break
      alpha = self.alpha.value
      if alpha is None:
        break
      done = (np.linalg.norm(self.gram.value @ alpha - 1 / alpha) < 1e-3
              or np.linalg.norm(alpha - prev) < 1e-6)
      prev = alpha
      if done:
        break
    return prev   # α_i (Gα)_i ≥ 1 for the un-normalised G (the constraints use α·s)

