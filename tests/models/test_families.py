"""The checks every model family passes, over every ``FamilyCase`` row of the family files.

A family file (``test_<family>.py``) holds the builders of a tiny pipeline (from the model rows of
``tiny_configs.py``) or model, one ``FamilyCase`` row per variant, and only the tests specific to
that family.
"""

import importlib
from pathlib import Path

import pytest

from smoothcache import find_layers

from .conftest import (
    FamilyCase,
    assert_all_ones_is_bit_identical,
    assert_disable_restores_the_model,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    model_of,
)


def family_cases() -> list[FamilyCase]:
    """Every ``FamilyCase`` defined at the top level of a family file, in file order."""
    cases = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if path.stem != Path(__file__).stem:
            module = importlib.import_module(f".{path.stem}", __package__)
            cases += [value for value in vars(module).values() if isinstance(value, FamilyCase)]
    return cases


def params(cases: list[FamilyCase]) -> list:
    """One parameter per case, with the family's name for its id and the family's marks."""
    return [pytest.param(case, marks=case.marks, id=case.name) for case in cases]


CASES = family_cases()
OPT_IN = [case for case in CASES if case.opt_in_components is not None]
TRUE_CFG = [case for case in CASES if case.true_cfg is not None]


@pytest.fixture(params=params(CASES))
def case(request) -> FamilyCase:
    return request.param


@pytest.fixture
def pipe(case):
    return case.make()


def test_default_layers_have_the_expected_block_keys(case, pipe):
    assert [layer.block_key for layer in find_layers(model_of(pipe))] == list(case.default_keys)


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(case, pipe):
    schedule = calibrated_schedule(pipe, case.generate, None, case.calls_per_step, case.steps)
    assert set(schedule.keys) == set(case.schedule_keys)
    assert_skips_exactly_the_scheduled_calls(pipe, case.generate, schedule, calls_per_step=case.calls_per_step)


def test_all_ones_schedule_is_bit_identical_to_uncached(case, pipe):
    assert_all_ones_is_bit_identical(pipe, case.generate, case.all_ones_components, case.calls_per_step)


def test_disable_restores_the_model_exactly(case, pipe):
    schedule = calibrated_schedule(pipe, case.generate, case.disable_components, case.calls_per_step, case.steps)
    assert_disable_restores_the_model(pipe, case.generate, schedule, case.calls_per_step)


@pytest.mark.parametrize("case", params(OPT_IN))
def test_opt_in_components_are_calibrated_and_skip_exactly_the_scheduled_calls(case, pipe):
    schedule = calibrated_schedule(pipe, case.generate, case.opt_in_components, case.calls_per_step, case.steps)
    assert set(schedule.keys) == set(case.opt_in_components)
    assert_skips_exactly_the_scheduled_calls(pipe, case.generate, schedule, calls_per_step=case.calls_per_step)


@pytest.mark.parametrize("case", params(TRUE_CFG))
def test_true_cfg_two_calls_per_step_skip_exactly_the_scheduled_calls(case, pipe):
    schedule = calibrated_schedule(pipe, case.true_cfg, calls_per_step=2)
    assert_skips_exactly_the_scheduled_calls(pipe, case.true_cfg, schedule, calls_per_step=2)


@pytest.mark.parametrize("case", params(TRUE_CFG))
def test_true_cfg_all_ones_schedule_is_bit_identical_to_uncached(case, pipe):
    assert_all_ones_is_bit_identical(pipe, case.true_cfg, calls_per_step=2)
