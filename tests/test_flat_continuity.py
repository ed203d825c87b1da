"""mo.flat: the flat term is continuous in ρ for every aggregator (issue 19).

* Every aggregator of the library (the registry plus the multi-batch and
  validation-batch methods), over two steps (stateful methods see their state
  evolve): at ρ = 1e-6 the flat update equals the vanilla one (the flat update
  at ρ = 0, which is exactly the vanilla update: checked on MGDA-l2 below) to
  1e-4, and the flat term T = flat − vanilla is linear in ρ (T/ρ constant over
  two decades); the declared ``scale_degree`` is checked against
  A(sJ) = s^k A(J). With the literal A(h) (the previous behaviour) Nash-MTL,
  FairGrad, MGDA-l2/loss+, MoCo and CDTT fail these checks.
* The authors' methods keep exactly A(g) + A(h): against the separate
  aggregations and against independent NumPy references written from the
  FS-MTL code (MGDA min-norm by enumeration of supports, PCGrad's projection
  loop, IMTL's closed form, CAGrad's dual with SciPy).
* MGDA's ``scale=`` and the NYUv2 recipe (rows normalised by their own norms).
"""

import dataclasses
import itertools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mtl_optax as mo
from tests.registry import ENTRIES, NOT_GENERIC

M, N, STEPS = 3, 12, 2
SCALE = 64.0   # a power of two: sJ is exact


def _data():
  rng = np.random.default_rng(19)
  j = rng.standard_normal((M, N))
  h = rng.standard_normal((M, N))
  wa, wb = rng.standard_normal((2, M, N))
  val_x = rng.standard_normal((M, N))
  return j, h, (wa, wb), val_x


LOSSES = np.array([0.7, 1.3, 0.4])


@dataclasses.dataclass(frozen=True)
class Case:
  build: Callable[[], object]
  # extra update kwargs, from (weight_grads pair, val inputs); scaled with the gradients
  extra: Callable | None = None
  exact_degree: bool = True   # A(sJ) = s^k A(J) exactly (else only in order)


def _val_loss(params, x):
  return jnp.sum(x * params["w"], axis=1) ** 2 + 1.0


def _cases():
  out = {name: Case(lambda e=e: e.build(M),
                    extra=None if e.extra is None else (lambda _, __, e=e: e.extra(M)))
         for name, e in ENTRIES.items() if e.min_tasks <= M}
  wg = lambda wgs, _: {"weight_grads": ({"w": wgs[0]}, {"w": wgs[1]})}
  out.update({
      # Degrees other than 1 (MGDA-l2: 0, FairGrad α = 2: −1/3) and undeclared (CDTT
      # with its degree-0 tensions active from the second step), methods outside the
      # registry, and methods of degree 1 in order only (not exactly homogeneous).
      "mgda_l2": Case(lambda: mo.mgda("l2", num_tasks=M)),
      "fairgrad_alpha2": Case(lambda: mo.fairgrad(alpha=2.0, num_tasks=M)),
      "cdtt_window1": Case(lambda: mo.cdtt(window=1, num_tasks=M)),
      "rotograd": Case(lambda: mo.rotograd(num_tasks=M)),
      "sdmgrad": Case(lambda: mo.sdmgrad(num_tasks=M), extra=wg),
      # λ's dual step sees the scale of the tracked gradients.
      "moco_none": Case(lambda: mo.moco(normalization="none", num_tasks=M), exact_degree=False),
      # λ's projected step is γ J_a J_bᵀ λ.
      "modo": Case(lambda: mo.modo(num_tasks=M), extra=wg, exact_degree=False),
      # The virtual step θ − αΣλg is not linear in g.
      "auto_lambda": Case(lambda: mo.auto_lambda(_val_loss, num_tasks=M),
                          extra=lambda _, x: {"val_batch": (x,)}, exact_degree=False),
      "moml": Case(lambda: mo.moml(_val_loss, num_tasks=M),
                   extra=lambda _, x: {"val_batch": (x,)}, exact_degree=False),
      # FORUM's update adds validation gradients that do not scale with the training ones.
      "forum": Case(lambda: mo.forum(_val_loss, inner_steps=1, num_tasks=M),
                    extra=lambda _, x: {"val_batch": (x,), "train_batch": (x,)},
                    exact_degree=False),
      "grouped": Case(lambda: mo.grouped(mo.nash_mtl(num_tasks=M), groups="leaf")),
  })
  return out


CASES = _cases()
# Methods with no single degree: they get the rescaled flat term without declaring one.
UNDECLARED = {"cdtt", "cdtt_window1", "forum"}
# Public names of NOT_GENERIC that are not aggregators of M = 3 tasks (ngdiff takes
# exactly two; its own tests cover it).
NOT_AGGREGATORS = {"flat", "task_perturbation", "group_diagnostics", "ngdiff"}


