"""Schedule and profile files: bad input of every kind fails with our error naming the file; writes are atomic."""

import copy
import json
import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoothcache import (
    CalibrationProfile,
    LayerInfo,
    ProfileError,
    Schedule,
    ScheduleError,
)
from smoothcache.files import atomic_path, atomic_write_text

LOADERS = [(Schedule, ScheduleError), (CalibrationProfile, ProfileError)]


def small_profile() -> CalibrationProfile:
    """Two runs of two layers over 5 steps, with forecast errors and one step a layer never ran (NaN)."""
    rng = np.random.default_rng(0)
    errors = rng.uniform(0, 1, (2, 2, 2, 5))
    errors[..., 3:] = np.nan  # past the last step, as calibration leaves them
    errors[0, 1, 0, 1] = np.nan
    forecasts = rng.uniform(0, 1, (2, 2, 3, 2, 5))
    layers = [LayerInfo("blocks.0.attn1", "attn1", 0, 10.0), LayerInfo("blocks.0.ff", "ff", 0, 30.0)]
    metadata = {"step_weights": [1.0, 0.8, 0.5, 0.2, 0.1], "timesteps": [900.0, 700.0, 500.0, 300.0, 100.0],
                "scheduler_config": {"_class_name": "DDIMScheduler"}, "run_labels": ["call 0", "call 1"]}
    return CalibrationProfile(layers, errors, metadata, 100.0, forecasts)


VALID_PROFILE = small_profile().to_dict()
VALID_SCHEDULE = {"attn1": [1, 0, 1, 0, 1], "ff": [1, 1, 0, 1, 1]}


