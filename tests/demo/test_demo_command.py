"""`smoothcache demo` end to end on the shipped model, at reduced size."""

import json

import pytest

from smoothcache.cli import main

pytest.importorskip("torchmetrics")

RUN_KEYS = {"method", "alpha", "compute_fraction", "seconds", "speedup", "fid", "accuracy", "psnr", "ssim"}


def test_demo_writes_report_samples_and_tradeoff(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "8", "--samples-per-class", "1", "--timing-repeats", "1", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"device", "steps", "baseline", "runs"} <= set(report)
    assert report["steps"] == 8 and report["device"].startswith("cpu")
    assert set(report["baseline"]) >= {"seconds", "fid", "accuracy"}
    methods = {run["method"] for run in report["runs"]}
    assert {"smoothcache", "smoothcache-optimal", "smoothcache-forecast", "fixed-interval-2", "fixed-interval-3", "random",
            "fewer-steps"} <= methods
    for run in report["runs"]:
        assert RUN_KEYS <= set(run)
        assert run["seconds"] > 0 and 0 < run["compute_fraction"] <= 1
        assert 0 <= run["accuracy"] <= 1 and run["ssim"] <= 1
    smooth = [r for r in report["runs"] if r["method"] == "smoothcache"]
    assert all(r["alpha"] is not None for r in smooth)
    # the uncached samples of the shipped model show the requested digits
    assert report["baseline"]["accuracy"] >= 0.9
    for name in ("samples.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "uncached" in printed and "greedy a=" in printed and "optimal 0." in printed and "forecast 0." in printed
    assert "fewer-steps" in printed


def test_model_demo_names_the_shipped_model_everywhere_in_the_cli(tmp_path):
    profile, schedule, images = tmp_path / "p.json", tmp_path / "s.json", tmp_path / "img"
    assert main(["calibrate", "--model", "demo", "--steps", "10", "--samples", "4", "--out", str(profile), "--quiet"]) == 0
    assert main(["schedule", str(profile), "--compute-fraction", "0.6", "--out", str(schedule)]) == 0
    assert main(["generate", "--model", "demo", "--steps", "10", "--classes", "3,7", "--schedule", str(schedule),
                 "--out", str(images), "--quiet"]) == 0
    assert len(list(images.glob("*.png"))) == 2
    assert json.loads(profile.read_text())["metadata"]["pipeline_class"] == "DemoDiTPipeline"
