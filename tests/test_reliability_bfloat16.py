"""Adversarial inputs in bfloat16 (see tests/reliability_cases.py): finite, well-structured."""

import pytest
from hypothesis import given, settings

from tests.registry import ENTRIES
from tests.reliability_cases import EXAMPLES, check_case, jacobians
from tests.reliability_cases import release_compiled_programs  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("release_compiled_programs")


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_adversarial_inputs_bfloat16(name):
  @settings(max_examples=EXAMPLES)
  @given(jacobians(ENTRIES[name].min_tasks, "bfloat16"))
  def run(case):
    check_case(name, case[0], case[1], "bfloat16")
  run()
