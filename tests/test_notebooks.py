"""The notebooks execute end to end (small configuration) and show their plots.

Each notebook is run with nbclient in a fresh kernel on the interpreter running
pytest: the fixture writes a kernelspec whose ``argv`` is ``sys.executable -m
ipykernel_launcher`` into a temporary ``JUPYTER_PATH`` directory, so nothing
has to be installed into the venv or the user's Jupyter directories
(``ipykernel`` and ``nbclient`` come with the ``dev`` extra).
``MTL_OPTAX_NB_SMALL=1`` selects the tiny configurations.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("flax")

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_NAME = "mtl-optax-tests"
NOTEBOOKS = {
    # name: (number of figures, text the executed notebook must contain)
    "quickstart.ipynb": (2, ("F-CAGrad", "CAGrad weights")),
    "tpu_experiments.ipynb": (1, ("| method |", "weights replicated on every device: True")),
}


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mtl_optax tests", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # Hermetic: connection files and IPython's profile go to tmp, not to $HOME.
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("MTL_OPTAX_NB_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  return KERNEL_NAME


def _outputs(nb):
  for cell in nb.cells:
    if cell.cell_type == "code":
      yield from cell.get("outputs", [])


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_executes_and_plots(name, kernel):
  path = ROOT / "notebooks" / name
  nb = nbformat.read(path, as_version=4)
  # The committed notebooks carry no outputs (they are produced here).
  assert not any(True for _ in _outputs(nb)), f"{name}: strip the outputs before committing"
  client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=600,
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()

  outputs = list(_outputs(nb))
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  n_figures, needles = NOTEBOOKS[name]
  assert len(images) >= n_figures, (
      f"{name}: expected {n_figures} plots as image/png outputs, got {len(images)}")
  text = "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/markdown", ""))
                 + o.get("data", {}).get("text/plain", "") for o in outputs)
  for needle in needles:
    assert needle in text, f"{name}: {needle!r} not in the outputs"
