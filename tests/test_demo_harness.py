"""The demo harness's planning: methods matched in compute, on a profile of a tiny DiT."""

import pytest
from conftest import generate

import smoothcache
from smoothcache import Schedule
from smoothcache.demo.harness import DemoConfig, plan_methods, random_schedule, run_demo


@pytest.fixture(scope="module")
def profile():
    from conftest import make_dit_pipeline

    pipe = make_dit_pipeline(num_layers=3)
    with smoothcache.calibration(pipe, forecast="linear") as rec:
        generate(pipe, steps=20)
    return rec.profile


def test_random_schedule_matches_computed_steps_per_key():
    like = Schedule({"attn1": (1, 0, 0, 1, 0, 1, 0, 1), "ff": (1, 1, 1, 0, 1, 0, 0, 1)})
    for seed in range(5):
        rnd = random_schedule(like, seed)
        assert {k: sum(p) for k, p in rnd.plans.items()} == {k: sum(p) for k, p in like.plans.items()}
        assert all(p[0] == 1 and p[-1] == 1 for p in rnd.plans.values())
    assert random_schedule(like, 0) == random_schedule(like, 0)


def test_methods_are_matched_in_compute(profile):
    config = DemoConfig(steps=20, compute_fractions=(0.8, 0.5), fixed_intervals=(2, 3))
    methods = plan_methods(profile, config)
    smooth = [m for m in methods if m.method == "smoothcache-optimal"]
    assert [m.schedule.compute_fraction() <= budget for m, budget in zip(smooth, (0.8, 0.5))] == [True, True]
    randoms = [m for m in methods if m.method == "random"]
    assert [r.compute_fraction for r in randoms] == [m.compute_fraction for m in smooth]
    fewer = [m for m in methods if m.method == "fewer-steps"]
    assert {m.steps for m in fewer} <= {max(2, round(20 / s.estimated_speedup)) for s in smooth}
    assert all(m.schedule is None for m in fewer)
    assert {m.method for m in methods} == {
        "smoothcache-optimal", "smoothcache-forecast", "smoothcache", "fixed-interval-2", "fixed-interval-3", "random",
        "fewer-steps",
    }
    forecasting = [m for m in methods if m.method == "smoothcache-forecast"]
    assert [m.schedule.compute_fraction() <= budget for m, budget in zip(forecasting, (0.8, 0.5))] == [True, True]
    assert all(m.forecast == "linear" for m in forecasting)
    assert all(m.forecast == "none" for m in methods if m.method != "smoothcache-forecast")
    with pytest.raises(ValueError, match="Unknown demo solver"):
        run_demo(None, None, DemoConfig(solvers=("fastest",)), progress=False)


def test_every_solver_gets_its_own_runs_within_the_budget(profile):
    config = DemoConfig(steps=20, compute_fractions=(0.65, 0.4), fixed_intervals=(), solvers=("greedy", "optimal", "per-block"))  # greedy first
    methods = plan_methods(profile, config)
    by_method = {}
    for m in methods:
        by_method.setdefault(m.method, []).append(m)
    assert set(by_method) == {"smoothcache", "smoothcache-optimal", "smoothcache-per-block", "random", "fewer-steps"}
    for name in ("smoothcache", "smoothcache-optimal", "smoothcache-per-block"):
        assert [m.compute_fraction <= b + 1e-9 for m, b in zip(by_method[name], (0.65, 0.4))] == [True, True]
    assert all(m.alpha is None for m in by_method["smoothcache-optimal"])
    assert all("-" in key for m in by_method["smoothcache-per-block"] for key in m.schedule.keys)
    # random and fewer-steps follow the first solver's runs
    assert [r.compute_fraction for r in by_method["random"]] == [m.compute_fraction for m in by_method["smoothcache"]]


def test_optimal_solver_through_the_profile(profile):
    for fraction in (0.8, 0.5, 0.35):
        schedule = profile.schedule(compute_fraction=fraction, solver="optimal")
        assert schedule.compute_fraction() <= fraction + 1e-9
        assert schedule.compute_fraction() > fraction - 0.1  # it spends the budget
    fast = profile.schedule(speedup=1.5, solver="optimal")
    assert profile.estimated_speedup(fast) >= 1.5
    per_block = profile.schedule(speedup=1.5, solver="optimal", per_block=True)
    assert profile.estimated_speedup(per_block) >= 1.5 and len(per_block.keys) == 6
    with pytest.raises(smoothcache.ProfileError, match="has no threshold"):
        profile.schedule(alpha=0.1, solver="optimal")
    with pytest.raises(smoothcache.ProfileError, match="Unknown solver"):
        profile.schedule(compute_fraction=0.5, solver="fastest")
    with pytest.raises(smoothcache.ProfileError, match="out of reach"):
        profile.schedule(speedup=50, solver="optimal")


def test_a_speedup_above_its_ideal_is_flagged_as_noise_and_never_the_fastest():
    from smoothcache.cli import demo_table
    from smoothcache.demo.harness import RunResult, timing_noise

    fast = RunResult("smoothcache-optimal", None, 0.4, 20, estimated_speedup=2.42, seconds=0.5, speedup=3.20,
                     fid=7.0, accuracy=1.0, psnr=35.0, ssim=0.98)
    honest = RunResult("smoothcache-optimal", None, 0.5, 20, estimated_speedup=1.96, seconds=0.8, speedup=1.80,
                       fid=7.0, accuracy=1.0, psnr=38.0, ssim=0.99)
    assert timing_noise(fast) and not timing_noise(honest)
    report = {"baseline": {"seconds": 1.5, "fid": 7.0, "accuracy": 1.0}, "samples": 10, "steps": 20, "device": "cpu",
              "runs": [{**{k: v for k, v in vars(r).items() if k != "images"}, "timing_noise": timing_noise(r)}
                       for r in (fast, honest)]}
    table = demo_table(report)
    assert "3.20!" in table and " 1.80 " in table
    assert "1 run measured more than 10% above the ideal speedup: timing noise" in table
