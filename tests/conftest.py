"""Test configuration: CPU only, float64 available on demand, hypothesis profiles."""

import os

# CPU unless benchmarks.accelerator runs the marked subset on its device.
if os.environ.get("MTL_OPTAX_TESTS_ON_DEVICE") != "1":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests run tiny programs, so XLA's compile time dominates the suite:
# without LLVM optimisations it is ~35% shorter (the arithmetic is the same
# IEEE arithmetic; only code generation is less optimised).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()


def _jaxlib_version() -> tuple:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return (0, 0)


# XLA:CPU's previous code generator (elemental IR emitters, the default up to jax
# 0.6) compiles each kernel about twice as fast as the MLIR fusion emitters that
# jax 0.7 made the default, and the suite is mostly compilation of thousands of
# small distinct programs. jax 0.7–0.10 can still select it; 0.11 removed the
# flag (an unknown flag aborts the process), so `make test` pins jax 0.10.2
# (tools/test_constraints.txt) and `make test-newest` / `make test-all` run on
# the newest jax with its default emitters. With that generator, not splitting a
# program's code for parallel compilation saves another ~10 %: the pytest-xdist
# workers already keep every core busy, so the parts only add overhead.
if ((0, 7) <= _jaxlib_version() < (0, 11)
    and "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] += (" --xla_cpu_use_fusion_emitters=false"
                              " --xla_cpu_parallel_codegen_split_count=1")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.resources import release_if_many_mappings  # noqa: E402


def _reuse_mlir_contexts(uses: int = 10):
  """Lowers up to ``uses`` programs in one MLIR context per thread, as jax ≥ 0.11 does.

  jax 0.10 builds a new MLIR context for every lowering, and loading its dialects
  takes ~2–5 ms: in a py-spy profile of `make test`, 10 % of the samples, over the
  thousands of small programs (and op-by-op primitives) the suite lowers. Newer
  jax (``_create_ir_context`` and a thread-local context in
  ``jax._src.interpreters.mlir``) reuses each context for 10 lowerings, bounding
  what the interned types and attributes hold; this is that policy, for
  `make test`'s pinned jax. The lowered modules are the same: only the context
  that owns them is shared.
  """
  import threading  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  if hasattr(mlir, "_create_ir_context") or not hasattr(mlir, "make_ir_context"):
    return   # jax reuses its contexts itself, or lowers differently
  create = mlir.make_ir_context
  local = threading.local()

  def make_ir_context():
    context, count = getattr(local, "value", (None, uses))
    if count >= uses:
      context, count = create(), 0
    local.value = (context, count + 1)
    return context

  mlir.make_ir_context = make_ir_context


_reuse_mlir_contexts()

# One compilation cache per test run, shared by the pytest-xdist workers: many
# tests compile the same small programs (the same method at the same shapes in
# several files, and again after a worker frees its programs, see
# tests/resources.py). Keyed by the run, so every run starts cold (a fresh clone's
# time is what we report) and nothing leaks between runs.
if os.environ.get("MTL_OPTAX_TEST_CACHE", "1") == "1":
  import tempfile  # pylint: disable=g-import-not-at-top
  _run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
  _cache = os.path.join(tempfile.gettempdir(), f"mtl_optax_test_cache_{_run}")
  jax.config.update("jax_compilation_cache_dir", _cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:
  from hypothesis import HealthCheck, settings  # noqa: E402

  settings.register_profile(
      "ci", max_examples=50, deadline=None, derandomize=True,
      suppress_health_check=[HealthCheck.too_slow])
  settings.register_profile(
      "long", max_examples=1000, deadline=None,
      suppress_health_check=[HealthCheck.too_slow])
  settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a dev dependency; tests that need it import it.
  pass


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled (restored afterwards)."""
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:  # older jax
    from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  with ctx(True):
    yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Keeps each worker under the kernel's limit on memory mappings (tests/resources.py)."""
  yield
  release_if_many_mappings()
