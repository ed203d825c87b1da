"""Test configuration: CPU only, float64 available on demand, hypothesis profiles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

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
