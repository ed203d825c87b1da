"""SPMD sharding: aggregators under jax.jit with NamedSharding on an 8-device CPU mesh.

The multi-device work runs once, in a subprocess (``tests/sharding_worker.py``)
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device
count is fixed when jax starts, so it cannot be changed inside this pytest
process). The worker trains 2 steps of ``optax.chain(aggregator, sgd)`` on a
3-task model with ``mo.make_train_step`` on one device and on each mesh layout,
and reports the differences; this module asserts on them.

Tolerance: float32 throughout; every array after 2 steps (parameters, losses,
task weights) must match the one-device run to ``RTOL = 1e-5`` relative to the
array's largest entry (≈ 80 float32 ulps; measured ≤ 3e-7). The difference is
only the order of the summations XLA splits across devices.

XLA's backend (LLVM) optimisation is turned down in the subprocess to halve the
compile time; the SPMD partitioner and the collectives are unaffected.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import mtl_optax as mo
from tests import sharding_worker as W

RTOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = ([(n, "dp2_mp4") for n in W.REQUIRED] + [(n, "dp8") for n in W.DP8]
         + [(n, "explicit") for n in W.EXPLICIT])


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                      f"--xla_force_host_platform_device_count={W.NUM_DEVICES} "
                      "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  args = [sys.executable, "-m", "tests.sharding_worker"]
  if os.environ.get("MTL_OPTAX_SHARDING_ALL"):
    args.append("--all")
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      rec = json.loads(line)
      out[rec["case"]] = rec
  assert proc.returncode == 0 and "done" in out, (
      f"sharding worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
      f"{proc.stderr[-3000:]}")
  return out


def _case(results, name, cfg):
  if name not in W.available(mo, [name]):
    pytest.skip(f"{name} is not in mtl_optax yet")
  rec = results.get(f"{name}/{cfg}")
  assert rec is not None, f"no result for {name}/{cfg}"
  assert rec["ok"], rec.get("error")
  return rec


@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_sharded_step_equals_one_device(results, name, cfg):
  rec = _case(results, name, cfg)
  assert rec["params_rel_err"] <= RTOL, rec
  assert rec["losses_rel_err"] <= RTOL, rec
  if rec["weights_rel_err"] is not None:
    assert rec["weights_rel_err"] <= RTOL, rec


@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_every_replica_has_identical_weights_and_params(results, name, cfg):
  """The weights are replicated and bitwise equal on all 8 devices; so are the
  replicated parameter blocks and the optimizer state (no drift between replicas)."""
  rec = _case(results, name, cfg)
  assert rec["weights_replicated"], rec
  assert rec["replicas_identical"], rec


@pytest.mark.parametrize("name", W.REQUIRED)
def test_model_sharded_leaves_stay_sharded(results, name):
  rec = _case(results, name, "dp2_mp4")
  assert rec["params_sharding_kept"], rec
  assert rec["shared_leaf_spec"] == "P(None, 'model')", rec
  assert rec["all_reduce_in_hlo"], rec


def test_data_parallel_weights_come_from_globally_reduced_gradients(results):
  """dp8 weights equal the full-batch weights (above) and the compiled step reduces
  across replicas; one replica's local batch would give clearly different weights,
  so the equality is only possible if the per-task gradients are reduced first."""
  rec = _case(results, "mgda", "dp8")
  assert rec["all_reduce_in_hlo"]
  sem = results["semantics/local_weights_differ"]
  np.testing.assert_allclose(rec["weights"][0], sem["w_full"], rtol=RTOL, atol=0)  # step 1
  assert sem["diff"] > 1e-2, sem


def test_sam_perturbation_uses_globally_reduced_gradients(results):
  """sharpness_aware_task_grads under data parallelism = the one-device full batch
  result; the per-replica alternative (local ε_r, averaged SAM gradients) differs."""
  if not hasattr(mo, "sharpness_aware_task_grads"):
    pytest.skip("mo.sharpness_aware_task_grads is not in mtl_optax yet")
  sem = results["semantics/sam_global_perturbation"]
  assert sem["loss_grads_rel_err"] <= RTOL, sem
  assert sem["sam_rel_err"] <= RTOL, sem
  assert sem["sam_replicated"], sem
  assert sem["per_replica_rel_diff"] > 100 * RTOL, sem


def test_per_replica_perturbation_flag(results):
  """``perturbation_groups=8`` on the 8-replica sharded batch = each replica's local
  SAM gradients averaged (computed replica by replica on one device); the loss
  gradients stay the global ones."""
  sem = results["semantics/sam_global_perturbation"]
  assert sem["per_replica_flag_rel_err"] <= RTOL, sem
  assert sem["per_replica_flag_loss_grads_rel_err"] <= RTOL, sem


@pytest.mark.parametrize("name", ["mean", "mgda", "flat_cagrad"])
def test_data_parallel_model_state_equals_one_device(results, name):
  """BatchNorm statistics (and dropout) of a batch-sharded step: the one-device ones."""
  rec = results.get(f"state/{name}/dp8")
  assert rec is not None and rec["ok"], rec
  assert rec["stats_rel_err"] < RTOL and rec["params_rel_err"] < RTOL, rec
  assert rec["losses_rel_err"] < RTOL and rec["key_equal"] and rec["stats_replicated"], rec
  # Not vacuous: one replica's local batch would give other statistics.
  assert rec["local_stats_rel_diff"] > 1e-2, rec


def test_factored_jacobian_on_data_and_model_mesh(results):
  """mo.factored_task_grads + UPGrad under jit on the (data=2, model=4) mesh equals the
  stacked computation on one device."""
  if not hasattr(mo, "factored_task_grads"):
    pytest.skip("factored_task_grads is not in mtl_optax yet")
  rec = results.get("factored/dp2_mp4")
  assert rec is not None and rec["ok"], rec
  assert rec["update_rel_err"] <= RTOL, rec


def test_sharded_state_checkpoint_roundtrip(results):
  """A model-sharded (params, optimizer state) saved with orbax and restored into a
  template carrying the shardings comes back bitwise equal, with the same shardings."""
  pytest.importorskip("orbax.checkpoint")
  rec = results.get("checkpoint/sharded_roundtrip")
  assert rec is not None and rec["ok"], rec
  assert rec["bitwise"] and rec["shardings"], rec


# ---------------------------------------------------------------------------
# The layout helpers, in this process (one device suffices).
# ---------------------------------------------------------------------------

def test_model_sharding_rule():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  params = {"big": np.zeros((6, 256)), "tie": np.zeros((64, 64)), "small": np.zeros((3,))}
  sh = mo.distributed.model_sharding(params, mesh, "model", min_size=1000)
  assert sh["big"].spec == jax.sharding.PartitionSpec(None, "model")
  assert sh["tie"].spec == jax.sharding.PartitionSpec(None, "model")
  assert sh["small"].spec == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match="no axis"):
    mo.distributed.model_sharding(params, mesh, "data")


def test_put_on_mesh_and_bytes_per_device():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  tree = {"a": np.ones((4, 2), np.float32), "b": jax.numpy.zeros((), jax.numpy.int32)}
  placed = mo.distributed.put_on_mesh(tree, mesh)
  for leaf in jax.tree_util.tree_leaves(placed):
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh
  assert mo.distributed.bytes_per_device(placed) == {jax.devices()[0]: 4 * 2 * 4 + 4}
