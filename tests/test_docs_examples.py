"""The documentation's examples run: README ```python blocks and docstring doctests.

README blocks run top to bottom, each in a fresh namespace. A block is marked by an
HTML comment on the line before its fence (invisible on GitHub and in the docs):

* ``<!-- setup: NAME -->`` runs it after ``SETUPS[NAME]`` has defined the names the
  block takes from its surrounding prose (a model, a batch, a checkpoint path);
* ``<!-- not-run: REASON -->`` skips it (REASON says where it is tested instead).

Unmarked blocks must be self-contained. The doctests (``>>>`` examples in the
docstrings of every ``mtl_optax`` module) run with ``jax``, ``jnp``, ``np``,
``optax`` and ``mo`` (``mtl_optax``) predefined. Shapes are tiny: the whole file
is a few compilations.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo

ROOT = pathlib.Path(__file__).resolve().parents[1]
_FENCE = re.compile(
    r"(?:<!--\s*(?P<tag>[\w-]+)\s*:\s*(?P<arg>[^>]*?)\s*-->[ \t]*\n)?"
    r"^```python[ \t]*\n(?P<code>.*?)^```", re.S | re.M)


def readme_blocks(path=ROOT / "README.md"):
  """(line, tag, arg, code) of every ```python block of ``path``."""
  text = path.read_text(encoding="utf-8")
  return [(text.count("\n", 0, m.start("code")) + 1, m["tag"], m["arg"], m["code"])
          for m in _FENCE.finditer(text)]


# --- set-ups: the names a README block takes from its prose ------------------

def _linen_state(tmp_path):
  del tmp_path
  nn = pytest.importorskip("flax.linen")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      h = nn.Dense(8)(x)
      h = nn.BatchNorm(use_running_average=not train)(h)
      h = nn.Dropout(0.25, deterministic=not train)(nn.relu(h))
      return jnp.stack([nn.Dense(3, name=f"head{i}")(h) for i in range(2)])

  model = Net()
  images = jax.random.normal(jax.random.key(0), (6, 5))
  labels = jnp.array([[0, 1], [1, 2], [2, 0], [0, 0], [1, 1], [2, 2]])
  variables = model.init(jax.random.key(1), images, train=False)
  heads = lambda path, leaf: "head" in jax.tree_util.keystr(path)
  tx = optax.chain(mo.mgda(task_specific=heads), optax.adam(1e-3))
  return {
      "jax": jax, "jnp": jnp, "optax": optax, "mo": mo, "model": model, "tx": tx,
      "params": variables["params"], "opt_state": tx.init(variables["params"]),
      "state": {"batch_stats": variables["batch_stats"], "key": jax.random.key(2)},
      "images": images, "labels": labels, "test_images": images,
      "cross_entropy": lambda logits, y: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(logits, y)),
      "_before": variables["batch_stats"],
  }


def _check_linen_state(ns):
  assert ns["logits"].shape == (2, 6, 3)
  assert np.all(np.isfinite(np.asarray(ns["losses"])))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), ns["_before"],
                       ns["state"]["batch_stats"])
  assert any(jax.tree.leaves(moved)), "BatchNorm statistics did not advance"


def _nnx_state(tmp_path):
  del tmp_path
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.Linear(5, 8, rngs=rngs)
      self.norm = nnx.BatchNorm(8, rngs=rngs)
      self.dropout = nnx.Dropout(0.25, rngs=rngs)
      self.head_a = nnx.Linear(8, 1, rngs=rngs)
      self.head_b = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      z = self.dropout(jax.nn.relu(self.norm(self.trunk(x))))
      return jnp.stack([self.head_a(z)[:, 0], self.head_b(z)[:, 0]])

  x = jax.random.normal(jax.random.key(0), (6, 5))
  return {
      "jax": jax, "jnp": jnp, "optax": optax, "mo": mo, "nnx": nnx, "Net": Net,
      "heads": lambda path, leaf: "head" in jax.tree_util.keystr(path),
      "task_losses": lambda out, y: jnp.mean((out - y) ** 2, axis=1),
      "x": x, "y": jnp.stack([x[:, 0], -x[:, 1]]),
  }


def _check_nnx_state(ns):
  assert ns["losses"].shape == (2,) and np.all(np.isfinite(np.asarray(ns["losses"])))


def _checkpoint(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  import orbax  # pylint: disable=g-import-not-at-top
  params0 = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  tx = optax.chain(mo.pcgrad(num_tasks=2), optax.adam(1e-2))
  opt_state = tx.init(params0)
  grads = jax.tree.map(lambda p: jnp.stack([p + 1.0, -p + 0.5]), params0)
  updates, opt_state = tx.update(grads, opt_state, params0)
  return {"jax": jax, "orbax": orbax, "tx": tx, "params0": params0,
          "params": optax.apply_updates(params0, updates), "opt_state": opt_state,
          "path": tmp_path / "ckpt"}


def _check_checkpoint(ns):
  def raw(a):
    return jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  saved = {"params": ns["params"], "opt_state": ns["opt_state"]}
  same = jax.tree.map(lambda a, b: bool(np.array_equal(raw(a), raw(b))), saved,
                      ns["restored"])
  assert all(jax.tree.leaves(same)), "the checkpoint did not round-trip"


def _metrics(tmp_path):
  del tmp_path
  key = jax.random.key(0)
  x = jax.random.normal(key, (8, 3))
  y = jnp.stack([x[:, 0], -x[:, 1]], axis=1)                  # (N, m)
  params = {"w": 0.3 * jax.random.normal(key, (3, 4)), "heads": 0.3 * jnp.ones((2, 4))}

  def loss_fn(p, x, y):
    z = jnp.tanh(x @ p["w"])
    return jnp.mean((z @ p["heads"].T - y) ** 2, axis=0)     # (m,)

  return {
      "jax": jax, "jnp": jnp, "mo": mo, "key": key, "params": params, "x": x, "y": y,
      "loss_fn": loss_fn, "eval_fn": lambda p: loss_fn(p, x, y),
      "logits": jax.random.normal(key, (2, 8, 3)),
      "labels": jnp.tile(jnp.arange(8) % 3, (2, 1)), "grid": jnp.linspace(-1.0, 1.0, 21),
  }


def _check_metrics(ns):
  assert ns["ece"].shape == (2,) and ns["acc"].shape == (20, 10, 2)
  assert ns["surf"].shape == (21, 21, 2)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in (ns["ece"], ns["acc"], ns["surf"]))


SETUPS = {
    "metrics": (_metrics, _check_metrics),
    "linen-state": (_linen_state, _check_linen_state),
    "nnx-state": (_nnx_state, _check_nnx_state),
    "checkpoint": (_checkpoint, _check_checkpoint),
}

BLOCKS = readme_blocks()


def test_readme_has_marked_and_runnable_blocks():
  assert BLOCKS, "no ```python block found in README.md"
  for line, tag, arg, _ in BLOCKS:
    assert tag in (None, "setup", "not-run"), f"README.md:{line}: unknown marker {tag!r}"
    if tag == "setup":
      assert arg in SETUPS, f"README.md:{line}: unknown set-up {arg!r}"
    if tag == "not-run":
      assert arg, f"README.md:{line}: a not-run block must say why"
  assert sum(tag != "not-run" for _, tag, _, _ in BLOCKS) >= 1


