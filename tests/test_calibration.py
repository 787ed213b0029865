import numpy as np
import pytest
import torch
from conftest import STEPS, generate, sample_loop

import smoothcache
from smoothcache import CalibrationProfile, ProfileError, StepMismatchError


def record_outputs(pipe, names, seeds):
    """Every output of the named layers, per generation, by brute force."""
    outputs = {name: [] for name in names}
    handles = [
        pipe.transformer.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: outputs[name].append(out.detach().float().clone())
        )
        for name in names
    ]
    for seed in seeds:
        generate(pipe, seed)
    for h in handles:
        h.remove()
    return outputs


def test_profile_holds_the_rel_l1_error_of_every_layer_step_and_lookahead(dit_pipe):
    with smoothcache.calibration(dit_pipe, components=["attn1", "ff"], lookahead=3) as rec:
        generate(dit_pipe, seed=1)
        generate(dit_pipe, seed=2)
    profile = rec.profile
    names = [layer.name for layer in profile.layers]
    assert names == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.0.ff",
        "transformer_blocks.1.attn1",
        "transformer_blocks.1.ff",
    ]
    assert profile.errors.shape == (2, 4, 3, STEPS)

    outputs = record_outputs(dit_pipe, names, seeds=[1, 2])
    for run in range(2):
        for i, name in enumerate(names):
            ys = outputs[name][run * STEPS : (run + 1) * STEPS]
            for k in (1, 2, 3):
                for s in range(STEPS):
                    got = profile.errors[run, i, k - 1, s]
                    if s + k >= STEPS:
                        assert np.isnan(got)
                    else:
                        later, earlier = ys[s + k], ys[s]
                        expected = ((later - earlier).abs().sum() / later.abs().sum()).item()
                        assert got == pytest.approx(expected, rel=1e-5)


def test_profile_metadata_costs_and_json_round_trip(dit_pipe, tmp_path):
    with smoothcache.calibration(dit_pipe, lookahead=2) as rec:
        generate(dit_pipe, seed=3)
    profile = rec.profile
    meta = profile.metadata
    assert meta["model_class"] == "DiTTransformer2DModel"
    assert meta["scheduler_class"] == "DDIMScheduler"
    assert meta["pipeline_class"] == "DiTPipeline"
    assert meta["num_steps"] == STEPS and meta["lookahead"] == 2 and meta["dtype"] == "float32"
    assert meta["smoothcache_version"] == smoothcache.__version__
    # measured FLOPs: the feed-forward (4x expansion) costs more than attention here, both less than the model
    costs = profile.key_costs()
    assert set(costs) == {"attn1", "ff"}
    assert 0 < costs["attn1"] < costs["ff"] < profile.total_flops

    loaded = CalibrationProfile.load(profile.save(tmp_path / "profile.json"))
    np.testing.assert_array_equal(loaded.errors, profile.errors)
    assert loaded.layers == profile.layers and loaded.total_flops == profile.total_flops
    assert loaded.schedule(alpha=0.3) == profile.schedule(alpha=0.3)


def test_mean_curves_average_runs_then_blocks_of_a_type(dit_pipe):
    with smoothcache.calibration(dit_pipe) as rec:
        generate(dit_pipe, seed=1)
        generate(dit_pipe, seed=2)
    p = rec.profile
    expected = p.errors[:, [0, 2]].mean(axis=0).mean(axis=0)
    np.testing.assert_allclose(p.curves("attn1"), expected)
    np.testing.assert_allclose(p.curves("attn1-1"), p.errors[:, 2].mean(axis=0))
    assert p.keys() == ["attn1", "ff"] and p.keys(per_block=True) == ["attn1-0", "ff-0", "attn1-1", "ff-1"]


def test_budgets_pick_the_smallest_threshold_that_meets_them(dit_pipe):
    with smoothcache.calibration(dit_pipe) as rec:
        generate(dit_pipe)
    p = rec.profile
    schedule, alpha = p.schedule_and_threshold(compute_fraction=0.6, solver="greedy")
    assert schedule.compute_fraction() <= 0.6
    smaller = [a for a in np.unique(p.mean_errors()[np.isfinite(p.mean_errors())]) if a < alpha]
    assert all(p.schedule(alpha=float(a)).compute_fraction() > 0.6 for a in smaller)
    fast = p.schedule(speedup=1.3, solver="greedy")
    assert p.estimated_speedup(fast) >= 1.3
    with pytest.raises(Exception, match="No threshold reaches compute_fraction=0.05"):
        p.schedule(compute_fraction=0.05, solver="greedy")
    assert p.schedule(compute_fraction=0.6) == p.schedule(compute_fraction=0.6, solver="optimal")  # budgets: optimal
    with pytest.raises(ProfileError, match="exactly one of alpha, compute_fraction, speedup"):
        p.schedule(alpha=0.1, compute_fraction=0.5)


