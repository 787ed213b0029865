"""The command line on a tiny DiT pipeline saved to disk and loaded back with from_pretrained."""

import json
import subprocess
import sys

import pytest

from smoothcache import CalibrationProfile, Schedule
from smoothcache.cli import main

from conftest import make_dit_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dit")
    make_dit_pipeline().save_pretrained(path)
    return path


def test_calibrate_schedule_generate_inspect(pipeline_dir, tmp_path, capsys):
    profile_path, schedule_path = tmp_path / "profile.json", tmp_path / "schedule.json"
    common = ["--model", str(pipeline_dir), "--steps", "10", "--quiet"]
    assert main(["calibrate", *common, "--samples", "4", "--batch", "2", "--out", str(profile_path)]) == 0
    profile = CalibrationProfile.load(profile_path)
    assert profile.num_runs == 2 and profile.num_steps == 10 and profile.keys() == ["attn1", "ff"]
    assert profile.metadata["model"] == str(pipeline_dir) and len(profile.metadata["calibration_set"]) == 2
    assert "alpha   compute  est. speedup" in capsys.readouterr().out

    assert main(["schedule", str(profile_path), "--compute-fraction", "0.7", "--out", str(schedule_path)]) == 0
    schedule = Schedule.load(schedule_path)
    assert schedule.compute_fraction() <= 0.7
    assert "estimated speedup" in capsys.readouterr().out

    out = tmp_path / "images"
    assert main(["generate", *common, "--classes", "1,2,3", "--batch", "2", "--schedule", str(schedule_path), "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert len(record["files"]) == 3 and all((out / f.split("/")[-1]).exists() for f in record["files"])

    assert main(["inspect", str(profile_path), "--plot", str(tmp_path / "curves.png"), "--alpha", "0.2"]) == 0
    assert main(["inspect", str(schedule_path), "--plot", str(tmp_path / "plan.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "profile of DiTTransformer2DModel" in printed and "FLOPs share per call" in printed


def test_cli_errors_are_one_clear_line(pipeline_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"attn1": [0, 1]}')
    assert main(["inspect", str(bad)]) == 2
    assert "starts with 0" in capsys.readouterr().err
    schedule = tmp_path / "s.json"
    Schedule({"attn1": (1, 0, 1)}).save(schedule)
    with pytest.raises(SystemExit, match="has 3 steps but --steps is 10"):
        main(["generate", "--model", str(pipeline_dir), "--steps", "10", "--schedule", str(schedule), "--out", str(tmp_path)])
    assert main(["calibrate", "--model", str(pipeline_dir), "--steps", "4", "--classes", "5000", "--out", str(bad)]) == 2
    assert "outside 0..999" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "smoothcache", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("smoothcache ")
