"""forecast="linear": a reusing step extrapolates from a layer's last two computed outputs, computing
steps are unchanged, and under torch.compile the extrapolation ratios recompile nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline

import smoothcache
from smoothcache import Schedule
from smoothcache.runtime.plan import ratios as extrapolation_ratios

PLAN = (1, 1, 0, 0, 1, 0, 1, 0, 0, 1)


def test_ratios_are_steps_since_the_last_compute_over_the_gap_before_it():
    assert extrapolation_ratios((True, True, False, False, True, False, False, False)) == (0.0, 0.0, 1.0, 2.0, 0.0, 1 / 3, 2 / 3, 1.0)
    assert extrapolation_ratios((True, False, True)) == (0.0, 0.0, 0.0)  # no earlier compute: plain reuse


def test_a_reusing_step_extrapolates_from_the_last_two_computed_outputs():
    pipe = make_dit_pipeline()
    outputs: list[torch.Tensor] = []
    pipe.transformer.transformer_blocks[0].attn1.register_forward_hook(lambda m, a, out: outputs.append(out))
    with smoothcache.cache(pipe, Schedule({"attn1": PLAN}), forecast="linear"):
        generate(pipe)
    ratios = extrapolation_ratios(tuple(bool(v) for v in PLAN))
    last = previous = None
    for step, output in enumerate(outputs):
        if PLAN[step]:
            last, previous = output, last
        elif previous is None:
            assert torch.equal(output, last)
        else:
            assert torch.equal(output, torch.lerp(last, previous, -ratios[step]))
            assert torch.allclose(output, last + ratios[step] * (last - previous), atol=1e-6)


def test_all_ones_is_bit_identical_and_forecasting_changes_only_reusing_steps():
    pipe = make_dit_pipeline()
    uncached = generate(pipe)
    with smoothcache.cache(pipe, Schedule({"attn1": (1,) * STEPS, "ff": (1,) * STEPS}), forecast="linear"):
        assert torch.equal(generate(pipe), uncached)
    schedule = Schedule({"attn1": PLAN, "ff": PLAN})
    with smoothcache.cache(pipe, schedule):
        reused = generate(pipe)
    with smoothcache.cache(pipe, schedule, forecast="linear"):
        forecast = generate(pipe)
    assert not torch.equal(forecast, reused)


def test_under_whole_model_compile_each_pattern_and_ratio_is_one_graph_and_nothing_recompiles():
    torch._dynamo.reset()
    pipe = make_dit_pipeline(num_layers=1)  # one block: the patterns and ratios are the schedule's, whatever the depth
    schedule = Schedule({"attn1": PLAN})
    with smoothcache.cache(pipe, schedule, forecast="linear"):
        expected = generate(pipe)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    with smoothcache.cache(pipe, schedule, forecast="linear") as handle:
        first = generate(pipe)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = generate(pipe)
    torch._dynamo.reset()
    assert torch.allclose(first, expected, atol=1e-6) and torch.allclose(second, expected, atol=1e-6)
    # compute, and reuse at ratios 1, 2, 1/3, 1/2: about one graph each (dynamo may turn the float
    # ratio into a graph input after seeing it change, which costs one graph more or saves some)
    assert handle.decision_patterns() == 5 and 2 <= len(graphs) <= 6


def test_under_whole_model_compile_forecasts_pass_the_stream_barrier_and_block_compile_needs_none():
    """As with plain reuse, a run of blocks whose layers extrapolate ends at smoothcache::stream_barrier,
    so inductor cannot fuse every block's extrapolation into the final norm's reduction (measured on an H100 before any barrier: 590 ms per generation, slower than
    uncached); the extrapolation itself stays open to fusion."""
    torch._dynamo.reset()
    pipe = make_dit_pipeline()
    schedule = Schedule({"attn1": PLAN, "ff": PLAN})
    with smoothcache.cache(pipe, schedule, forecast="linear"):
        expected = generate(pipe)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def opaque(name: str) -> int:
        return sum(name in str(node.target) for gm in graphs for node in gm.graph.nodes)

    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    with smoothcache.cache(pipe, schedule, forecast="linear"):
        assert torch.allclose(generate(pipe), expected, atol=1e-6)
    reusing = [gm for gm in graphs if any(node.target is torch.lerp for node in gm.graph.nodes)]
    # every reusing step of PLAN follows two computes: both blocks' attn1 and ff extrapolate, and the
    # run of reusing blocks ends at the last one
    assert reusing and all(sum(node.target is torch.lerp for node in gm.graph.nodes) == 4 for gm in reusing)
    assert opaque("stream_barrier") == len(reusing)
    torch._dynamo.reset()
    pipe = make_dit_pipeline()
    graphs.clear()
    for block in pipe.transformer.transformer_blocks:
        block.compile(backend=backend)
    with smoothcache.cache(pipe, schedule, forecast="linear"):
        assert torch.allclose(generate(pipe), expected, atol=1e-6)
    torch._dynamo.reset()
    assert graphs and opaque("stream_barrier") == 0


def test_an_unknown_forecast_is_refused():
    with pytest.raises(ValueError, match="forecast must be 'none' or 'linear'"):
        smoothcache.cache(make_dit_pipeline(), Schedule({"attn1": PLAN}), forecast="quadratic")


def test_forecasting_says_where_it_does_not_apply(caplog):
    pipe = make_dit_pipeline()
    with smoothcache.cache(pipe, Schedule({"attn1@cond": PLAN, "attn1@uncond": PLAN}), forecast="linear"):
        generate(pipe)
    assert "reuse their kept outputs plainly" in caplog.text and "transformer_blocks.0.attn1" in caplog.text
    caplog.clear()
    for key in ("attn1", "block"):
        with smoothcache.cache(pipe, Schedule({key: PLAN}), forecast="linear"):
            pass
    assert "plainly" not in caplog.text


def test_a_block_extrapolates_its_residual_from_the_last_two_computed_ones():
    """Per-block keys (one key for a whole list extrapolates the list's residual: test_block_caching)."""
    pipe = make_dit_pipeline()
    block = pipe.transformer.transformer_blocks[1]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of every call
    block.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0], out)), with_kwargs=True)
    with smoothcache.cache(pipe, Schedule({"block-0": PLAN, "block-1": PLAN}), forecast="linear"):
        generate(pipe)
    ratios = extrapolation_ratios(tuple(bool(v) for v in PLAN))
    last = previous = None
    for step, (x, out) in enumerate(seen):
        if PLAN[step]:
            last, previous = out - x, last
        elif previous is None:
            assert torch.allclose(out, last + x, atol=1e-6)
        else:
            assert torch.allclose(out, x + last + ratios[step] * (last - previous), atol=1e-5)
    assert any(not p for p in PLAN[2:])  # the plan has extrapolated steps
