"""PyTorch side of benchmarks/speed.py (run with .venv-torch's Python; prints JSON).

Same multi-task MLP as the JAX side (trunk 784-512-512-512, one 512→10 head per
task, cross-entropy per task, batch 256, Adam): the plain summed-loss step,
TorchJD's ``mtl_backward`` + ``jac_to_grad`` step, and a LibMTL-style loop of
per-task ``torch.autograd.grad`` calls followed by the same TorchJD aggregator
on the stacked Jacobian, and TorchJD's Gramian engine (``autogram.Engine`` on
the trunk, a ``Weighting`` of the Gramian, one weighted backward pass).
"""

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")


def make_model(m):
  trunk = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 512), nn.ReLU())
  heads = nn.ModuleList([nn.Linear(512, 10) for _ in range(m)])
  return trunk, heads


def median_times(calls, repeats, warmup=2):
  """Median wall time (s) of each ``name -> fn``, measured round-robin (same load for all)."""
  for fn in calls.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--m", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  from torchjd import aggregation as A  # pylint: disable=g-import-not-at-top
  from torchjd.autojac import jac_to_grad, mtl_backward  # pylint: disable=g-import-not-at-top

  m = args.m
  trunk, heads = make_model(m)
  params = list(trunk.parameters()) + list(heads.parameters())
  shared = list(trunk.parameters())
  opt = torch.optim.Adam(params, lr=1e-3)
  x = torch.randn(256, 784)
  y = torch.randint(0, 10, (m, 256))
  ce = nn.CrossEntropyLoss()

  def losses_and_features():
    z = trunk(x)
    return [ce(h(z), y[i]) for i, h in enumerate(heads)], z

  def plain():
    opt.zero_grad(set_to_none=True)
    losses, _ = losses_and_features()
    torch.stack(losses).sum().backward()
    opt.step()

  aggregators = {"mean": A.Mean(), "mgda": A.MGDA(), "cagrad": A.CAGrad(c=0.4),
                 "upgrad": A.UPGrad(), "nash_mtl": A.NashMTL(n_tasks=m)}
  calls = {"plain_sum": plain}

  for name, agg in aggregators.items():
    def torchjd_step(agg=agg):
      opt.zero_grad(set_to_none=True)
      losses, z = losses_and_features()
      mtl_backward(losses, features=z)
      jac_to_grad(shared, agg)
      opt.step()

    def loop_step(agg=agg):
      opt.zero_grad(set_to_none=True)
      losses, _ = losses_and_features()
      rows = []
      for i, loss in enumerate(losses):
        g = torch.autograd.grad(loss, shared + list(heads[i].parameters()), retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in g[:len(shared)]]))
        for p, gp in zip(heads[i].parameters(), g[len(shared):]):
          p.grad = gp
      d = agg(torch.stack(rows))
      offset = 0
      for p in shared:
        p.grad = d[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
      opt.step()

    calls[f"torchjd_{name}"] = torchjd_step
    calls[f"loop_{name}"] = loop_step

  # TorchJD's autogram engine: the Gramian w.r.t. the trunk from module hooks, weights
  # from it, then one backward pass of the weighted losses (its documented usage; the
  # heads then get weighted gradients, which costs the same).
  # The engine hooks every forward pass of the module it is given: a copy of the trunk
  # keeps the other steps' forward passes out of it.
  from torchjd.autogram import Engine  # pylint: disable=g-import-not-at-top
  trunk_ag = copy.deepcopy(trunk)
  opt_ag = torch.optim.Adam(list(trunk_ag.parameters()) + list(heads.parameters()), lr=1e-3)
  engine = Engine(trunk_ag, batch_dim=None)
  weightings = {"mean": A.MeanWeighting(), "mgda": A.MGDAWeighting(),
                "cagrad": A.CAGradWeighting(c=0.4), "upgrad": A.UPGradWeighting()}
  for name, weighting in weightings.items():
    def autogram_step(weighting=weighting):
      opt_ag.zero_grad(set_to_none=True)
      z = trunk_ag(x)
      losses = torch.stack([ce(h(z), y[i]) for i, h in enumerate(heads)])
      weights = weighting(engine.compute_gramian(losses))
      losses.backward(weights)
      opt_ag.step()

    calls[f"autogram_{name}"] = autogram_step
  print(json.dumps(median_times(calls, args.repeats)))


if __name__ == "__main__":
  main()
