"""Multi-device checks run by ``tests/test_sharding.py`` in a subprocess.

Run by hand (8 fake CPU devices are requested before jax is imported):

    python -m tests.sharding_worker            # the required methods
    python -m tests.sharding_worker --all      # every method of tests/registry.py

Prints one JSON object per line: a ``case`` (method × mesh layout, or a
semantic check) with the measured relative errors against the one-device run
and boolean facts (replicas identical, shardings kept, collectives present).
The assertions live in ``tests/test_sharding.py``.

Layouts (``jax.sharding.Mesh`` with Auto axes, ``jax.jit`` with explicit
``in_shardings``/``out_shardings``):

* ``one``: everything on device 0 (the reference);
* ``dp8``: mesh (data=8): batch split over 8 replicas, params and optimizer
  state replicated;
* ``dp2_mp4``: mesh (data=2, model=4): batch split over ``data``, the large
  shared leaves split over ``model`` (``mo.distributed.model_sharding``),
  heads replicated;
* ``explicit``: the same 2 × 4 mesh built by ``jax.make_mesh`` with its
  default Explicit axes, aggregator wrapped in ``mo.distributed.auto_axes``.
"""

from __future__ import annotations

import json
import os
import sys

NUM_DEVICES = 8
M = 3          # tasks
BATCH = 64     # divisible by 8
D_IN, HIDDEN = 16, 64
STEPS = 2

# Required by the acceptance criteria (the flat variant is F-CAGrad).
REQUIRED = ("mean", "mgda", "cagrad", "upgrad", "nash_mtl", "pcgrad", "flat_cagrad")
# Methods also run on the pure data-parallel mesh (dp8) and the Explicit-axes mesh.
DP8 = ("mean", "mgda")
EXPLICIT = ("mgda",)


def _setup_env():
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
  os.environ["XLA_FLAGS"] = flags
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def available(mo, names):
  """The names whose factory exists in ``mo`` (``flat_x`` needs ``flat`` and ``x``)."""
  out = []
  for name in names:
    parts = name.split("_", 1) if name.startswith("flat_") else [name]
    if all(hasattr(mo, p) for p in parts) and (
        not name.startswith("flat_") or hasattr(mo, "task_perturbation")):
      out.append(name)
  return out


def is_head(path, leaf):
  del leaf
  import jax  # pylint: disable=g-import-not-at-top
  return "heads" in jax.tree_util.keystr(path)


def build(mo, name):
  """(aggregator, perturbation or None) for a method name, with the heads marked."""
  if name.startswith("flat_"):
    inner = getattr(mo, name[len("flat_"):])(num_tasks=M)
    return (mo.flat(inner, task_specific=is_head),
            mo.task_perturbation(rho_shared=0.05, rho_task=0.05, task_specific=is_head))
  if name in ("mean", "mgda", "cagrad", "upgrad", "nash_mtl", "pcgrad", "imtl"):
    return getattr(mo, name)(task_specific=is_head, num_tasks=M), None
  from tests.registry import ENTRIES  # pylint: disable=g-import-not-at-top
  return ENTRIES[name].build(M), None


