import json
from pathlib import Path

import pytest

from smoothcache import Schedule, ScheduleError

REFERENCE = Path(__file__).parent / "data" / "reference_schedules"


@pytest.mark.parametrize("name", sorted(p.name for p in REFERENCE.glob("*.json")))
def test_reference_schedule_files_load_and_save_unchanged(name, tmp_path):
    original = json.loads((REFERENCE / name).read_text())
    schedule = Schedule.load(REFERENCE / name)
    assert schedule.to_dict() == original
    assert list(schedule.to_dict()) == list(original)  # key order kept
    saved = schedule.save(tmp_path / name)
    assert json.loads(saved.read_text()) == original


def test_save_writes_the_reference_calibration_layout_byte_for_byte(tmp_path):
    # diffuser_schedule.json was written by the reference's calibration helper.
    text = (REFERENCE / "diffuser_schedule.json").read_text()
    assert Schedule.load(REFERENCE / "diffuser_schedule.json").to_json() == text


def test_per_key_compute_fraction_and_summary():
    schedule = Schedule.load(REFERENCE / "50-N-2-fora.json")
    assert schedule.num_steps == 50
    assert schedule.compute_fraction("attn") == pytest.approx(26 / 50)
    assert schedule.compute_fractions() == {"mlp": 26 / 50, "attn": 26 / 50}
    assert "attn" in schedule.summary() and "0.520" in schedule.summary()


def test_fixed_interval_reproduces_the_reference_fora_files():
    for steps, name in ((50, "50-N-2-fora.json"), (30, "30-N-2-fora.json")):
        reference = Schedule.load(REFERENCE / name)
        assert Schedule.fixed_interval(reference.keys, steps, 2) == reference


def test_estimated_speedup_from_layer_costs():
    schedule = Schedule({"attn": (1, 0, 1, 0), "mlp": (1, 1, 1, 1)})
    # attn is 40% of the cost and half skipped: 1 / (1 - 0.2)
    assert schedule.estimated_speedup({"attn": 4.0, "mlp": 5.0}, 10.0) == pytest.approx(1.25)


@pytest.mark.parametrize(
    "plans, message",
    [
        ({"attn1": [1, 2, 1]}, "has 2 at step 1; only 0 (reuse) and 1 (compute)"),
        ({"attn1": [1, 0.5]}, "has 0.5 at step 1"),
        ({"attn1": [1, "0"]}, "has '0' at step 1"),
        ({"attn1": [0, 1, 1]}, "starts with 0"),
        ({"attn1": [1, 0, 1], "ff": [1, 0]}, "unequal length ('attn1': 3, 'ff': 2)"),
        ({"attn1": []}, "is empty"),
        ({}, "has no keys"),
        ({"attn1": 5}, "must be a list of 0/1"),
    ],
)
def test_bad_plans_are_rejected_with_a_clear_error(plans, message):
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Schedule.from_dict(plans)


def test_malformed_json_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"attn1": [1, 0,')
    with pytest.raises(ScheduleError, match=r"broken\.json is not valid JSON \(line 1"):
        Schedule.load(path)
    path.write_text("[1, 0, 1]")
    with pytest.raises(ScheduleError, match=r"broken\.json must be a JSON object"):
        Schedule.load(path)
    path.write_text('{"attn1": [1, 3]}')
    with pytest.raises(ScheduleError, match=r"'attn1' in .*broken\.json has 3 at step 1"):
        Schedule.load(path)
    with pytest.raises(ScheduleError, match="Cannot read schedule file"):
        Schedule.load(tmp_path / "missing.json")