def test_every_aggregator_is_covered_and_declares_its_degree():
  """New methods: add to tests/registry.py and declare AggregatorInfo.scale_degree."""
  for name in NOT_GENERIC - NOT_AGGREGATORS:
    assert name in CASES, f"add {name} to CASES"
  undeclared = [name for name, case in CASES.items()
                if mo.aggregator_info(case.build()).scale_degree is None]
  assert set(undeclared) == UNDECLARED, (
      f"declare scale_degree= in the AggregatorInfo of {sorted(set(undeclared) - UNDECLARED)} "
      "(see mo.AggregatorInfo; mo.flat uses it)")


# (scale of the gradients, ρ): ρ = 0 is the vanilla update (the flat term is 0 there,
# checked against the separate aggregator in test_rescaled_term_edge_cases), s = 64
# checks the degree.
PAIRS = ((1.0, 0.0), (1.0, 1e-6), (1.0, 1e-5), (1.0, 1e-4), (SCALE, 0.0))


def _run(case):
  """Flat updates for every (scale, ρ) of PAIRS, over STEPS steps: (len(PAIRS), STEPS, N)."""
  j, h, wgs, val_x = _data()
  params = {"w": jnp.zeros(N)}
  tx = mo.flat(case.build())

  def steps(s, rho):
    extra = {} if case.extra is None else case.extra((s * wgs[0], s * wgs[1]), val_x)
    g = s * jnp.asarray(j)

    def body(state, _):
      d, state = tx.update({"w": g}, state, params, losses=jnp.asarray(LOSSES),
                           sam_grads={"w": g + rho * jnp.asarray(h)}, **extra)
      return state, d["w"]
    return jax.lax.scan(body, tx.init(params), None, length=STEPS)[1]

  run = jax.jit(steps)   # one compilation, one call per pair
  out = [run(jnp.asarray(s), jnp.asarray(rho)) for s, rho in PAIRS]
  return np.asarray(out), mo.aggregator_info(tx).scale_degree


@pytest.mark.parametrize("name", sorted(CASES))
def test_flat_term_is_continuous_and_linear_in_rho(name, x64):
  out, degree = _run(CASES[name])
  d, flat, d_scaled = out[0], out[1:4], out[4]
  rhos = [r for _, r in PAIRS[1:4]]
  assert np.all(np.isfinite(out)) and np.all(np.linalg.norm(d, axis=1) > 0)
  for step in range(STEPS):
    size = np.linalg.norm(d[step])
    # ρ = 1e-6: the vanilla update to 1e-4 (a flat term of degree 0 would be O(1)).
    assert np.linalg.norm(flat[0, step] - d[step]) <= 1e-4 * size
    # The flat term T(ρ) = flat − vanilla is linear in ρ: T/ρ is the same at
    # 1e-6, 1e-5 and 1e-4 (a term of degree k would change by 10^(k−1) per decade).
    slopes = [(flat[i, step] - d[step]) / rho for i, rho in enumerate(rhos)]
    scale = np.linalg.norm(slopes[-1])
    assert scale > 1e-3 * size, "the flat term vanished"
    for s in slopes[:-1]:
      np.testing.assert_allclose(s, slopes[-1], rtol=0, atol=1e-3 * scale)
    # The declared degree: A(sJ) = s^k A(J).
    if degree is not None and CASES[name].exact_degree:
      np.testing.assert_allclose(d_scaled[step], SCALE ** degree * d[step], rtol=0,
                                 atol=1e-8 * SCALE ** degree * size)


# --- The authors' methods stay A(g) + A(h) -----------------------------------------

AUTHORS = {
    "mean": lambda: mo.mean(num_tasks=M),
    "mgda": lambda: mo.mgda(num_tasks=M),
    "pcgrad": lambda: mo.pcgrad(num_tasks=2),
    "cagrad": lambda: mo.cagrad(c=0.4, num_tasks=M),
    "imtl": lambda: mo.imtl(num_tasks=M),
}


