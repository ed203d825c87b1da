"""Multi-MNIST comparison of multi-task methods (benchmarks.md §1).

    python -m benchmarks.multimnist --tasks CL_RR --methods mean,cagrad,imtl --seeds 3 \
        --epochs 10 [--quick] [--encoder lenet|mlp|resnet18|resnet_small]

Protocol (after Gama & Grassi 2025, Navon et al. 2022):

1. Single-task (STL) baselines: the same encoder + one head per task, trained
   alone; their test metrics (mean over seeds) are the references S of Δm%.
2. Every method: Adam, a small learning-rate grid. The learning rate is
   selected on the validation split with seed 0 (score = validation Δm% against
   the STL validation metrics, at the best epoch); the other seeds run at the
   selected rate. Each run reports the test metrics at its best validation epoch.
3. A tuned linear-scalarisation baseline ``ls_tuned``: fixed weights
   (w, 1 − w) for w in ``--ls-grid``, selected on validation like a learning
   rate (at the learning rate selected for ``mean``).
4. Fixed weights from a method's run (``--fixed-from``): the EMA (β = 0.9) of
   the per-epoch mean task weights of that run (``mo.metrics.fixed_weights``),
   normalised to sum 1, re-trained with ``mo.linear_scalarization``
   (``fixed_<method>``), per seed.
5. Δm% (test, per seed, mean ± std), per-task Δ, mean rank, the interference
   measure (mean cosine of each task's shared gradient with the average, per
   epoch) and the task weights over training.

Implementation: per-task gradients with ``mo.task_grads`` (heads marked
``task_specific``), the aggregator chained with ``optax.adam``; flat variants
(``f_<method>``) use ``mo.flat`` + ``mo.sharpness_aware_task_grads``. A whole
epoch is one jitted ``jax.lax.scan`` over device-resident data; one compilation
per method (the learning rate is a traced argument); evaluation is jitted.
Encoders with BatchNorm (``resnet18``, ``resnet_small``) carry their
statistics as a model state through the epoch scan (``has_state=True`` in
``mo.task_grads`` / ``mo.sharpness_aware_task_grads``; the single-task
baselines likewise) and evaluate with the running averages; the other
encoders carry an empty state and run exactly as before.

Methods with step inputs beyond the gradients (declared in their registry
entry, see ``benchmarks/registry.py``): the bilevel methods (Auto-Lambda, MOML,
FORUM) are built with :func:`batch_loss_fn` and receive ``val_batch=`` (and
FORUM ``train_batch=``): each step draws a validation mini-batch of the same
size from the validation split (consecutive shuffles, independent of the
training permutation). **These methods thus train their task weights -- and
FORUM the model itself, whose update contains the validation gradients -- on
the validation split that also selects the learning rate and the best epoch**,
so their validation scores are optimistic and their numbers not strictly
comparable with the other methods'. ``--meta-split train`` draws these batches
from a second shuffle of the training split instead, as Auto-Lambda's code (a
copy of the training loader in another order). SAMO (``engine="samo"``) computes
the gradients with ``mo.samo_task_grads`` and carries the perturbation's PRNG
state in the optimizer state; MGDA-UB (``engine="representation"``) runs
``mo.representation_update``; RotoGrad (``engine="rotograd"``) runs
``mo.rotograd_update``: the heads read per-task rotations of the encoder's
features (in training and evaluation), the rotation generators live in the
parameters under ``"rotation"`` and are trained by their own Adam.

Tasks: a pair (``CL_RR``, ``CL_CR``, ``RL_RR``) or a comma list of task codes
(`TASKS`: digit classes, parities, "≥ 5", left > right, the sum's last digit,
the raw sum, the reconstructions), each optionally with a loss factor
(``--tasks "CL,PL,GT,SUM,RR*0.1"``; the many-task sets of
``benchmarks.interference``). ``--from FILE`` reuses an earlier run's STL
baselines and method entries (e.g. to re-train only fixed weights).

Outputs ``benchmarks/results/multimnist_<tasks>_<tag>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mo
from mtl_optax import metrics
from benchmarks import models
from benchmarks import registry

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TASK_NAMES = {"CL_CR": ("CL", "CR"), "CL_RR": ("CL", "RR"), "RL_RR": ("RL", "RR")}

# Tasks on the composites, by code: (head kind, target from a split's digits). The pairs of
# TASK_NAMES use the first four; the others make the many-task sets of benchmarks.interference.
# l, r: the left and right digit classes; dl, dr: the unshifted 28x28 digits (flattened).
TASKS = {
    "CL": ("CL", lambda l, r, dl, dr: l),                  # class of the left digit
    "CR": ("CL", lambda l, r, dl, dr: r),                  # class of the right digit
    "RL": ("RR", lambda l, r, dl, dr: dl),                 # reconstruct the left digit
    "RR": ("RR", lambda l, r, dl, dr: dr),                 # reconstruct the right digit
    "PL": ("BC", lambda l, r, dl, dr: l % 2),              # parity of the left digit
    "PR": ("BC", lambda l, r, dl, dr: r % 2),              # parity of the right digit
    "HL": ("BC", lambda l, r, dl, dr: l >= 5),             # left digit >= 5
    "HR": ("BC", lambda l, r, dl, dr: r >= 5),             # right digit >= 5
    "GT": ("BC", lambda l, r, dl, dr: l > r),              # left digit > right digit
    "S10": ("CL", lambda l, r, dl, dr: (l + r) % 10),      # last digit of the sum
    "SUM": ("SR", lambda l, r, dl, dr: (l + r).astype(np.float32)),  # the sum, 0..18
}


def task_spec(tasks: str) -> tuple[tuple[str, ...], tuple[str, ...], Optional[tuple]]:
  """``(names, kinds, loss_scales)`` of a task-pair name or a comma list of task codes.

  ``tasks`` is a pair (``"CL_RR"``, see `TASK_NAMES`) or codes of `TASKS`, each
  optionally with a loss factor: ``"CL,CR,PL,RR*0.1"``. ``loss_scales`` is None
  when every factor is 1 (the model is then the one of the pair names).
  """
  items = TASK_NAMES.get(tasks) or tuple(x.strip() for x in tasks.split(",") if x.strip())
  codes, scales = [], []
  for item in items:
    code, _, scale = item.partition("*")
    if code not in TASKS:
      raise ValueError(f"unknown task {code!r} in {tasks!r}: a pair {sorted(TASK_NAMES)} or "
                       f"a comma list of {sorted(TASKS)} (each optionally '*factor')")
    codes.append(code)
    scales.append(float(scale) if scale else 1.0)
  kinds = tuple(TASKS[c][0] for c in codes)
  return tuple(items), kinds, (None if all(x == 1.0 for x in scales) else tuple(scales))


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
  images: np.ndarray          # (N, 36, 36, 1) float32 in [0, 1]
  targets: tuple              # per task: (N,) int32 labels, (N,) float32 or (N, 784) images

  def __len__(self):
    return int(self.images.shape[0])


def load_data(task: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict:
  """The multi-MNIST composites (``mtl_optax.datasets``) as {"train","val","test"}: Split.

  ``task``: as `task_spec` (a pair name or a comma list of task codes).
  """
  from mtl_optax import datasets  # pylint: disable=g-import-not-at-top
  names, _, _ = task_spec(task)
  out = {}
  for split in ("train", "val", "test"):
    # RL_RR carries both digits as images; the classes come with every split.
    d = datasets.multi_mnist("RL_RR", split, seed=seed, n_train=n_train, n_val=n_val,
                             n_test=n_test)
    l, r = np.asarray(d.left_label), np.asarray(d.right_label)
    targets = []
    for name in names:
      kind, target = TASKS[name.partition("*")[0]]
      t = np.asarray(target(l, r, *d.targets))
      targets.append(t.astype(np.int32) if kind in ("CL", "BC") else t)
    out[split] = Split(np.asarray(d.images, np.float32), tuple(targets))
  return out


def _task_metric_dirs(kinds):
  """[(metric_name, lower_is_better)] per task from the head kinds ('CL'/'RR')."""
  return [models.METRICS[k] for k in kinds]


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------

def heads_mask(path, leaf):  # pylint: disable=unused-argument
  """task_specific= predicate: the leaves under params["heads"]."""
  return any(getattr(k, "key", None) == "heads" for k in path)


_EVAL_CACHE: dict = {}


def batch_loss_fn(model: models.MultiTaskModel) -> Callable:
  """The model's per-task losses as ``fn(params, model_state, images, targets) -> (m,)``.

  The loss-function argument of the bilevel methods (``registry.Spec.needs``
  has ``"loss_fn"``): their batches are the tuples ``(model_state, images,
  targets)``, so the model state (BatchNorm statistics; ``{}`` without) travels
  inside the batch and ``fn`` is one static function. Training mode (BatchNorm
  normalises with the batch's statistics); the new statistics are discarded, so
  the validation and look-ahead passes never move the running averages.
  """
  def fn(params, model_state, images, targets):
    losses, _ = model.stateful_task_losses(params, model_state,
                                           {"images": images, "targets": targets})
    return losses
  return fn


def _val_indices(key, n_val: int, steps: int, bs: int) -> jax.Array:
  """``(steps, bs)`` validation indices: consecutive shuffles of the split, cut in batches.

  As iterating a shuffled validation loader that restarts when exhausted (the
  reference codes' ``val_loader``); a batch straddling two shuffles may repeat
  an image.
  """
  reps = -(-steps * bs // n_val)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n_val))(jax.random.split(key, reps))
  return perms.reshape(-1)[:steps * bs].reshape(steps, bs)


@dataclasses.dataclass
class Trainer:
  """A compiled epoch + evaluation for one (model, aggregator) pair.

  ``needs`` and ``engine`` come from the method's registry entry
  (``registry.build``'s meta): ``"val_batch"`` / ``"train_batch"`` in ``needs``
  pass ``val_batch=`` / ``train_batch=`` (tuples ``(model_state, images,
  targets)``, see :func:`batch_loss_fn`) to ``tx.update``, the validation
  mini-batch drawn from the validation split each step (same batch size; the
  split is an input of the compiled epoch; ``meta_split="train"``: from a
  second shuffle of the training split instead); ``engine="samo"`` computes the
  gradients with ``mo.samo_task_grads`` and carries the perturbation's PRNG
  state in the optimizer state ``(tx_state, samo_state)``;
  ``engine="representation"`` runs ``mo.representation_update`` (the aggregator
  on ∂L_i/∂z of the shared features z, stateless encoders only; its
  interference is NaN: there are no per-task parameter gradients) with the
  optimizer state ``(aggregator_state, adam_state)``; ``engine="rotograd"``
  runs ``mo.rotograd_update`` (stateless encoders only; interference NaN): the
  parameters gain ``"rotation"`` (the ``mo.rotograd_rotations`` module's params,
  generators (m, d, d) at zero: identity rotations), trained by a separate Adam
  at ``engine_kwargs["rotation_lr_scale"]`` (default 1) times the learning
  rate, the optimizer state is ``(aggregator_state, adam_state,
  rotation_adam_state)`` and evaluation feeds head i the rotated features
  R_i z. The default (no needs,
  ``"task_grads"``) compiles exactly the program it did before these options
  existed.
  """
  model: models.MultiTaskModel
  agg: Any
  flat: bool
  weighted: bool
  batch_size: int
  rho: float
  adaptive: bool
  sam_norm: str = "joint"
  needs: tuple = ()
  engine: str = "task_grads"
  engine_kwargs: dict = dataclasses.field(default_factory=dict)
  meta_split: str = "val"   # where val_batch= is drawn from: "val" or "train" (reference codes)
  # Random methods (RLW, PCGrad, GradDrop, GradVac) keep their PRNG key in the state,
  # seeded at construction: the aggregator built with the run's seed gives that run's
  # initial state (the update function, hence the compiled epoch, does not depend on it).
  agg_for_seed: Optional[Callable[[int], Any]] = None
  epoch_fn: Callable = None
  eval_fn: Callable = None

  @property
  def needs_val(self) -> bool:
    return "val_batch" in self.needs

  def _samo(self, seed: int = 0):
    return mo.samo_perturbation(task_specific=heads_mask, seed=seed, **self.engine_kwargs)

  def __post_init__(self):
    m = self.model.num_tasks
    model, agg, bs = self.model, self.agg, self.batch_size
    if self.engine not in ("task_grads", "samo", "representation", "rotograd"):
      raise ValueError(f"Trainer: unknown gradient engine {self.engine!r}")
    if self.engine in ("representation", "rotograd") and model.has_state:
      # mo.representation_grads / mo.rotograd_update have no model-state form (the
      # encoder's new BatchNorm statistics would be lost).
      raise ValueError(f"Trainer: engine {self.engine!r} needs a stateless encoder, got "
                       f"{model.encoder!r}")
    if self.engine != "task_grads" and (self.flat or agg is None):
      raise ValueError(f"Trainer: engine {self.engine!r} runs plain (non-flat) aggregators")
    perturb = None
    if self.flat:
      perturb = mo.task_perturbation(rho_shared=self.rho, rho_task=self.rho,
                                     adaptive=self.adaptive, task_specific=heads_mask,
                                     norm=self.sam_norm)
    # The compiled update only reads the perturbation's static settings; its seed only sets the
    # initial state (per run, in init).
    samo = self._samo() if self.engine == "samo" else None
    rep = self.engine == "representation"
    roto = self.engine == "rotograd"
    rotations = self._rotations() if roto else None
    rot_scale = float(self.engine_kwargs.get("rotation_lr_scale", 1.0)) if roto else 1.0
    needs = self.needs

    # (losses, new model state); stateless encoders carry {} unchanged.
    losses_fn = model.stateful_task_losses

    def weights_of(state):
      """The step's task weights (zeros for methods without weights)."""
      w = jnp.zeros((m,), jnp.float32)
      if self.weighted:
        w = mo.diagnostics(state).get("weights", w).astype(jnp.float32)
      return w

    def body(tx, ep, carry, idx, images, targets, vidx=None, val=None):
      p, s, ms = carry   # ms: model state (BatchNorm statistics; {} if none)
      batch = {"images": images[idx], "targets": tuple(t[idx] for t in targets)}
      extra = {"epoch": ep}   # epoch-based methods (DWA, GradNorm) read it; others ignore it
      if agg is None:  # single-task baseline: plain Adam on the one loss
        def first(q):
          losses, new_ms = losses_fn(q, ms, batch)
          return losses[0], new_ms
        (loss, ms), g = jax.value_and_grad(first, has_aux=True)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s, ms), (loss[None], jnp.ones((1,), jnp.float32),
                                                    jnp.float32(1.0))
      # Bilevel inputs, with the model state of the gradients' pass (batch_loss_fn's tuples).
      if "train_batch" in needs:
        extra["train_batch"] = (ms, batch["images"], batch["targets"])
      if "val_batch" in needs:
        extra["val_batch"] = (ms, val[0][vidx], tuple(t[vidx] for t in val[1]))
      if roto:  # tx is (aggregator, adam, rotation adam), s their states
        losses, (trunk_g, heads_g, rot_g), s_agg = mo.rotograd_update(
            tx[0], s[0], model.encode, model.per_task_head_losses, p["encoder"], p["heads"],
            p["rotation"], (model.inputs(batch["images"]),), (batch["targets"],), **extra)
        net = {"encoder": p["encoder"], "heads": p["heads"]}
        u, s_opt = tx[1].update({"encoder": trunk_g, "heads": heads_g}, s[1], net)
        u_rot, s_rot = tx[2].update(rot_g, s[2], p["rotation"])
        p = dict(optax.apply_updates(net, u), rotation=optax.apply_updates(p["rotation"], u_rot))
        w = weights_of(s_agg)
        return (p, (s_agg, s_opt, s_rot), ms), (losses, w, jnp.float32(jnp.nan))
      if rep:   # tx is (aggregator, adam), s their states
        losses, (trunk_u, heads_u), s_agg = mo.representation_update(
            tx[0], s[0], model.encode, model.head_losses, p["encoder"], p["heads"],
            (model.inputs(batch["images"]),), (batch["targets"],), **extra)
        u, s_opt = tx[1].update({"encoder": trunk_u, "heads": heads_u}, s[1], p)
        s = (s_agg, s_opt)
        w = weights_of(s_agg)
        return (optax.apply_updates(p, u), s, ms), (losses, w, jnp.float32(jnp.nan))
      if samo is not None:
        s, ps = s   # (tx state, SAMO perturbation state)
        (losses, ms), g, ps = mo.samo_task_grads(losses_fn, p, ms, batch, perturbation=samo,
                                                 perturbation_state=ps, has_state=True)
      elif perturb is None:
        (losses, ms), g = mo.task_grads(losses_fn, p, ms, batch, has_state=True)
      else:
        (losses, ms), g, sam = mo.sharpness_aware_task_grads(
            losses_fn, p, ms, batch, perturbation=perturb, has_state=True)
        extra["sam_grads"] = sam
      inter = metrics.interference(g, task_specific=heads_mask) if m > 1 else jnp.float32(1.0)
      u, s = tx.update(g, s, p, losses=losses, **extra)
      p = optax.apply_updates(p, u)
      w = weights_of(s)
      if samo is not None:
        s = (s, ps)
      return (p, s, ms), (losses, w, inter)

    def epoch(params, opt_state, model_state, key, lr, ep, images, targets, val=None):
      tx = optax.adam(lr) if agg is None else optax.chain(agg, optax.adam(lr))
      if rep:   # the aggregator's output is a cotangent of z, not an update: applied apart
        tx = (agg, optax.adam(lr))
      if roto:  # the rotations have their own optimizer, as in the reference code
        tx = (agg, optax.adam(lr), optax.adam(lr * rot_scale))
      n = images.shape[0]
      steps = n // bs
      perm = jax.random.permutation(key, n)[:steps * bs].reshape(steps, bs)
      carry = (params, opt_state, model_state)
      if val is None:
        carry, (losses, w, inter) = jax.lax.scan(
            lambda c, i: body(tx, ep, c, i, images, targets), carry, perm)
      else:
        # A key folded from the epoch's: the training permutation is the one every other
        # method sees with the same seed (paired comparisons).
        vperm = _val_indices(jax.random.fold_in(key, 1), val[0].shape[0], steps, bs)
        carry, (losses, w, inter) = jax.lax.scan(
            lambda c, i: body(tx, ep, c, i[0], images, targets, i[1], val), carry,
            (perm, vperm))
      params, opt_state, model_state = carry
      return params, opt_state, model_state, {
          "loss": losses.mean(0), "weights": w.mean(0), "interference": inter.mean(),
          "finite": jnp.all(jnp.isfinite(losses))}

    task_metrics = model.task_metrics
    if roto:
      def task_metrics(params, batch, model_state=None):  # pylint: disable=unused-argument
        z = model.encode(params["encoder"], model.inputs(batch["images"]))
        zs = rotations.apply({"params": params["rotation"]}, z)
        return model.per_task_head_metrics(params["heads"], zs, batch["targets"])

    def evaluate(params, model_state, images, targets):
      n = images.shape[0]
      chunk = max(d for d in range(1, min(n, 500) + 1) if n % d == 0)
      k = n // chunk
      imgs = images.reshape(k, chunk, *images.shape[1:])
      tg = tuple(t.reshape(k, chunk, *t.shape[1:]) for t in targets)
      vals = jax.lax.map(lambda xs: task_metrics(
          params, {"images": xs[0], "targets": xs[1]}, model_state or None), (imgs, tg))
      return vals.mean(0)

    # No buffer donation: some method states alias one array in several leaves.
    self.epoch_fn = jax.jit(epoch)
    # Evaluation depends only on the model (and the rotations): one compiled function per model.
    self.eval_fn = _EVAL_CACHE.setdefault((model, "rotograd") if roto else model,
                                          jax.jit(evaluate))

  def _rotations(self):
    return mo.rotograd_rotations(self.model.num_tasks, self.model.feature_dim)

  def init(self, seed):
    """``(params, opt_state, model_state)``; model_state is ``{}`` without BatchNorm.

    With ``engine="samo"`` the optimizer state is the pair ``(tx_state,
    samo_state)``, the perturbation's PRNG key seeded with the run's seed.
    """
    params, model_state = self.model.init_state(jax.random.key(seed))
    agg = self.agg if self.agg_for_seed is None else self.agg_for_seed(seed)
    if self.engine == "rotograd":   # identity rotations: the generators start at zero
      z = jnp.zeros((self.batch_size, self.model.feature_dim), jnp.float32)
      params = dict(params, rotation=self._rotations().init(jax.random.key(seed), z)["params"])
      net = {"encoder": params["encoder"], "heads": params["heads"]}
      opt_state = (agg.init(z), optax.adam(1e-3).init(net),
                   optax.adam(1e-3).init(params["rotation"]))
      return params, opt_state, model_state
    # The learning rate is not part of the state.
    tx = optax.adam(1e-3) if agg is None else optax.chain(agg, optax.adam(1e-3))
    opt_state = tx.init(params)
    if self.engine == "representation":
      z = jnp.zeros((self.batch_size, self.model.feature_dim), jnp.float32)
      opt_state = (agg.init(z), optax.adam(1e-3).init(params))
    if self.engine == "samo":
      opt_state = (opt_state, self._samo(seed).init(params))
    return params, opt_state, model_state

  def epoch_args(self, data_dev) -> tuple:
    """The data arguments of ``epoch_fn`` after the state: ``(images, targets[, val])``."""
    return tuple(data_dev["train"]) + ((tuple(data_dev[self.meta_split]),) if self.needs_val
                                       else ())


def _device_split(split: Split, task_ids):
  return jnp.asarray(split.images), tuple(jnp.asarray(split.targets[i]) for i in task_ids)


@dataclasses.dataclass
class RunResult:
  val: list            # per epoch (m,) validation metrics
  test: list           # per epoch (m,) test metrics
  weights: list        # per epoch (m,) mean task weights (zeros if not weighted)
  interference: list   # per epoch mean interference
  loss: list           # per epoch (m,) mean training losses
  best_epoch: int = -1
  best_score: float = -math.inf
  seconds: float = 0.0
  diverged: bool = False

  def best_test(self):
    return self.test[self.best_epoch]

  def best_val(self):
    return self.val[self.best_epoch]


def train_run(trainer: Trainer, data_dev, *, lr: float, seed: int, epochs: int,
              score: Callable[[np.ndarray], float], progress=None) -> RunResult:
  """Trains one run; selects the best epoch by ``score(val_metrics)`` (higher is better)."""
  t0 = time.perf_counter()
  params, opt_state, model_state = trainer.init(seed)
  key = jax.random.key(10_000 + seed)
  res = RunResult([], [], [], [], [])
  data_args = trainer.epoch_args(data_dev)
  for e in range(epochs):
    key, sub = jax.random.split(key)
    params, opt_state, model_state, stats = trainer.epoch_fn(
        params, opt_state, model_state, sub, jnp.float32(lr), jnp.int32(e), *data_args)
    val = np.asarray(trainer.eval_fn(params, model_state, *data_dev["val"]), np.float64)
    test = np.asarray(trainer.eval_fn(params, model_state, *data_dev["test"]), np.float64)
    res.val.append(val.tolist())
    res.test.append(test.tolist())
    res.weights.append(np.asarray(stats["weights"], np.float64).tolist())
    res.interference.append(float(stats["interference"]))
    res.loss.append(np.asarray(stats["loss"], np.float64).tolist())
    s = score(val)
    if not bool(stats["finite"]) or not np.all(np.isfinite(val)):
      res.diverged = True
      s = -math.inf
    if s > res.best_score or res.best_epoch < 0:
      res.best_score, res.best_epoch = s, e
    if progress is not None:
      progress.update(1)
    if res.diverged:
      break
  res.seconds = time.perf_counter() - t0
  return res


# ---------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------

def _dm(values, baselines, dirs, per_task=False):
  v = {i: float(x) for i, x in enumerate(values)}
  b = {i: float(x) for i, x in enumerate(baselines)}
  lib = {i: d[1] for i, d in enumerate(dirs)}
  return metrics.delta_m(v, b, lib, per_task=per_task)


class Benchmark:
  """Runs the whole protocol for one task pair; results in ``self.results``."""

  def __init__(self, args):
    self.args = args
    self.task = args.tasks
    self.names, self.kinds, self.loss_scales = task_spec(self.task)
    self.m = len(self.kinds)
    self.dirs = _task_metric_dirs(self.kinds)
    t0 = time.perf_counter()
    self.data = load_data(self.task, args.n_train, args.n_val, args.n_test, seed=args.data_seed)
    self.data_time = time.perf_counter() - t0
    self.trainers = {}
    self.results = {"methods": {}, "stl": {}}
    self.stl_val = None
    self.stl_test = None
    # STL results by task code (no loss factor: a constant factor leaves a single-task
    # optimum alone); benchmarks.interference shares one dict between its task sets.
    self.stl_cache: dict = {}
    try:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._tqdm = tqdm
    except ImportError:  # pragma: no cover
      self._tqdm = None

  # -- helpers ---------------------------------------------------------------

  def entry(self, name: str) -> Optional[dict]:
    """``name``'s result: from this run, else from the ``--from`` file (None if neither)."""
    if name in self.results["methods"] or self.args.source is None:
      return self.results["methods"].get(name)
    return self.args.source["methods"].get(name)

  def model(self) -> models.MultiTaskModel:
    return models.MultiTaskModel(tasks=self.kinds, encoder=self.args.encoder,
                                 loss_scales=self.loss_scales)

  def _trainer(self, key, model, agg_fn, flat=False, weighted=True, needs=(),
               engine="task_grads", engine_kwargs=None):
    if key not in self.trainers:
      agg = agg_fn()
      self.trainers[key] = Trainer(model, agg, flat, weighted, self.args.batch_size,
                                   self.args.rho, self.args.adaptive, self.args.sam_norm,
                                   tuple(needs), engine, dict(engine_kwargs or {}),
                                   self.args.meta_split)
    return self.trainers[key]

  def _pbar(self, total, desc):
    if self._tqdm is None or self.args.no_progress:
      return None
    return self._tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

  def _data_dev(self, task_ids):
    return {s: _device_split(self.data[s], task_ids) for s in ("train", "val", "test")}

  def _mtl_score(self, val):
    return _dm(val, self.stl_val, self.dirs)

  def _protocol(self, name, trainer, data_dev, score, lrs, seeds):
    """lr selected on seed 0's validation score; other seeds at the chosen lr."""
    a = self.args
    total = a.epochs * (len(lrs) + len(seeds) - 1)
    bar = self._pbar(total, f"{name}")
    by_lr = {}
    for lr in lrs:
      by_lr[lr] = train_run(trainer, data_dev, lr=lr, seed=seeds[0], epochs=a.epochs,
                            score=score, progress=bar)
    best_lr = max(lrs, key=lambda lr: by_lr[lr].best_score)
    runs = [by_lr[best_lr]]
    for s in seeds[1:]:
      runs.append(train_run(trainer, data_dev, lr=best_lr, seed=s, epochs=a.epochs,
                            score=score, progress=bar))
    if bar is not None:
      bar.close()
    grid = {str(lr): r.best_score for lr, r in by_lr.items()}
    return best_lr, runs, grid

  # -- stages ----------------------------------------------------------------

  def run_stl(self):
    a = self.args
    if a.source is not None:   # --from: the same protocol's baselines
      self.results["stl"] = dict(a.source["stl"])
      self.stl_val = np.array([np.mean(self.results["stl"][n]["val"]) for n in self.names])
      self.stl_test = np.asarray(a.source["stl_test"], np.float64)
      return
    vals, tests = [], []
    for i, kind in enumerate(self.kinds):
      code = self.names[i].partition("*")[0]
      if code in self.stl_cache:
        self.results["stl"][self.names[i]] = entry = self.stl_cache[code]
        vals.append(float(np.mean(entry["val"])))
        tests.append(entry["test_mean"])
        continue
      model = models.MultiTaskModel(tasks=(kind,), encoder=a.encoder)
      tr = self._trainer(("stl", kind), model, lambda: None, weighted=False)
      lower = self.dirs[i][1]
      score = (lambda v: -float(v[0])) if lower else (lambda v: float(v[0]))
      lr, runs, grid = self._protocol(f"STL {self.names[i]}", tr, self._data_dev((i,)), score,
                                      a.lrs, a.seed_list)
      test = [r.best_test()[0] for r in runs]
      val = [r.best_val()[0] for r in runs]
      self.results["stl"][self.names[i]] = self.stl_cache[code] = {
          "lr": lr, "lr_grid_val": grid, "test": test, "val": val,
          "test_mean": float(np.mean(test)), "test_std": float(np.std(test)),
          "seconds": float(sum(r.seconds for r in runs))}
      vals.append(float(np.mean(val)))
      tests.append(float(np.mean(test)))
    self.stl_val = np.array(vals)
    self.stl_test = np.array(tests)

  def _record(self, name, lr, runs, grid, extra=None):
    tests = np.array([r.best_test() for r in runs])
    dms, per = [], []
    for t in tests:
      d, pt = _dm(t, self.stl_test, self.dirs, per_task=True)
      dms.append(d)
      per.append([pt[i] for i in range(self.m)])
    per = np.array(per)
    entry = {
        "label": extra.pop("label", name) if extra else name,
        "lr": lr, "lr_grid_val": grid,
        "test": tests.tolist(),
        "test_mean": tests.mean(0).tolist(), "test_std": tests.std(0).tolist(),
        "delta_m": dms, "delta_m_mean": float(np.mean(dms)), "delta_m_std": float(np.std(dms)),
        "delta_task_mean": per.mean(0).tolist(), "delta_task_std": per.std(0).tolist(),
        "best_epoch": [r.best_epoch for r in runs],
        "weights": [r.weights for r in runs],
        "interference": [r.interference for r in runs],
        "train_loss": [r.loss for r in runs],
        "val_curve": [r.val for r in runs],
        "diverged": [r.diverged for r in runs],
        "seconds": float(sum(r.seconds for r in runs)),
    }
    if extra:
      entry.update(extra)
    self.results["methods"][name] = entry
    return entry

  def run_method(self, name):
    a = self.args
    model = self.model()
    # Every method gets the loss function; build passes it only to those that declare it.
    build = lambda seed=0: registry.build(name, num_tasks=self.m, task_specific=heads_mask,
                                          loss_fn=batch_loss_fn(model), seed=seed)
    _, meta = build()
    tr = self._trainer(("m", name), model, lambda: build()[0], flat=meta["flat"],
                       weighted=meta["weighted"], needs=meta["needs"], engine=meta["engine"],
                       engine_kwargs=meta["engine_kwargs"])
    if meta["stochastic"]:
      tr.agg_for_seed = lambda seed: build(seed)[0]
    lr, runs, grid = self._protocol(registry.label(name), tr, self._data_dev(range(self.m)),
                                    self._mtl_score, a.lrs, a.seed_list)
    return self._record(name, lr, runs, grid, dict(label=registry.label(name), **meta))

  def run_ls_tuned(self):
    """Linear scalarisation (w, 1-w), w selected on validation (seed 0)."""
    a = self.args
    if self.m != 2:
      return None
    lr = self.results["methods"].get("mean", {}).get("lr", a.lrs[0])
    model = self.model()
    dev = self._data_dev(range(self.m))
    best = None
    grid = {}
    for w in a.ls_grid:
      ws = (w, 1.0 - w)
      tr = self._trainer(("ls", ws), model, lambda ws=ws: registry.fixed(
          ws, num_tasks=self.m, task_specific=heads_mask), weighted=False)
      bar = self._pbar(a.epochs, f"LS w={w:g}")
      r = train_run(tr, dev, lr=lr, seed=a.seed_list[0], epochs=a.epochs, score=self._mtl_score,
                    progress=bar)
      if bar is not None:
        bar.close()
      grid[str(w)] = r.best_score
      if best is None or r.best_score > best[1].best_score:
        best = (ws, r, tr)
    ws, r0, tr = best
    runs = [r0]
    bar = self._pbar(a.epochs * (len(a.seed_list) - 1), f"LS w={ws[0]:g} seeds")
    for s in a.seed_list[1:]:
      runs.append(train_run(tr, dev, lr=lr, seed=s, epochs=a.epochs, score=self._mtl_score,
                            progress=bar))
    if bar is not None:
      bar.close()
    return self._record("ls_tuned", lr, runs, {str(lr): r0.best_score},
                        dict(label=f"LS tuned (w={ws[0]:g})", fixed_weights=list(ws),
                             ls_grid_val=grid))

  def run_fixed_from(self, source):
    """Re-train with the EMA(β=0.9) of ``source``'s per-epoch mean weights, per seed."""
    a = self.args
    src = self.entry(source)
    if src is None or "error" in src or not src.get("weighted", False):
      return None
    model = self.model()
    dev = self._data_dev(range(self.m))
    runs, used = [], []
    bar = self._pbar(a.epochs * len(a.seed_list), f"fixed({source})")
    for s, hist in zip(a.seed_list, src["weights"]):
      w = metrics.fixed_weights(np.asarray(hist), beta=0.9, normalize=True)
      w = np.round(w, 4)
      used.append(w.tolist())
      tr = self._trainer(("ls", tuple(w.tolist())), model, lambda w=w: registry.fixed(
          w, num_tasks=self.m, task_specific=heads_mask), weighted=False)
      runs.append(train_run(tr, dev, lr=src["lr"], seed=s, epochs=a.epochs,
                            score=self._mtl_score, progress=bar))
    if bar is not None:
      bar.close()
    return self._record(f"fixed_{source}", src["lr"], runs, {},
                        dict(label=f"Fixed w from {registry.label(source)}", fixed_weights=used,
                             source=source))

  def run(self):
    a = self.args
    t0 = time.perf_counter()
    self.run_stl()
    for name in a.method_list:
      try:
        t1 = time.perf_counter()
        entry = self.run_method(name)
        print(f"[multimnist] {name}: Δm% = {entry['delta_m_mean']:.2f} ± "
              f"{entry['delta_m_std']:.2f} (lr {entry['lr']:g}, "
              f"{time.perf_counter() - t1:.0f} s)", file=sys.stderr, flush=True)
      except Exception as e:  # pylint: disable=broad-except
        if a.strict:
          raise
        print(f"[multimnist] {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        self.results["methods"][name] = {"error": f"{type(e).__name__}: {e}",
                                         "label": registry.label(name)}
    if a.ls_grid:
      self.run_ls_tuned()
    for src in a.fixed_list:
      self.run_fixed_from(src)
    ok = {k: v for k, v in self.results["methods"].items() if "error" not in v}
    if len(ok) >= 2:
      table = {k: {self.names[i]: v["test_mean"][i] for i in range(self.m)} for k, v in ok.items()}
      mr = metrics.mean_rank(table, {self.names[i]: self.dirs[i][1] for i in range(self.m)})
      for k, r in mr.items():
        self.results["methods"][k]["mean_rank"] = r
    self.results["config"] = {
        k: v for k, v in vars(a).items()
        if k not in ("method_list", "fixed_list", "seed_list", "source")}
    self.results["config"].update(
        methods=a.method_list, seeds=a.seed_list, fixed_from=a.fixed_list,
        task_names=list(self.names), task_kinds=list(self.kinds),
        metric_names=[d[0] for d in self.dirs],
        lower_is_better=[d[1] for d in self.dirs])
    self.results["env"] = {"jax": jax.__version__, "python": platform.python_version(),
                           "backend": jax.default_backend(),
                           "devices": [str(d) for d in jax.devices()],
                           "machine": platform.machine()}
    self.results["stl_test"] = self.stl_test.tolist()
    self.results["total_seconds"] = time.perf_counter() - t0 + self.data_time
    return self.results


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------

def format_table(results) -> str:
  cfg = results["config"]
  names = cfg["task_names"]
  mnames = cfg["metric_names"]
  lines = []
  hdr = (f"{'method':<28}" + "".join(f"{n + ' ' + mn:>16}" for n, mn in zip(names, mnames))
         + "".join(f"{'Δ' + n + '%':>10}" for n in names)
         + f"{'Δm% ± std':>18}{'MR':>6}{'interf.':>8}{'w (last ep.)':>16}{'lr':>8}")
  lines.append(hdr)
  lines.append("-" * len(hdr))
  row = f"{'STL':<28}"
  for n in names:
    s = results["stl"][n]
    row += f"{s['test_mean']:>9.4f}±{s['test_std']:<6.4f}"
  lines.append(row)
  rows = [(k, v) for k, v in results["methods"].items() if "error" not in v]
  rows.sort(key=lambda kv: -kv[1]["delta_m_mean"])
  for _, v in rows:
    row = f"{v['label'][:27]:<28}"
    for i in range(len(names)):
      row += f"{v['test_mean'][i]:>9.4f}±{v['test_std'][i]:<6.4f}"
    for i in range(len(names)):
      row += f"{v['delta_task_mean'][i]:>10.2f}"
    row += f"{v['delta_m_mean']:>10.2f} ± {v['delta_m_std']:<5.2f}"
    row += f"{v.get('mean_rank', float('nan')):>6.2f}"
    inter = np.mean([np.mean(x) for x in v["interference"]])
    row += f"{inter:>8.3f}"
    if v.get("weighted", False) or "fixed_weights" in v:
      w = np.mean([h[-1] for h in v["weights"]], axis=0) if v.get("weighted") else \
          np.asarray(v["fixed_weights"]).reshape(-1, len(names)).mean(0)
      row += f"{'(' + ', '.join(f'{x:.2f}' for x in w) + ')':>16}"
    else:
      row += f"{'-':>16}"
    row += f"{v['lr']:>8.0e}"
    lines.append(row)
  for v in results["methods"].values():
    if "error" in v:
      lines.append(f"{v['label'][:27]:<28}FAILED: {v['error'][:100]}")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [(k, v) for k, v in results["methods"].items() if "error" not in v]
  rows.sort(key=lambda kv: -kv[1]["delta_m_mean"])
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
  ax = axes[0]
  labels = [v["label"] for _, v in rows]
  means = [v["delta_m_mean"] for _, v in rows]
  stds = [v["delta_m_std"] for _, v in rows]
  colors = ["tab:gray" if k in ("mean", "ls_tuned") or k.startswith("fixed_") else
            ("tab:red" if k.startswith("f_") else "tab:blue") for k, _ in rows]
  ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=3)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(labels, fontsize=8)
  ax.invert_yaxis()
  ax.axvline(0, color="k", lw=0.8)
  ax.set_xlabel("Δm% vs STL (test, mean ± std over seeds; higher is better)")
  ax.set_title(f"multi-MNIST {results['config']['tasks']}")
  ax = axes[1]
  for k, v in rows:
    if v.get("weighted") and not k.startswith("fixed_"):
      w = np.asarray(v["weights"], np.float64)          # (seeds, epochs, m)
      share = w[..., 0] / np.where(w.sum(-1) == 0, 1, w.sum(-1))
      ax.plot(np.arange(1, share.shape[1] + 1), share.mean(0), marker=".", label=v["label"])
  ax.axhline(0.5, color="k", lw=0.8, ls="--")
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"w_{results['config']['task_names'][0]} / Σw (epoch mean)")
  ax.set_title("task weights over training")
  ax.legend(fontsize=7)
  ax = axes[2]
  for k, v in rows:
    if k.startswith("fixed_"):
      continue
    it = np.asarray(v["interference"], np.float64)
    ax.plot(np.arange(1, it.shape[1] + 1), it.mean(0), marker=".", label=v["label"])
  ax.set_xlabel("epoch")
  ax.set_ylabel("mean cos(g_i, ḡ) (shared params)")
  ax.set_title("interference over training")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------

