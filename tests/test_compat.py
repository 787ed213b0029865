"""The reference package's API (`from SmoothCache import ...`) runs its README examples unchanged."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import CallCounter, generate, make_dit_pipeline, sample_loop

import smoothcache
from smoothcache import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from reference_golden import CASES, golden_name, run_case

GOLDEN = Path(__file__).parent / "data" / "reference_golden"


@pytest.mark.parametrize("case", CASES, ids=lambda c: golden_name(*c))
def test_calibration_helper_writes_the_reference_schedule_byte_for_byte(case, tmp_path, capsys):
    from SmoothCache import DiffuserCalibrationHelper

    path = run_case(DiffuserCalibrationHelper, *case, tmp_path)
    assert path.read_text() == (GOLDEN / path.name).read_text()


def test_reference_readme_diffusers_example_runs_and_keeps_caching(tmp_path, capsys):
    from SmoothCache import DiffuserCacheHelper

    pipe = make_dit_pipeline()
    schedule = {"attn1": [1, 0, 1, 0, 0, 1, 0, 1, 0, 1]}
    (tmp_path / "s.json").write_text(json.dumps(schedule))
    with open(tmp_path / "s.json") as f:
        schedule = json.load(f)
    ours = smoothcache.cache(pipe, Schedule.from_dict(schedule))
    expected = generate(pipe)
    ours.disable()

    counter = CallCounter([b.attn1.to_q for b in pipe.transformer.transformer_blocks])
    cache_helper = DiffuserCacheHelper(pipe.transformer, schedule=schedule)
    cache_helper.enable()
    first = generate(pipe)
    second = generate(pipe)  # the reference ran this one uncached: its counters never reset
    cache_helper.disable()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert counter.count == 2 * sum(schedule["attn1"]) * 2
    assert capsys.readouterr().out == ""  # the reference printed a line per layer call


def test_dit_cache_helper_finds_original_dit_blocks_by_class_name(original_dit):
    from SmoothCache import DiTCacheHelper

    schedule = {"attn": [1, 0, 1, 0], "mlp": [1, 1, 0, 1]}
    counter = CallCounter([b.mlp[0] for b in original_dit.blocks])
    helper = DiTCacheHelper(original_dit, schedule=schedule)
    x, y = torch.randn(4, 6, 16), torch.tensor([0, 1, 4, 4])
    helper.enable()
    with torch.no_grad():
        cached = sample_loop(original_dit.forward_with_cfg, x, 4, y=y, cfg_scale=4.0)
    helper.disable()
    assert counter.count == 3 * 2
    with torch.no_grad():
        plain = sample_loop(original_dit.forward_with_cfg, x, 4, y=y, cfg_scale=4.0)
    assert not torch.equal(cached, plain)


def test_generic_helper_and_calibration_helper_with_block_classes(original_dit, tmp_path):
    from conftest import DiTBlock

    from SmoothCache import CalibrationHelper, SmoothCacheHelper

    log = tmp_path / "sub" / "schedule.json"
    helper = CalibrationHelper(original_dit, DiTBlock, ["attn", "mlp"], schedule_length=6, calibration_threshold=0.5, log_file=str(log))
    helper.enable()
    with torch.no_grad():
        sample_loop(original_dit.forward_with_cfg, torch.randn(4, 6, 16), 6, y=torch.tensor([0, 1, 4, 4]), cfg_scale=2.0)
    helper.disable()
    schedule = Schedule.load(log)
    assert schedule.keys == ["attn", "mlp"] and schedule.num_steps == 6
    assert schedule == helper.profile.schedule(alpha=0.5)
    SmoothCacheHelper(original_dit, [DiTBlock], ["attn", "mlp"], schedule.to_dict()).enable()


def test_reference_submodule_paths_import():
    from SmoothCache.calibration.calibration_helper import CalibrationHelper
    from SmoothCache.diffuser_cache_helper import DiffuserCacheHelper

    assert CalibrationHelper is smoothcache.compat.CalibrationHelper
    assert DiffuserCacheHelper is smoothcache.compat.DiffuserCacheHelper
    with pytest.raises(ValueError, match="calibration_lookahead must be greater than 0"):
        CalibrationHelper(torch.nn.Linear(1, 1), torch.nn.Linear, ["x"], calibration_lookahead=0)
