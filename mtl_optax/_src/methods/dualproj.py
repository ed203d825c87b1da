"""DualProj: the averaged gradient projected onto the dual cone (GEM, as in TorchJD)."""

from __future__ import annotations

from typing import Optional, Sequence

from mtl_optax._src.methods import upgrad as _upgrad


def dualproj(pref_vector: Optional[Sequence[float]] = None, reg_eps: float = 1e-4,
             norm_eps: float = 0.0, *, max_iters: Optional[int] = None,
             tol: Optional[float] = None, task_specific=None,
             weight_heads: Optional[bool] = None, num_tasks: Optional[int] = None,
             nonfinite: str = "skip"):
  """Projection of the preference-weighted gradient onto the dual cone (DualProj).

  Combines the task gradients with the preferences p (default: the mean) and
  projects the result onto the dual cone {d : Jd ≥ 0} of the rows, the
  Gradient Episodic Memory update (Lopez-Paz & Ranzato 2017, Eq. 11). In Gram
  form, with Ĝ = G / tr(G) + reg_eps·I:

      w = argmin_v vᵀĜv  s.t.  v ≥ p,     d = Jᵀw,

  one QP solved exactly inside jit (:func:`mtl_optax.linalg.dual_cone_weights`;
  TorchJD uses quadprog on the host). With reg_eps = 0, d is non-conflicting;
  with the default reg_eps = 1e-4 (TorchJD's, which its published values use)
  g_iᵀd ≥ −reg_eps·‖J‖_F²·w_i. ``norm_eps`` as in :func:`mtl_optax.upgrad`
  (default 0; TorchJD's 1e-4 returns p whenever ‖J‖_F² < 1e-4).

  Args:
    pref_vector: non-negative preferences p (default: uniform 1/m, as TorchJD).
    reg_eps: ridge on the trace-normalised Gram matrix (default 1e-4).
    norm_eps: if ‖J‖_F² ≤ norm_eps the weights are p (default 0).
    max_iters: active-set budget per round (default 3m + 10).
    tol: relative tolerance on the QP multipliers (default 100·eps); the
      reached KKT residual is ``diagnostics["residual"]``.
    task_specific, weight_heads, num_tasks, nonfinite: see
      :func:`mtl_optax.make_aggregator` (heads get their own gradient).

  References:
    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017; Quinton & Rey, arXiv 2406.16232, 2024 (TorchJD ``DualProj``).
  """
  # One QP, with the bound v ≥ p.
  return _upgrad.dual_cone_aggregator("dualproj", lambda p: p[None, :], pref_vector, reg_eps,
                                      norm_eps, max_iters, tol, task_specific, weight_heads,
                                      num_tasks, nonfinite)