QUICK = dict(n_train=512, n_val=256, n_test=256, epochs=2, seeds=1, lrs="1e-3",
             batch_size=128, ls_grid="0.3,0.7", encoder="mlp")


def apply_quick_defaults(parser: argparse.ArgumentParser, args, quick: dict) -> None:
  """``--quick``: each option the user left at its default takes its ``quick`` value."""
  defaults = {a.dest: a.default for a in parser._actions}  # pylint: disable=protected-access
  for k, v in quick.items():
    if getattr(args, k) == defaults[k]:
      setattr(args, k, v)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default="CL_RR",
                 help=f"a pair {sorted(TASK_NAMES)} or a comma list of task codes "
                      f"{sorted(TASKS)}, each optionally '*factor' (a loss factor)")
  p.add_argument("--methods", default="mean,cagrad",
                 help="comma list; 'all' = every available method; 'flat' = the f_ variants "
                      "of " + ",".join(registry.FLAT_PAIRS) + "; 'pairs' = those and their "
                      "vanilla versions; f_<name> = flat variant")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--lrs", default="1e-3,3e-3", help="learning-rate grid (Adam)")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--n-train", type=int, default=20000)
  p.add_argument("--n-val", type=int, default=2000)
  p.add_argument("--n-test", type=int, default=4000)
  p.add_argument("--data-seed", type=int, default=0)
  p.add_argument("--encoder", default="lenet", choices=models.ENCODERS)
  p.add_argument("--ls-grid", default="0.25,0.5,0.75",
                 help="weights w of the tuned linear scalarisation (w, 1-w); '' to skip")
  p.add_argument("--fixed-from", default="cagrad",
                 help="methods whose EMA weights are re-trained as fixed weights ('' = none)")
  p.add_argument("--rho", type=float, default=2.0,
                 help="SAM radius of the flat variants (FS-MTL multi-MNIST: adaptive, 2.0)")
  p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                 help="adaptive SAM (ASAM) for the flat variants (default on, as FS-MTL)")
  p.add_argument("--sam-norm", default="joint", choices=("joint", "separate"),
                 help="one SAM norm over shared+head leaves (FS-MTL multi-MNIST) or separate")
  p.add_argument("--meta-split", default="val", choices=("val", "train"),
                 help="split of the bilevel methods' val_batch= (default: the validation split, "
                      "which also selects lr and epoch; 'train': a second shuffle of the "
                      "training split, as Auto-Lambda's code)")
  p.add_argument("--from", dest="from_file", default=None,
                 help="a result file of the same protocol whose STL baselines and method "
                      "entries are reused: with --methods '' --fixed-from A,B it re-trains only "
                      "the fixed weights of A and B (merge the output into that file)")
  p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests/CI)")
  p.add_argument("--tag", default=None, help="suffix of the result files")
  p.add_argument("--out-dir", default=RESULTS_DIR)
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--strict", action="store_true", help="stop on the first failing method")
  args = p.parse_args(argv)
  if args.quick:
    apply_quick_defaults(p, args, QUICK)
  args.lrs = [float(x) for x in str(args.lrs).split(",") if x]
  args.ls_grid = [float(x) for x in str(args.ls_grid).split(",") if x]
  args.method_list = registry.resolve(args.methods)
  args.source = _source(args) if args.from_file else None
  sources = set(args.method_list) | set(args.source["methods"] if args.source else ())
  args.fixed_list = [x for x in args.fixed_from.split(",") if x and x in sources]
  args.seed_list = list(range(args.seeds))
  task_spec(args.tasks)   # fails early on an unknown task code
  if args.tag is None:
    args.tag = ("quick" if args.quick else f"{args.encoder}_e{args.epochs}_s{args.seeds}")
  return args