@pytest.mark.parametrize("line,tag,arg,code", BLOCKS,
                         ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, tag, arg, code, tmp_path):
  if tag == "not-run":
    pytest.skip(f"README.md:{line} marked not-run: {arg}")
  namespace, check = {}, None
  if tag == "setup":
    make, check = SETUPS[arg]
    namespace = make(tmp_path)
  exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
  if check is not None:
    check(namespace)


def _public_modules():
  names = ["mtl_optax"]
  for info in pkgutil.walk_packages(mo.__path__, "mtl_optax."):
    names.append(info.name)
  return sorted(names)


def _doctests():
  finder = doctest.DocTestFinder(exclude_empty=True)
  globs = {"jax": jax, "jnp": jnp, "np": np, "optax": optax, "mo": mo}
  tests = []
  for name in _public_modules():
    try:
      module = importlib.import_module(name)
    except ImportError:   # optional dependency (flax) missing
      continue
    for t in finder.find(module, name, extraglobs=globs):
      if t.examples and t.name.startswith(name):
        tests.append(t)
  return tests


DOCTESTS = _doctests()


def test_doctests_found():
  assert len(DOCTESTS) >= 2, [t.name for t in DOCTESTS]


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples(test):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  result = runner.run(test, out=lambda s: pytest.fail(s, pytrace=False))
  assert result.failed == 0
