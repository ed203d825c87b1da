"""Adversarial inputs in float64 (see tests/reliability_cases.py): finite, well-structured."""

import pytest
from hypothesis import given, settings

from tests.registry import ENTRIES
from tests.reliability_cases import EXAMPLES_F64, check_case, jacobians
from tests.reliability_cases import release_compiled_programs  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("release_compiled_programs")


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_adversarial_inputs_float64(name, x64):
  @settings(max_examples=EXAMPLES_F64)
  @given(jacobians(ENTRIES[name].min_tasks, "float64"))
  def run(case):
    check_case(name, case[0], case[1], "float64")
  run()
