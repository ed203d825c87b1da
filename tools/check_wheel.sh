#!/usr/bin/env bash
# Packaging check: build the sdist and the wheel, `twine check` them, install the wheel
# alone in a fresh venv (its declared dependencies only, no source tree on the path) and
# run a small aggregation from it.
#   PY      interpreter with `build` and `twine` (default .venv/bin/python: `make wheel`)
#   PYTHON  interpreter for the fresh venv (default: tools/find_python.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYTHON=${PYTHON:-$(bash tools/find_python.sh)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --no-isolation: setuptools comes with the `lint` extra (saves two throw-away build envs);
# the wheel is still built from the sdist, so a file missing from the sdist fails here.
"$PY" -m build --no-isolation --sdist --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
"$PY" -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
version=$(grep -m1 '^version = ' pyproject.toml | cut -d'"' -f2)
case "$(basename "$wheel")" in
  mtl_optax-"$version"-py3-none-any.whl) ;;
  *) echo "unexpected wheel name: $wheel (version $version)"; exit 1 ;;
esac
# Only the package goes into the wheel (no tests, benchmarks or notebooks).
"$PY" - "$wheel" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if not n.startswith(("mtl_optax/", "mtl_optax-"))]
assert not bad, f"unexpected files in the wheel: {bad[:5]}"
assert "mtl_optax/_src/methods/cagrad.py" in names
print(f"wheel: {len(names)} files, package only")
PYEOF

# A bare venv, filled by the outer pip: the wheel and its declared dependencies only.
"$PYTHON" -m venv --without-pip "$work/venv"
"$PY" -m pip --python "$work/venv/bin/python" install -q --no-compile \
  --disable-pip-version-check "$wheel"
cd "$work"   # away from the source tree: the import must come from the wheel
JAX_PLATFORMS=cpu "$work/venv/bin/python" - "$version" <<'PYEOF'
import sys
import jax.numpy as jnp
import optax
import mtl_optax as mo
assert "site-packages" in mo.__file__, mo.__file__
assert mo.__version__ == sys.argv[1], (mo.__version__, sys.argv[1])
grads = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}
tx = optax.chain(mo.upgrad(), optax.sgd(0.1))
update, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)})
assert jnp.all(grads["w"] @ -update["w"] >= -1e-6), "UPGrad update conflicts with a task"
print(f"mtl_optax {mo.__version__} imported from {mo.__file__}; upgrad step OK")
PYEOF