def main(argv):
  _setup_env()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  import mtl_optax as mo  # pylint: disable=g-import-not-at-top

  assert len(jax.devices()) == NUM_DEVICES, jax.devices()
  devices = jax.devices()
  emit = lambda **kw: print(json.dumps(kw), flush=True)

  if "--all" in argv:
    from tests.registry import ENTRIES  # pylint: disable=g-import-not-at-top
    names = available(mo, REQUIRED) + [n for n in ENTRIES if n not in REQUIRED]
  else:
    names = available(mo, REQUIRED)

  # --- problem: a 2-layer tanh trunk (shared) and M linear heads ------------------
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params0 = {"trunk": {"w1": jax.random.normal(k[0], (D_IN, HIDDEN)) / 4,
                       "b1": 0.1 * jax.random.normal(k[3], (HIDDEN,)),
                       "w2": jax.random.normal(k[1], (HIDDEN, HIDDEN)) / 8},
             "heads": jax.random.normal(k[2], (M, HIDDEN)) / 8}
  x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, D_IN))
  y = jnp.stack([jnp.sin(x[:, 0]), 3 * jnp.cos(x[:, 1]), x[:, 2] - jnp.sin(x[:, 0])], 1)

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["trunk"]["w1"] + p["trunk"]["b1"])
    h = jnp.tanh(h @ p["trunk"]["w2"])
    return jnp.mean((h @ p["heads"].T - y) ** 2, axis=0)

  meshes = {
      "dp8": jax.sharding.Mesh(np.array(devices), ("data",)),
      "dp2_mp4": jax.sharding.Mesh(np.array(devices).reshape(2, 4), ("data", "model")),
  }
  meshes["explicit"] = jax.make_mesh((2, 4), ("data", "model"),
                                     axis_types=(jax.sharding.AxisType.Explicit,) * 2)

  def layout(cfg):
    """(param shardings, batch sharding) of a layout."""
    if cfg == "one":
      s = jax.sharding.SingleDeviceSharding(devices[0])
      return jax.tree_util.tree_map(lambda _: s, params0), s
    mesh = meshes[cfg]
    if cfg == "dp8":
      return jax.tree_util.tree_map(lambda _: mo.distributed.replicated(mesh), params0), \
          mo.distributed.batch_sharding(mesh, "data")
    return (mo.distributed.model_sharding(params0, mesh, "model", min_size=D_IN * HIDDEN),
            mo.distributed.batch_sharding(mesh, "data"))

  def leaves_np(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]

  def rel_err(a_tree, b_tree):
    err = 0.0
    for a, b in zip(leaves_np(a_tree), leaves_np(b_tree)):
      scale = max(float(np.max(np.abs(b))), 1e-30) if b.size else 1.0
      err = max(err, float(np.max(np.abs(a - b))) / scale if a.size else 0.0)
    return err

  def replicas_identical(arr):
    """Every device's copy of each replicated block is bitwise equal."""
    groups = {}
    for shard in arr.addressable_shards:
      groups.setdefault(str(shard.index), []).append(np.asarray(shard.data))
    return all(all(np.array_equal(g[0], other) for other in g[1:]) for g in groups.values())

  def run(name, cfg):
    agg, perturb = build(mo, name)
    if cfg == "explicit":
      agg = mo.distributed.auto_axes(agg)
      perturb = perturb and mo.distributed.auto_axes(perturb)
    tx = optax.chain(agg, optax.sgd(0.1))
    p_sh, b_sh = layout(cfg)
    params = jax.device_put(params0, p_sh)
    state = jax.jit(tx.init)(params)
    if cfg != "one":
      state = mo.distributed.put_on_mesh(state, meshes[cfg])
    s_sh = jax.tree_util.tree_map(lambda a: a.sharding, state)
    step = mo.make_train_step(loss_fn, tx, perturbation=perturb, jit=False)
    jitted = jax.jit(step, in_shardings=(p_sh, s_sh, b_sh, b_sh),
                     out_shardings=(p_sh, s_sh, None, None))
    xb, yb = jax.device_put(x, b_sh), jax.device_put(y, b_sh)
    compiled = jitted.lower(params, state, xb, yb).compile()
    hlo = compiled.as_text() if cfg != "one" else ""
    weights = []
    for _ in range(STEPS):
      params, state, losses, _ = compiled(params, state, xb, yb)
      diag = mo.diagnostics(state)
      weights.append(diag.get("weights"))
    return dict(params=params, state=state, losses=losses, weights=weights, hlo=hlo,
                p_sh=p_sh, s_sh=s_sh)

  import time  # pylint: disable=g-import-not-at-top
  sharded_for_ckpt = None
  for name in names:
    try:
      t0 = time.process_time()
      ref = run(name, "one")
      emit(case=f"{name}/one", ok=True, cpu_s=time.process_time() - t0)
    except Exception as e:  # pylint: disable=broad-except
      emit(case=f"{name}/one", ok=False, error=f"{type(e).__name__}: {e}"[:2000])
      continue
    cfgs = ["dp2_mp4"] + (["dp8"] if name in DP8 else []) + (
        ["explicit"] if name in EXPLICIT else [])
    for cfg in cfgs:
      try:
        t0 = time.process_time()
        out = run(name, cfg)
      except Exception as e:  # pylint: disable=broad-except
        emit(case=f"{name}/{cfg}", ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        continue
      if name == "mgda" and cfg == "dp2_mp4":
        sharded_for_ckpt = {"params": out["params"], "opt_state": out["state"]}
      w = [a for a in out["weights"] if a is not None]
      w_ref = [a for a in ref["weights"] if a is not None]
      params_kept = all(
          a.sharding.is_equivalent_to(s, a.ndim)
          for a, s in zip(jax.tree_util.tree_leaves(out["params"]),
                          jax.tree_util.tree_leaves(out["p_sh"])))
      emit(
          case=f"{name}/{cfg}", ok=True, cpu_s=time.process_time() - t0,
          params_rel_err=rel_err(out["params"], ref["params"]),
          losses_rel_err=rel_err(out["losses"], ref["losses"]),
          weights_rel_err=rel_err(w, w_ref) if w_ref else None,
          weights_replicated=all(a.sharding.is_fully_replicated for a in w),
          replicas_identical=all(replicas_identical(a) for a in
                                 jax.tree_util.tree_leaves((out["params"], out["state"]))),
          params_sharding_kept=params_kept,
          shared_leaf_spec=str(out["params"]["trunk"]["w2"].sharding.spec),
          all_reduce_in_hlo="all-reduce" in out["hlo"],
          weights=[np.asarray(a).tolist() for a in w] if w else None,
      )

  # --- orbax round trip of a sharded state --------------------------------------------
  if sharded_for_ckpt is not None:
    import tempfile  # pylint: disable=g-import-not-at-top
    try:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    except ImportError:
      ocp = None
    if ocp is not None:
      with tempfile.TemporaryDirectory() as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, "state"), sharded_for_ckpt)
        ckpt.wait_until_finished()
        # The template carries the target shardings (a resuming job builds them the same way).
        template = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), sharded_for_ckpt)
        restored = ckpt.restore(os.path.join(tmp, "state"), template)
        ckpt.close()
      la, lb = jax.tree_util.tree_leaves(sharded_for_ckpt), jax.tree_util.tree_leaves(restored)
      emit(case="checkpoint/sharded_roundtrip", ok=True,
           bitwise=all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(la, lb)),
           shardings=all(a.sharding == b.sharding for a, b in zip(la, lb)),
           n_leaves=len(la))

  # --- the factored Jacobian under a (data, model) mesh -------------------------------
  if hasattr(mo, "factored_task_grads") and "upgrad" in names:
    agg = mo.upgrad(task_specific=is_head, num_tasks=M)

    def factored_update(p, xb, yb):
      losses, jac = mo.factored_task_grads(loss_fn, p, xb, yb, factorize="always")
      return agg.update(jac, agg.init(p), p, losses=losses)[0]

    def stacked_update(p, xb, yb):
      losses, grads = mo.task_grads(loss_fn, p, xb, yb)
      return agg.update(grads, agg.init(p), p, losses=losses)[0]

    one = jax.sharding.SingleDeviceSharding(devices[0])
    want = jax.jit(stacked_update)(*jax.device_put((params0, x, y), one))
    p_sh, b_sh = layout("dp2_mp4")
    got = jax.jit(factored_update)(jax.device_put(params0, p_sh), jax.device_put(x, b_sh),
                                   jax.device_put(y, b_sh))
    emit(case="factored/dp2_mp4", ok=True, update_rel_err=rel_err(got, want))

  # --- semantics: DP weights come from the globally reduced gradients -----------------
  # mgda's weights on the full batch equal the data-parallel ones (checked above);
  # here: the weights of one replica's local batch are different, so equality above
  # is only possible if the gradients were reduced across replicas before the solver.
  if "mgda" in names:
    tx = mo.mgda(task_specific=is_head, num_tasks=M)
    def weights_of(xb, yb):
      losses, grads = mo.task_grads(loss_fn, params0, xb, yb)
      _, st = tx.update(grads, tx.init(params0), params0, losses=losses)
      return mo.task_weights(st)
    w_full = np.asarray(jax.jit(weights_of)(x, y))
    per = BATCH // NUM_DEVICES
    w_local = np.asarray(jax.jit(weights_of)(x[:per], y[:per]))
    emit(case="semantics/local_weights_differ", ok=True,
         w_full=w_full.tolist(), w_local=w_local.tolist(),
         diff=float(np.max(np.abs(w_full - w_local))))

  # --- semantics: the SAM perturbation uses globally reduced gradients ---------------
  if hasattr(mo, "sharpness_aware_task_grads") and hasattr(mo, "task_perturbation"):
    perturb = mo.task_perturbation(rho_shared=0.05, rho_task=0.05, task_specific=is_head)
    sam = lambda p, xb, yb: mo.sharpness_aware_task_grads(loss_fn, p, xb, yb,
                                                          perturbation=perturb)
    ref = jax.jit(sam)(jax.device_put(params0, devices[0]), jax.device_put(x, devices[0]),
                       jax.device_put(y, devices[0]))
    mesh = meshes["dp8"]
    rep, bsh = mo.distributed.replicated(mesh), mo.distributed.batch_sharding(mesh)
    dp = jax.jit(sam)(jax.device_put(params0, rep), jax.device_put(x, bsh),
                      jax.device_put(y, bsh))
    # The alternative semantics (each replica perturbs with its local gradients, the
    # SAM gradients are then averaged), computed replica by replica on one device.
    per = BATCH // NUM_DEVICES
    local = [jax.jit(sam)(params0, x[r * per:(r + 1) * per], y[r * per:(r + 1) * per])[2]
             for r in range(NUM_DEVICES)]
    local_mean = jax.tree_util.tree_map(lambda *a: sum(a) / len(a), *local)
    # The same alternative through the library flag, sharded: one group per replica.
    sam_groups = lambda p, xb, yb: mo.sharpness_aware_task_grads(
        loss_fn, p, xb, yb, perturbation=perturb, perturbation_groups=NUM_DEVICES)
    grouped = jax.jit(sam_groups)(jax.device_put(params0, rep), jax.device_put(x, bsh),
                                  jax.device_put(y, bsh))
    emit(case="semantics/sam_global_perturbation", ok=True,
         sam_rel_err=rel_err(dp[2], ref[2]), loss_grads_rel_err=rel_err(dp[1], ref[1]),
         per_replica_rel_diff=rel_err(local_mean, ref[2]),
         per_replica_flag_rel_err=rel_err(grouped[2], local_mean),
         per_replica_flag_loss_grads_rel_err=rel_err(grouped[1], ref[1]),
         sam_replicated=all(a.sharding.is_fully_replicated for a in jax.tree_util.tree_leaves(dp[2])))
  # --- models with state: BatchNorm statistics and dropout under data parallelism ----
  # The statistics of a batch-sharded step are those of the whole batch (XLA reduces
  # the batch moments across replicas), i.e. the one-device statistics.
  try:
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
  except ImportError:
    nn = None
  if nn is not None:

    class BNNet(nn.Module):
      @nn.compact
      def __call__(self, x):
        # No bias before BatchNorm (it cancels: its gradient is round-off).
        h = nn.Dense(HIDDEN, use_bias=False, name="trunk")(x)
        h = nn.BatchNorm(use_running_average=False, momentum=0.5, name="bn")(h)
        h = nn.Dropout(0.2, deterministic=False)(nn.relu(h))
        return nn.Dense(M, name="heads")(h)

    bn_net = BNNet()
    variables = bn_net.init(jax.random.PRNGKey(2), x)
    bn_params0 = variables["params"]
    bn_state0 = {"batch_stats": variables["batch_stats"], "key": jax.random.PRNGKey(3)}

    def bn_loss_fn(p, st, xb, yb):
      key, dropout_key = jax.random.split(st["key"])
      out, upd = bn_net.apply({"params": p, "batch_stats": st["batch_stats"]}, xb,
                              mutable=["batch_stats"], rngs={"dropout": dropout_key})
      return (jnp.mean((out - yb) ** 2, axis=0),
              {"batch_stats": upd["batch_stats"], "key": key})

    for name in [n for n in ("mean", "mgda", "flat_cagrad") if n in names]:
      agg, perturb = build(mo, name)
      tx = optax.chain(agg, optax.sgd(0.1))
      step = mo.make_train_step(bn_loss_fn, tx, has_state=True, perturbation=perturb)

      def run_state(p_sh, b_sh, step=step, tx=tx):
        p = jax.device_put(bn_params0, p_sh)
        st = jax.device_put(bn_state0, p_sh)
        opt = jax.jit(tx.init)(p)
        xb, yb = jax.device_put(x, b_sh), jax.device_put(y, b_sh)
        for _ in range(STEPS + 1):
          p, opt, st, losses, _ = step(p, opt, st, xb, yb)
        return p, st, losses

      try:
        one = jax.sharding.SingleDeviceSharding(devices[0])
        ref_p, ref_st, ref_l = run_state(one, one)
        mesh = meshes["dp8"]
        dp_p, dp_st, dp_l = run_state(mo.distributed.replicated(mesh),
                                      mo.distributed.batch_sharding(mesh, "data"))
        # What per-replica statistics (one replica's local batch) would have given.
        local = bn_loss_fn(bn_params0, bn_state0, x[:BATCH // NUM_DEVICES],
                           y[:BATCH // NUM_DEVICES])[1]["batch_stats"]
        first = bn_loss_fn(bn_params0, bn_state0, x, y)[1]["batch_stats"]
        emit(case=f"state/{name}/dp8", ok=True,
             stats_rel_err=rel_err(dp_st["batch_stats"], ref_st["batch_stats"]),
             params_rel_err=rel_err(dp_p, ref_p), losses_rel_err=rel_err(dp_l, ref_l),
             key_equal=bool(np.array_equal(np.asarray(dp_st["key"]), np.asarray(ref_st["key"]))),
             stats_replicated=all(a.sharding.is_fully_replicated
                                  for a in jax.tree_util.tree_leaves(dp_st["batch_stats"])),
             local_stats_rel_diff=rel_err(local, first))
      except Exception as e:  # pylint: disable=broad-except
        emit(case=f"state/{name}/dp8", ok=False, error=f"{type(e).__name__}: {e}"[:2000])
  emit(case="done", ok=True, names=names)


if __name__ == "__main__":
  main(sys.argv[1:])
