"""calibration(layer_groups=n): each generation measures every n-th block's layers in turn, so the outputs
held for the errors shrink to about 1/n, and every layer is still measured."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import STEPS, generate, make_dit_pipeline

import smoothcache
from smoothcache import ProfileError
from smoothcache.cli import main


def calibrated(pipe, groups: int, generations: int = 4):
    with smoothcache.calibration(pipe, components=["attn1", "ff"], lookahead=2, layer_groups=groups) as rec:
        for seed in range(generations):
            generate(pipe, seed=seed)
    return rec.profile


def test_groups_hold_a_fraction_of_the_history_and_measure_every_layer():
    pipe = make_dit_pipeline(num_layers=4)
    whole, halves = calibrated(pipe, 1), calibrated(pipe, 2)
    whole_mib, halves_mib = whole.metadata["history_peak_mib"], halves.metadata["history_peak_mib"]
    assert 0 < halves_mib <= 0.5 * whole_mib + 1e-6  # 8 layers: 4 measured per generation
    assert halves.metadata["layer_groups"] == 2 and halves.num_runs == 4
    # every layer measured in the generations of its group, NaN in the others
    measured = np.isfinite(halves.errors[:, :, 0, 0])
    assert measured.sum(axis=0).tolist() == [2] * len(halves.layers)
    # a group is every other block, whole: both of its layers in the same generations
    assert measured[0].tolist() == [layer.block % 2 == 0 for layer in halves.layers]
    # a layer's mean over its generations is the mean of those same generations measured whole
    for index, layer in enumerate(halves.layers):
        runs = [run for run in range(4) if run % 2 == layer.block % 2]
        np.testing.assert_allclose(halves.mean_errors()[index], whole.errors[runs, index].mean(axis=0), rtol=1e-5)
    # the curves, and so the schedules, stay close to measuring everything everywhere
    np.testing.assert_allclose(halves.curves("attn1")[:, : STEPS - 2], whole.curves("attn1")[:, : STEPS - 2], rtol=0.5)
    assert set(halves.schedule(compute_fraction=0.6).keys) == {"attn1", "ff"}


def test_fewer_generations_than_groups_is_refused_with_the_fix():
    with pytest.raises(ProfileError, match="run at least 3"):
        calibrated(make_dit_pipeline(num_layers=4), 3, generations=2)
    with pytest.raises(ValueError, match="layer_groups must be >= 1"):
        smoothcache.calibration(make_dit_pipeline(), layer_groups=0)
    with pytest.raises(ValueError, match="at most 2 groups"):  # a group is every n-th block: two blocks, two groups
        smoothcache.calibration(make_dit_pipeline(), layer_groups=3)


def test_the_command_line_takes_layer_groups(tmp_path, capsys):
    out = tmp_path / "profile.json"
    argv = ["calibrate", "--model", "demo", "--steps", "6", "--samples", "2", "--batch", "1", "--lookahead", "2",
            "--layer-groups", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert "outputs held for the errors at most" in capsys.readouterr().out
    assert smoothcache.CalibrationProfile.load(out).metadata["layer_groups"] == 2