def refused(path: Path, content: str | bytes, cls, error):
    """Load ``content`` from ``path``; the error must be ``error`` and name the file. Returns its message."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(error) as caught:
        cls.load(path)
    assert str(path) in str(caught.value)
    return str(caught.value)


def profile_with(tmp_path: Path, edit) -> str:
    """The message of loading the valid profile after ``edit(data)``."""
    data = copy.deepcopy(VALID_PROFILE)
    edit(data)
    return refused(tmp_path / "bad-profile.json", json.dumps(data), CalibrationProfile, ProfileError)


def strict_loads(text: str):
    def no_constant(name: str):
        raise AssertionError(f"{name} in a file that must be strict JSON")

    return json.loads(text, parse_constant=no_constant)


# ---- whole-file problems ------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "error"), LOADERS)
def test_bytes_that_are_not_utf8(tmp_path, cls, error):
    assert "is not UTF-8 text (byte 2 is 0xe9)" in refused(tmp_path / "latin1.json", b'{"\xe9": [1]}', cls, error)


@pytest.mark.parametrize(("cls", "error"), LOADERS)
def test_deep_nesting(tmp_path, cls, error):
    assert "nests lists or objects too deeply" in refused(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000, cls, error)


@pytest.mark.parametrize(("cls", "error"), LOADERS)
def test_integers_too_long_to_read(tmp_path, cls, error):
    assert "is not usable JSON" in refused(tmp_path / "long.json", '{"attn1": [1' + "0" * 5000 + "]}", cls, error)


def test_deep_nesting_and_huge_values_handed_to_from_dict():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ScheduleError, match=r"has \[+\.\.\.\]+ at step 1"):
        Schedule.from_dict({"attn1": [1, deep]}, source="x.json")
    with pytest.raises(ScheduleError, match="has an integer of about 5001 digits at step 1"):
        Schedule.from_dict({"attn1": [1, 10**5000]}, source="x.json")
    with pytest.raises(ProfileError, match=r"x.json: layer 0 must be an object with name, layer_type, block and flops, got \[+\.\.\.\]+"):
        CalibrationProfile.from_dict({**VALID_PROFILE, "layers": deep}, source="x.json")


# ---- numbers that are not numbers ---------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(total_flops=10**400), "total_flops is an integer of about 401 digits"),
        (lambda d: d.update(lookahead=10**400), "lookahead an integer of about 401 digits"),
        (lambda d: d["layers"][0].update(flops=10**400), "has flops an integer of about 401 digits"),
        (lambda d: d["runs"][0]["blocks.0.ff"][0].__setitem__(2, 10**400), "lookahead 1 has an integer of about 401 digits"),
        (lambda d: d.update(total_flops=math.inf), "total_flops is inf"),
        (lambda d: d.update(total_flops=math.nan), "total_flops is nan"),
        (lambda d: d["layers"][1].update(flops=math.nan), "'blocks.0.ff' has flops nan"),
        (lambda d: d.update(num_steps=math.nan), "num_steps must be a whole number >= 2, got nan"),
        (lambda d: d["metadata"]["step_weights"].__setitem__(0, math.inf), "step_weights must be 5 finite numbers"),
        (lambda d: d["metadata"]["timesteps"].__setitem__(0, math.nan), "timesteps must be a list of finite numbers"),
    ],
)
def test_huge_integers_infinity_and_nan_where_a_number_is_expected(tmp_path, edit, message):
    assert message in profile_with(tmp_path, edit)


def test_infinity_and_nan_in_a_schedule(tmp_path):
    assert "has nan at step 1" in refused(tmp_path / "s.json", '{"attn1": [1, NaN]}', Schedule, ScheduleError)
    assert "has inf at step 1" in refused(tmp_path / "s.json", '{"attn1": [1, Infinity]}', Schedule, ScheduleError)
    assert "at step 1" in refused(tmp_path / "s.json", '{"attn1": [1, 1' + "0" * 400 + "]}", Schedule, ScheduleError)


# ---- wrong types ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(metadata=5), "\"metadata\" must be an object, got 5"),
        (lambda d: d.update(layers=[]), "\"layers\" must be a non-empty list"),
        (lambda d: d["layers"][0].update(layer_type=7), "'blocks.0.attn1' has layer_type 7"),
        (lambda d: d["layers"][0].update(flops="x"), "'blocks.0.attn1' has flops 'x'"),
        (lambda d: d["layers"][0].update(block="3"), "'blocks.0.attn1' has block '3'"),
        (lambda d: d["layers"][0].update(block=True), "'blocks.0.attn1' has block True"),
        (lambda d: d["layers"].__setitem__(0, "blocks.0.attn1"), "layer 0 must be an object"),
        (lambda d: d["layers"][0].update(name=None), "layer 0 has name None"),
        (lambda d: d.update(runs={"a": 1}), "\"runs\" must be a non-empty list"),
        (lambda d: d["runs"].__setitem__(1, []), "run 1 must be an object of layer name -> curves"),
        (lambda d: d["runs"][0].update(extra=[]), "run 0 has curves for 'extra'"),
        (lambda d: d["runs"][0].pop("blocks.0.ff"), "run 0 has no curves for layer 'blocks.0.ff'"),
        (lambda d: d["runs"][0].update({"blocks.0.ff": "0.1"}), "'blocks.0.ff' in run 0 has '0.1' lookahead rows"),
        (lambda d: d["runs"][0]["blocks.0.ff"].__setitem__(0, 0.1), "lookahead 1 has 0.1 values, expected 4"),
        (lambda d: d["runs"][0]["blocks.0.ff"][1].__setitem__(0, "0.1"), "lookahead 2 has '0.1' at step 0"),
        (lambda d: d["runs"][0]["blocks.0.ff"][1].__setitem__(0, True), "lookahead 2 has True at step 0"),
        (lambda d: d.update(lookahead="2"), "lookahead must be a whole number >= 1, got '2'"),
        (lambda d: d.update(num_steps=5.0), "num_steps must be a whole number >= 2, got 5.0"),
        (lambda d: d.update(forecast_runs=[{}]), "\"forecast_runs\" must be a list of 2 runs"),
        (lambda d: d["forecast_runs"][1]["blocks.0.ff"].pop(), "'blocks.0.ff' in forecast run 1 must be a list of 3 gaps"),
        (lambda d: d["metadata"].update(run_labels="call 0"), "run_labels must be a list"),
    ],
)
def test_wrong_types_anywhere_in_a_profile(tmp_path, edit, message):
    assert message in profile_with(tmp_path, edit)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[1, 0]]', "must be a JSON object"),
        ('{"attn1": "1,0"}', "must be a list of 0/1, got str"),
        ('{"attn1": null}', "must be a list of 0/1, got NoneType"),
        ('{"attn1": [1, [0]]}', "has [0] at step 1"),
        ('{"attn1": [1, 0.0]}', "has 0.0 at step 1"),
        ('{"": [1, 0]}', "has a key ''"),
    ],
)
def test_wrong_types_anywhere_in_a_schedule(tmp_path, text, message):
    assert message in refused(tmp_path / "bad-schedule.json", text, Schedule, ScheduleError)


# ---- wrong ranges ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["runs"][1]["blocks.0.attn1"][0].__setitem__(2, -0.5), "has -0.5 at step 2; errors are finite numbers >= 0"),
        (lambda d: d["runs"][1]["blocks.0.attn1"][0].__setitem__(2, math.inf), "has inf at step 2"),
        (lambda d: d["forecast_runs"][0]["blocks.0.ff"][0][0].__setitem__(1, -1), "gap 1, lookahead 1 has -1 at step 2"),
        (lambda d: d.update(total_flops=-1.0), "total_flops is -1.0"),
        (lambda d: d["layers"][1].update(flops=-3), "has flops -3"),
        (lambda d: d["layers"][1].update(block=-1), "has block -1"),
        (lambda d: d["metadata"].update(step_weights=[1.0, 0.5]), "step_weights must be 5 finite numbers >= 0"),
        (lambda d: d["metadata"].update(step_weights=[1.0, 0.5, -0.1, 0.2, 0.1]), "step_weights must be 5"),
        (lambda d: d["metadata"].update(step_weights="1 1 1 1 1"), "step_weights must be 5"),
        (lambda d: d["layers"][1].update(name="blocks.0.attn1"), "layer 'blocks.0.attn1' is listed twice"),
        (lambda d: d["metadata"].update(scheduler_config=["DDIM"]), "scheduler_config must be an object"),
        (lambda d: d.update(lookahead=0), "lookahead must be a whole number >= 1, got 0"),
        (lambda d: d.update(num_steps=-5), "num_steps must be a whole number >= 2, got -5"),
        (lambda d: d.update(lookahead=5), "lookahead 5 reaches past the last of 5 steps"),
        (lambda d: d.update(num_steps=6), "lookahead 1 has 4 values, expected 5"),
    ],
)
def test_wrong_ranges_in_a_profile(tmp_path, edit, message):
    assert message in profile_with(tmp_path, edit)


def test_a_tiny_file_claiming_a_huge_profile_is_refused_before_allocating(tmp_path):
    path = tmp_path / "claims.json"
    for lookahead, num_steps in ((20000, 20000), (19999, 20000), (3, 20000), (10**9, 10**9 + 1)):
        text = json.dumps({"format": "smoothcache.profile", "format_version": 1, "lookahead": lookahead,
                           "num_steps": num_steps, "layers": [{"name": "a", "layer_type": "attn1", "block": 0}],
                           "runs": [{"a": [[0.1]]}]})
        assert len(text) < 200
        tracemalloc.start()
        try:
            refused(path, text, CalibrationProfile, ProfileError)
            assert tracemalloc.get_traced_memory()[1] < 1_000_000  # bytes at the peak; the claim is 3 GB
        finally:
            tracemalloc.stop()


# ---- what still loads, and how profiles are written -------------------------------------------
def test_old_files_with_nan_still_load_and_null_reads_as_nan(tmp_path):
    profile = small_profile()
    old = json.dumps(VALID_PROFILE).replace("null", "NaN")  # as profiles were written before strict JSON
    assert "NaN" in old
    (tmp_path / "old.json").write_text(old)
    loaded = CalibrationProfile.load(tmp_path / "old.json")
    assert np.isnan(loaded.errors[0, 1, 0, 1])
    np.testing.assert_array_equal(loaded.errors, profile.errors)
    assert loaded.to_dict()["forecast_runs"] == profile.to_dict()["forecast_runs"]


def test_profiles_are_written_as_strict_json_and_round_trip(tmp_path):
    profile = small_profile()
    profile.metadata["resampled_from"] = {"timesteps": [math.nan]}
    path = profile.save(tmp_path / "new" / "profile.json")
    data = strict_loads(path.read_text())
    assert data["runs"][0]["blocks.0.ff"][0][1] is None and data["metadata"]["resampled_from"]["timesteps"] == [None]
    loaded = CalibrationProfile.load(path)
    np.testing.assert_array_equal(loaded.errors, profile.errors)
    assert loaded.layers == profile.layers and loaded.total_flops == profile.total_flops
    assert loaded.metadata["step_weights"] == profile.metadata["step_weights"]
    assert strict_loads(loaded.save(tmp_path / "again.json").read_text()) == data


def test_schedule_save_writes_exactly_to_json(tmp_path):
    schedule = Schedule.from_dict(VALID_SCHEDULE)
    assert schedule.save(tmp_path / "a" / "s.json").read_bytes() == schedule.to_json().encode()


# ---- atomic writes --------------------------------------------------------------------------
@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch, failing):
    schedule_path, profile_path = tmp_path / "s.json", tmp_path / "p.json"
    schedule_path.write_text("old schedule")
    profile_path.write_text("old profile")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        Schedule.from_dict(VALID_SCHEDULE).save(schedule_path)
    with pytest.raises(OSError, match="No space left"):
        small_profile().save(profile_path)
    assert schedule_path.read_text() == "old schedule" and profile_path.read_text() == "old profile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "s.json"]  # no temporary file left


def test_a_writer_failing_midway_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old figure")
    with pytest.raises(RuntimeError, match="crashed"), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"  # writers that read the format from it still can
        tmp.write_bytes(b"half a new fig")
        raise RuntimeError("writer crashed")
    assert path.read_bytes() == b"old figure" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_atomic_writes_keep_the_old_files_permissions(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


# ---- fuzzing: whatever a file holds, only our errors escape -------------------------------------
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
    st.sampled_from([-1, 0, 1, 2, 10**400, -(10**400), math.nan, math.inf, -math.inf, 20000, [], {}, [[]], [None]]).map(copy.deepcopy),
)  # copies: a later edit may append to the value drawn
JSON_VALUES = st.recursive(ODD_VALUES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@st.composite
def mutated(draw, base):
    """``base`` after one to three edits at random depths: a value replaced, removed, or repeated."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        parent, key, node = None, None, data
        for _ in range(draw(st.integers(1, 6))):
            if not isinstance(node, (dict, list)) or not node:
                break
            key = draw(st.sampled_from(list(node))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
            parent, node = node, node[key]
        if parent is None:  # an earlier edit left no container to go into
            return draw(JSON_VALUES)
        action = draw(st.sampled_from(["replace", "replace", "remove", "repeat"]))
        if action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "remove":
            del parent[key]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(node))
        else:
            parent[draw(st.text(max_size=4))] = copy.deepcopy(node)
    return data


def only_our_errors(cls, error, data, path: Path) -> None:
    for attempt in ("dict", "file"):
        try:
            if attempt == "dict":
                loaded = cls.from_dict(data, source=str(path))
            else:
                path.write_text(json.dumps(data))
                loaded = cls.load(path)
        except error as exc:
            assert str(path) in str(exc)
            continue
        # whatever loads can be written again, as strict JSON
        strict_loads(json.dumps(loaded.to_dict(), allow_nan=False) if cls is CalibrationProfile else loaded.to_json())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated(VALID_PROFILE))
def test_fuzzed_profiles_raise_only_profile_errors(tmp_path, data):
    only_our_errors(CalibrationProfile, ProfileError, data, tmp_path / "fuzzed-profile.json")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated(VALID_SCHEDULE))
def test_fuzzed_schedules_raise_only_schedule_errors(tmp_path, data):
    only_our_errors(Schedule, ScheduleError, data, tmp_path / "fuzzed-schedule.json")