def test_calibration_removes_its_hooks(dit_pipe):
    before = generate(dit_pipe)
    with smoothcache.calibration(dit_pipe):
        generate(dit_pipe)
    for module in dit_pipe.transformer.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(generate(dit_pipe), before)


def test_bad_calibration_input_gets_clear_errors(dit_pipe):
    with pytest.raises(ProfileError, match="no complete generation"), smoothcache.calibration(dit_pipe):
        pass
    with pytest.raises(StepMismatchError, match="same number of steps: the first ran 10, this one runs 12"), smoothcache.calibration(dit_pipe):
        generate(dit_pipe, steps=10)
        generate(dit_pipe, steps=12)
    with pytest.raises(StepMismatchError, match="steps=8 but the pipeline is running 10"), smoothcache.calibration(dit_pipe, steps=8):
        generate(dit_pipe)
    with pytest.raises(ValueError, match="bare module needs steps="):
        smoothcache.calibration(dit_pipe.transformer)
    with pytest.raises(ValueError, match="lookahead=4 reaches past the last of 3 steps; calibrate with lookahead <= 2"), smoothcache.calibration(dit_pipe, lookahead=4):
        generate(dit_pipe, steps=3)


def test_bare_module_calibration_with_steps(original_dit):
    x = torch.randn(4, 6, 16)
    y = torch.tensor([0, 1, 4, 4])
    with smoothcache.calibration(original_dit, steps=8) as rec:
        sample_loop(original_dit.forward_with_cfg, x, 8, y=y, cfg_scale=4.0)
        sample_loop(original_dit.forward_with_cfg, x + 1, 8, y=y, cfg_scale=4.0)
    assert rec.profile.keys() == ["attn", "mlp"]
    assert rec.profile.num_runs == 2 and rec.profile.num_steps == 8


def test_profile_files_with_problems_are_named(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{")
    with pytest.raises(ProfileError, match=r"p\.json is not valid JSON"):
        CalibrationProfile.load(path)
    path.write_text('{"attn1": [1, 0]}')
    with pytest.raises(ProfileError, match=r"p\.json is not a smoothcache calibration profile"):
        CalibrationProfile.load(path)


def test_a_profile_refuses_another_model_or_step_count(dit_pipe, original_dit):
    with smoothcache.calibration(dit_pipe) as rec:
        generate(dit_pipe)
    profile = rec.profile
    profile.check_compatible(dit_pipe, num_steps=STEPS)
    with pytest.raises(ProfileError, match="calibrated on DiTTransformer2DModel; OriginalStyleDiT lacks 4 of its 4 layers"):
        profile.check_compatible(original_dit)
    with pytest.raises(ProfileError, match="calibrated for 10 steps but 20 were asked for"):
        profile.check_compatible(dit_pipe, num_steps=20)
    with smoothcache.calibration(dit_pipe) as other:
        generate(dit_pipe, steps=12)
    with pytest.raises(ProfileError, match="Cannot merge profiles of 10 and 12 steps"):
        CalibrationProfile.merge([profile, other.profile])
    merged = CalibrationProfile.merge([profile, profile])
    assert merged.num_runs == 2 and merged.schedule(alpha=0.2) == profile.schedule(alpha=0.2)


def test_estimated_speedup_counts_each_layer_under_the_key_that_governs_it(dit_pipe):
    with smoothcache.calibration(dit_pipe) as rec:
        generate(dit_pipe)
    p = rec.profile
    half = (1, 0) * (STEPS // 2)
    flops = {layer.name: layer.flops for layer in p.layers}
    # block 1's attn1 follows its own all-ones plan, block 0's the type plan
    mixed = smoothcache.Schedule({"attn1": half, "attn1-1": (1,) * STEPS})
    saved = 0.5 * flops["transformer_blocks.0.attn1"]
    assert p.estimated_speedup(mixed) == pytest.approx(p.total_flops / (p.total_flops - saved))
    assert p.estimated_speedup(smoothcache.Schedule({"attn1": half})) == pytest.approx(
        p.total_flops / (p.total_flops - 0.5 * (flops["transformer_blocks.0.attn1"] + flops["transformer_blocks.1.attn1"]))
    )