# The configuration a reused result file (--from) must share with the run.
_PROTOCOL = ("tasks", "encoder", "epochs", "n_train", "n_val", "n_test", "batch_size",
             "data_seed")


def _source(args) -> dict:
  """The ``--from`` result file, checked to follow the run's protocol."""
  with open(args.from_file) as f:
    src = json.load(f)
  cfg = src["config"]
  diff = [k for k in _PROTOCOL if cfg.get(k) != getattr(args, k)]
  if cfg.get("seeds") != list(range(args.seeds)):
    diff.append("seeds")
  if diff:
    raise ValueError(f"--from {args.from_file}: different {', '.join(diff)} than this run")
  return src


def merge(paths, out_stem):
  """Merges result files of one task pair run in parallel with disjoint method lists.

  The STL baselines of the first file are kept (same seeds and data: identical),
  Δm% is recomputed against them and the mean rank over the union.
  """
  parts = []
  for pth in paths:
    with open(pth) as f:
      parts.append(json.load(f))
  res = parts[0]
  for other in parts[1:]:
    if other["config"]["tasks"] != res["config"]["tasks"]:
      raise ValueError("merge: different task pairs")
    res["methods"].update(other["methods"])
    res["config"]["methods"] = res["config"]["methods"] + other["config"]["methods"]
    res["total_seconds"] += other["total_seconds"]
  cfg = res["config"]
  dirs = [(n, l) for n, l in zip(cfg["metric_names"], cfg["lower_is_better"])]
  names = cfg["task_names"]
  stl = np.asarray(res["stl_test"])
  ok = {k: v for k, v in res["methods"].items() if "error" not in v}
  for v in ok.values():
    per = [_dm(t, stl, dirs, per_task=True) for t in v["test"]]
    v["delta_m"] = [d for d, _ in per]
    v["delta_m_mean"], v["delta_m_std"] = float(np.mean(v["delta_m"])), float(np.std(v["delta_m"]))
    pt = np.array([[p[i] for i in range(len(names))] for _, p in per])
    v["delta_task_mean"], v["delta_task_std"] = pt.mean(0).tolist(), pt.std(0).tolist()
  table = {k: {names[i]: v["test_mean"][i] for i in range(len(names))} for k, v in ok.items()}
  for k, r in metrics.mean_rank(table, {names[i]: dirs[i][1] for i in range(len(names))}).items():
    res["methods"][k]["mean_rank"] = r
  # Provenance: a file that is itself a merge keeps its sources.
  res["merged_from"] = list(parts[0].get("merged_from", paths[:1])) + list(paths[1:])
  with open(out_stem + ".json", "w") as f:
    json.dump(res, f, indent=1)
  plot(res, out_stem + ".png")
  print(format_table(res))
  return res


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "merge":   # python -m benchmarks.multimnist merge OUT_STEM A.json B.json
    return merge(argv[2:], argv[1])
  args = parse_args(argv)
  print(f"[multimnist] tasks={args.tasks} encoder={args.encoder} methods={args.method_list} "
        f"seeds={args.seeds} epochs={args.epochs} lrs={args.lrs} n_train={args.n_train}",
        file=sys.stderr)
  bench = Benchmark(args)
  results = bench.run()
  table = format_table(results)
  print(table)
  print(f"[{results['total_seconds']:.0f} s total]")
  os.makedirs(args.out_dir, exist_ok=True)
  tasks = args.tasks.replace(",", "-").replace("*", "x")
  stem = os.path.join(args.out_dir, f"multimnist_{tasks}_{args.tag}")
  with open(stem + ".json", "w") as f:
    json.dump(results, f, indent=1)
  if not args.no_plot:
    plot(results, stem + ".png")
  print(f"results: {stem}.json" + ("" if args.no_plot else f", {stem}.png"))
  return results


if __name__ == "__main__":
  main()