def min_norm_ref(a):
  """Min-norm point of the convex hull of the rows of a: every support, solved exactly."""
  best = None
  for k in range(1, a.shape[0] + 1):
    for s in itertools.combinations(range(a.shape[0]), k):
      g = a[list(s)] @ a[list(s)].T
      kkt = np.block([[g, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
      try:
        x = np.linalg.solve(kkt, np.r_[np.zeros(k), 1.0])[:k]
      except np.linalg.LinAlgError:
        continue
      if np.all(x >= -1e-12):
        d = x @ a[list(s)]
        if best is None or d @ d < best @ best:
          best = d
  return best


def pcgrad_ref(a):
  """PCGrad for two tasks (the order of the projections does not matter)."""
  out = np.zeros(a.shape[1])
  for i, j in ((0, 1), (1, 0)):
    gi = a[i].copy()
    if gi @ a[j] < 0:
      gi -= (gi @ a[j]) / (a[j] @ a[j]) * a[j]
    out += gi
  return out


def imtl_ref(a):
  """IMTL-G as in the FS-MTL code: α_{2..m} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2..m}."""
  u = a / np.linalg.norm(a, axis=1, keepdims=True)
  d_mat, u_mat = a[0] - a[1:], u[0] - u[1:]
  alpha = a[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
  return np.r_[1.0 - alpha.sum(), alpha] @ a


def cagrad_ref(a, c=0.4):
  """CAGrad as in the FS-MTL code (dual by SLSQP), rescale = 1: divided by 1 + c²."""
  m = a.shape[0]
  gram, b = a @ a.T, np.full(m, 1.0 / m)
  k = c * np.sqrt(b @ gram @ b)
  res = optimize.minimize(lambda w: w @ gram @ b + k * np.sqrt(max(w @ gram @ w, 1e-30)), b,
                          bounds=[(0, 1)] * m, method="SLSQP",
                          constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                          options={"ftol": 1e-15, "maxiter": 1000})
  gw = res.x @ a
  return (a.mean(0) + k / np.linalg.norm(gw) * gw) / (1 + c * c)


REFERENCES = {"mean": lambda a: a.mean(0), "mgda": min_norm_ref, "pcgrad": pcgrad_ref,
              "cagrad": cagrad_ref, "imtl": imtl_ref}
# MGDA, PCGrad, IMTL: closed forms; CAGrad: SLSQP's accuracy on the dual.
REF_RTOL = {"mean": 1e-12, "mgda": 1e-9, "pcgrad": 1e-12, "cagrad": 1e-5, "imtl": 1e-9}


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_authors_methods_are_exactly_a_of_g_plus_a_of_h(name, x64):
  j, h, _, _ = _data()
  m = 2 if name == "pcgrad" else M
  # Conflicting rows (PCGrad projects) and a flat family of another shape.
  g, hf = j[:m], 1e-3 * h[:m]
  params = {"w": jnp.zeros(N)}
  flat_tx, a_tx = mo.flat(AUTHORS[name]()), AUTHORS[name]()

  @jax.jit
  def run(g, hf):
    d, _ = flat_tx.update({"w": g}, flat_tx.init(params), params, sam_grads={"w": g + hf})
    a_g, _ = a_tx.update({"w": g}, a_tx.init(params), params)
    a_h, _ = a_tx.update({"w": (g + hf) - g}, a_tx.init(params), params)
    return d["w"], a_g["w"] + a_h["w"]

  got, separate = map(np.asarray, run(jnp.asarray(g), jnp.asarray(hf)))
  np.testing.assert_array_equal(got, separate)
  ref = REFERENCES[name]
  want = ref(g) + ref((g + hf) - g)
  np.testing.assert_allclose(got, want, rtol=REF_RTOL[name], atol=REF_RTOL[name] * 1e-3)


def test_mgda_scale_and_the_nyuv2_recipe(x64):
  """NYUv2 F-MGDA (FS-MTL nyuv2/train.py): 3·(A(ĝ) + A(ĥ)), rows normalised by their norms."""
  j, h, _, _ = _data()
  j = j * np.array([[1.0], [20.0], [0.05]])   # very different row norms
  hf = 1e-2 * h
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  params = {"w": jnp.zeros(N)}
  vanilla = mo.mgda("l2", scale=3.0)
  celeba = mo.flat(mo.mgda(scale=40.0))
  nyu_sum = mo.flat(mo.mgda("l2", scale=3.0), flat_term="sum")
  nyu_auto = mo.flat(mo.mgda("l2", scale=3.0))

  @jax.jit
  def run(g, sam):
    d, state = vanilla.update({"w": g}, vanilla.init(params), params)
    flats = [tx.update({"w": g}, tx.init(params), params, sam_grads={"w": sam})[0]["w"]
             for tx in (celeba, nyu_sum, nyu_auto)]
    return d["w"], mo.task_weights(state), flats

  d, weights, (d_celeba, d_sum, d_auto) = run(jnp.asarray(j), jnp.asarray(j + hf))
  # Vanilla: d = c Σ α_i ĝ_i, weights w_i = c α_i / ‖g_i‖.
  want = 3.0 * min_norm_ref(unit(j))
  np.testing.assert_allclose(d, want, rtol=1e-9)
  np.testing.assert_allclose(np.asarray(weights) @ j, want, rtol=1e-9)
  # CelebA's F-MGDA: 40·(A(g) + A(h)), no normalisation.
  np.testing.assert_allclose(d_celeba, 40.0 * (min_norm_ref(j) + min_norm_ref(hf)), rtol=1e-9)
  # NYUv2: the authors' literal sum, and our continuous default (flat term × ‖h‖/‖g‖).
  r = np.linalg.norm(hf) / np.linalg.norm(j)
  for got, factor in ((d_sum, 1.0), (d_auto, r)):
    want = 3.0 * (min_norm_ref(unit(j)) + factor * min_norm_ref(unit(hf)))
    np.testing.assert_allclose(got, want, rtol=1e-9)
  # The default for MGDA-l2 (degree 0) is the rescaled term, for MGDA (degree 1) A(h).
  assert mo.aggregator_info(mo.mgda("l2", scale=3.0)).scale_degree == 0
  assert mo.aggregator_info(mo.mgda(scale=40.0)).scale_degree == 1
  for bad in (0.0, -1.0, float("inf")):
    with pytest.raises(ValueError, match="scale"):
      mo.mgda(scale=bad)


def test_rescaled_term_edge_cases():
  """Zero, huge and tiny gradients (float32): finite, documented results."""
  j, h, _, _ = _data()
  j32, h32 = jnp.asarray(j[:2], jnp.float32), jnp.asarray(h[:2], jnp.float32)
  params = {"w": jnp.zeros(N)}
  tx, vanilla_tx = mo.flat(mo.mgda("l2", num_tasks=2)), mo.mgda("l2", num_tasks=2)
  fn = jax.jit(lambda g, s: tx.update({"w": g}, tx.init(params), params,
                                      sam_grads={"w": s})[0]["w"])
  vanilla = jax.jit(lambda g: vanilla_tx.update({"w": g}, vanilla_tx.init(params), params)[0]["w"])
  # h = 0: exactly the vanilla update; g = 0: no flat term (and a zero vanilla update).
  np.testing.assert_array_equal(fn(j32, j32), vanilla(j32))
  np.testing.assert_array_equal(fn(jnp.zeros_like(j32), h32), 0.0)
  # h where g is zero, so that g + h holds it exactly whatever ‖h‖/‖g‖.
  g1 = j32.at[:, -4:].set(0.0)
  h1 = jnp.zeros_like(g1).at[:, -4:].set(h32[:, -4:])
  # Degree 0: T(h) = r·A(h/r) does not change under a common scaling of g and h,
  # also where ‖h‖² underflows (1e-22 entries) or ‖g‖² overflows (1e20) float32.
  ref = fn(g1, g1 + 1e-10 * h1) - vanilla(g1)
  for s in (1e-12, 1e20):
    g, hf = s * g1, s * 1e-10 * h1
    np.testing.assert_allclose(fn(g, g + hf) - vanilla(g), ref, rtol=1e-4,
                               atol=1e-6 * np.abs(ref).max())
  # ‖h‖/‖g‖ ≈ 1e-36: T ≈ 1e-36·A(h/r), formed without overflowing 1/r.
  g, hf = 1e18 * g1, 1e-18 * h1
  got = fn(g, g + hf)
  assert np.all(np.isfinite(got)) and 0 < np.abs(got[-4:]).max() < 1e-30
  np.testing.assert_array_equal(got[:-4], vanilla(g)[:-4])


class JitEquality(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rescaled_flat_update(self):
    with jax.enable_x64(True):
      j, h, _, _ = _data()
      g, sam = {"w": jnp.asarray(j[:2])}, {"w": jnp.asarray(j[:2] + 1e-3 * h[:2])}
      params = {"w": jnp.zeros(N)}
      # The rescaled term's own code (norms, two-step powers of two) without a solver.
      tx = mo.flat(mo.mean(num_tasks=2), flat_term="rescaled")
      state = tx.init(params)
      fn = self.variant(lambda g, s, st: tx.update(g, st, params, sam_grads=s))
      got, got_state = fn(g, sam, state)
      want, want_state = jax.jit(lambda g, s, st: tx.update(g, st, params, sam_grads=s))(
          g, sam, state)
      np.testing.assert_allclose(got["w"], want["w"], rtol=1e-12, atol=1e-15)
      chex.assert_trees_all_close(got_state, want_state, rtol=1e-12, atol=1e-15)


def test_flat_term_errors():
  with pytest.raises(ValueError, match="flat_term"):
    mo.flat(mo.mean(), flat_term="scaled")
  with pytest.raises(ValueError, match="decomposed"):
    mo.flat(mo.mean(), "direct", flat_term="sum")
