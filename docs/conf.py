# Copyright 2025 The mtl_optax Authors.
# Licensed under the Apache License, Version 2.0.
"""Sphinx configuration for the mtl_optax documentation (`make docs`).

Same stack as the JAX, Flax and optax docs: sphinx-book-theme, MyST Markdown
(myst-nb, which also renders the notebooks), autodoc + autosummary + napoleon for
the Google-style docstrings, MathJax for the equations. Builds offline: no
intersphinx, notebooks rendered from their stored cells (never executed here;
they run in the test suite instead). docs/README.md explains the choices.
"""

import importlib
import inspect
import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import mtl_optax  # noqa: E402  (after the path set-up)

project = "mtl_optax"
author = "The mtl_optax Authors"
copyright = "2025, The mtl_optax Authors"  # noqa: A001  (Sphinx's name)
release = mtl_optax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

exclude_patterns = ["_build", "README.md", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

html_theme = "sphinx_book_theme"
html_title = f"mtl_optax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
}

# MyST: $…$ / $$…$$ math, ::: fences, heading anchors for in-page links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"   # notebooks run in tests/test_notebooks.py, not at build time

# autodoc: signatures without the type-hint noise, members in source order.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"exclude-members": "__new__, _asdict, _make, _replace, _fields, "
                                              "_field_defaults, count, index"}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [("Reference", "references"), ("Attributes", "params_style"),
                            ("Guarantees", "notes_style"), ("Example", "example")]

nitpicky = False

# --------------------------------------------------------------------------
# README sections are included into the guides (one source of truth); links
# written for GitHub's view of the repository are mapped to the pages here.
_README_LINKS = {
    "(#models-with-state-batchnorm-dropout)": "(/guides/models_with_state.md)",
    "(benchmarks/README.md": "(/benchmarks.md",    # with or without an #anchor
    "(docs/distributed.md)": "(/distributed.md)",
    "(../shared/spec/benchmarks.md)": "",
    # benchmarks/README.md's figures and result links, seen from docs/benchmarks.md.
    "](results/": "](../benchmarks/results/",
}


def _rewrite_included(app, relative_path, parent_docname, content):
  del app, parent_docname
  if pathlib.Path(relative_path).name not in ("README.md", "CHANGELOG.md"):
    return
  text = content[0]
  for old, new in _README_LINKS.items():
    text = text.replace(old, new)
  content[0] = text


# --------------------------------------------------------------------------
# Equations in the docstrings are indented blocks of Unicode math (readable in
# `help()` and in the source). Render them verbatim, keeping their alignment,
# instead of as re-flowed block quotes.
_FIELD = re.compile(r"^(:|\.\. |>>>)")


def _equations_verbatim(app, what, name, obj, options, lines):
  del app, what, name, obj, options
  out = []
  in_fields = False
  for i, line in enumerate(lines):
    if _FIELD.match(line) and not line.startswith(">>>"):
      in_fields = True   # napoleon's :param: / rubric output: leave alone
    out.append(line)
    if in_fields or line.strip() or i == 0:
      continue
    prev = lines[i - 1]
    nxt = next((x for x in lines[i + 1:] if x.strip()), None)
    if not prev.strip() or nxt is None:
      continue
    indent = lambda s: len(s) - len(s.lstrip())
    # The paragraph's own indentation: that of its first line.
    j = i - 1
    while j > 0 and lines[j - 1].strip():
      j -= 1
    if (indent(nxt) > indent(lines[j]) and not prev.rstrip().endswith("::")
        and not nxt.lstrip().startswith((">>>", "..", "*", "-", ":"))):
      out[-2] = prev.rstrip() + (":" if prev.rstrip().endswith(":") else " ::")
  lines[:] = _escape_prose(out)


_CODE = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_prose(lines):
  """Escapes ``|`` (|x| means a norm, not an RST substitution) outside code and
  literal blocks, and the ``*`` of ``*args`` in grouped parameter names."""
  out, literal_indent = [], None
  for line in lines:
    stripped = line.strip()
    indent = len(line) - len(line.lstrip())
    if literal_indent is not None and stripped and indent <= literal_indent:
      literal_indent = None
    if literal_indent is None and not stripped.startswith(">>>"):
      if line.startswith(":param ") and ":" in line[7:]:
        name, rest = line[7:].split(":", 1)
        line = ":param " + re.sub(r"(?<!\\)\*", r"\\*", name) + ":" + rest
      parts = _CODE.split(line)
      line = "".join(p if k % 2 else p.replace("|", "\\|") for k, p in enumerate(parts))
    if literal_indent is None and stripped.endswith("::"):
      literal_indent = indent
    out.append(line)
  return out


# --------------------------------------------------------------------------
# Every public name must appear in the API reference: a name added to
# mtl_optax/__init__.py (or a public submodule) without a page fails `make docs`.
_PUBLIC_MODULES = ("mtl_optax", "mtl_optax.metrics", "mtl_optax.distributed",
                   "mtl_optax.linalg", "mtl_optax.datasets", "mtl_optax.models",
                   "mtl_optax.nn")


def _public_names():
  names = set()
  for modname in _PUBLIC_MODULES:
    try:
      mod = importlib.import_module(modname)
    except ImportError:   # mo.linalg, mo.distributed: attributes, not submodules
      mod = getattr(mtl_optax, modname.rsplit(".", 1)[1])
    members = getattr(mod, "__all__", None)
    if members is None:
      members = [n for n in vars(mod) if not n.startswith("_")]
    for n in members:
      obj = getattr(mod, n)
      if inspect.ismodule(obj) or n in ("annotations",):
        continue
      if modname != "mtl_optax" and not callable(obj) and not inspect.isclass(obj):
        continue   # constants are documented in the prose of their module
      if modname != "mtl_optax" and getattr(obj, "__module__", "").split(".")[0] not in (
          "mtl_optax",):
        continue   # re-exported jax/numpy helpers
      names.add(f"{modname}.{n}")
  return names


def _check_api_complete(app, env):
  documented = set(env.get_domain("py").objects)
  missing = sorted(n for n in _public_names() if n not in documented)
  if missing:
    from sphinx.util import logging
    logging.getLogger(__name__).warning(
        "public names missing from the API reference (docs/api/*.rst): %s",
        ", ".join(missing))


# --------------------------------------------------------------------------
# The notebooks live in notebooks/ (they run in the test suite); copy them
# next to the pages so myst-nb renders them with their stored cells.
def _copy_notebooks(app):
  del app
  dest = DOCS / "notebooks"
  dest.mkdir(exist_ok=True)
  for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    target = dest / nb.name
    if not target.exists() or target.read_bytes() != nb.read_bytes():
      shutil.copyfile(nb, target)


def setup(app):
  _copy_notebooks(app)
  app.connect("include-read", _rewrite_included)
  app.connect("autodoc-process-docstring", _equations_verbatim)
  app.connect("env-check-consistency", _check_api_complete)
  return {"parallel_read_safe": True}


