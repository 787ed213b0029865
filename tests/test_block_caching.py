"""Blocks cached whole: a reusing step returns the block's input plus the residual it added at the
last computing step; calibration measures how that residual changes; a computing step keeps the
residual only when the next step reuses it; and what cannot be cached whole is refused clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline
from torch import nn

import smoothcache
from smoothcache import BlockCachingError, Schedule, find_layers
from smoothcache.runtime.streams import BlockStreams

PLAN = (1, 1, 0, 1, 0, 0, 1, 0, 1, 1)


class BlockTrace:
    """Each block's (input, output) at every call, seen from outside its (possibly cached) forward."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in blocks]
        for index, block in enumerate(blocks):
            block.register_forward_hook(
                lambda m, args, kwargs, out, i=index: self.calls[i].append((args[0] if args else kwargs["hidden_states"], out)),
                with_kwargs=True,
            )


def test_a_reusing_step_returns_its_input_plus_the_last_computed_residual():
    """Per-block keys: each block keeps and adds its own residual."""
    pipe = make_dit_pipeline()
    blocks = pipe.transformer.transformer_blocks
    trace = BlockTrace(blocks)
    with smoothcache.cache(pipe, Schedule({"block-0": PLAN, "block-1": PLAN})):
        generate(pipe)
    for calls in trace.calls:
        assert len(calls) == STEPS  # DiT batches both guidance halves: one call per step
        residual = None
        for step, (block_input, output) in enumerate(calls):
            if PLAN[step]:
                residual = output - block_input
            else:
                assert torch.equal(output, residual + block_input)


@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_a_whole_list_on_one_key_is_reused_with_one_residual(forecast):
    """One key for every block of the list: a reusing step adds the list's residual (output of the
    last block minus input of the first, at the last computing step; extrapolated with forecasting)
    at the first block, and the others pass their input on; the cache holds one block's worth."""
    pipe = make_dit_pipeline(num_layers=3)
    trace = BlockTrace(pipe.transformer.transformer_blocks)
    first, *rest = trace.calls
    with smoothcache.cache(pipe, Schedule({"block": PLAN}), forecast=forecast) as handle:
        generate(pipe)
        kept = handle.state.kept_bytes()
    last_block = trace.calls[-1]
    residuals: list[torch.Tensor] = []
    computed: list[int] = []
    for step in range(STEPS):
        block_input = first[step][0]
        if PLAN[step]:
            residuals.append(last_block[step][1] - block_input)
            computed.append(step)
            continue
        expected = residuals[-1]
        if forecast == "linear" and len(residuals) > 1:
            ratio = (step - computed[-1]) / (computed[-1] - computed[-2])
            expected = torch.lerp(residuals[-1], residuals[-2], -ratio)
        assert torch.equal(first[step][1], block_input + expected) or torch.equal(first[step][1], expected + block_input)
        assert all(torch.equal(calls[step][1], calls[step][0]) for calls in rest)
    one_block = first[0][0].numel() * first[0][0].element_size()
    assert sum(kept.values()) == one_block * (2 if forecast == "linear" else 1)


def test_a_stream_changed_between_blocks_splits_the_chain_and_reuse_stays_exact():
    """Something that adds to the stream between two blocks (a ControlNet residual, say): the next
    block starts a run of its own, so a reusing step equals per-block reuse."""
    pipe = make_dit_pipeline(num_layers=3)

    def cached_run() -> tuple[torch.Tensor, int]:
        with smoothcache.cache(pipe, Schedule({"block": PLAN})) as handle:
            output = generate(pipe)
            return output, sum(handle.state.kept_bytes().values())

    _, one_run = cached_run()
    blocks = pipe.transformer.transformer_blocks
    blocks[1].register_forward_pre_hook(lambda module, args, kwargs: ((args[0] + 0.5, *args[1:]), kwargs), with_kwargs=True)
    chained, kept = cached_run()
    assert kept == 2 * one_run  # runs [0] and [1, 2]: two residuals
    with smoothcache.cache(pipe, Schedule({f"block-{i}": PLAN for i in range(3)})):
        per_block = generate(pipe)
    torch.testing.assert_close(chained, per_block, rtol=0, atol=1e-5)


def test_a_residual_is_kept_only_where_the_next_step_reuses_it():
    pipe = make_dit_pipeline()
    with smoothcache.cache(pipe, Schedule({"block": (1,) * STEPS})) as handle:
        generate(pipe)
        assert handle.state.opened() > 0 and handle.state.kept() == 0
    with smoothcache.cache(pipe, Schedule({"block": PLAN})) as handle:
        generate(pipe)
        assert handle.state.kept() == handle.state.opened() > 0


def test_calibration_measures_the_rel_l1_change_of_each_block_residual():
    pipe = make_dit_pipeline()
    trace = BlockTrace(pipe.transformer.transformer_blocks)
    with smoothcache.calibration(pipe, components=["block"], lookahead=2) as rec:
        generate(pipe)
    profile = rec.profile
    assert profile.keys() == ["block"]
    residuals = [[(out - x).float() for x, out in calls] for calls in trace.calls]
    # the profile's convention: entry (k, s) is the error of reusing step s's output k steps later
    for source in range(STEPS - 2):
        for k in (1, 2):
            expected = sum(
                ((r[source + k] - r[source]).abs().sum() / r[source + k].abs().sum()).item() for r in residuals
            ) / len(residuals)
            assert profile.curves("block")[k - 1, source] == pytest.approx(expected, rel=1e-4)


def test_a_block_schedule_from_a_profile_runs_and_all_ones_is_bit_identical():
    pipe = make_dit_pipeline(num_layers=3)
    with smoothcache.calibration(pipe, components=["block"]) as rec:
        generate(pipe, seed=1)
    schedule = rec.profile.schedule(compute_fraction=0.5, per_block=True)
    assert set(schedule.keys) == {"block-0", "block-1", "block-2"}
    uncached = generate(pipe)
    with smoothcache.cache(pipe, schedule):
        assert not torch.equal(generate(pipe), uncached)
    with smoothcache.cache(pipe, Schedule({"block": (1,) * STEPS})):
        assert torch.equal(generate(pipe), uncached)


def test_a_block_and_its_own_layers_cannot_both_be_cached():
    pipe = make_dit_pipeline()
    with pytest.raises(BlockCachingError, match="both cache transformer_blocks.0"):
        smoothcache.cache(pipe, Schedule({"block": PLAN, "attn1": PLAN}))
    # another block's layers may be cached beside it
    with smoothcache.cache(pipe, Schedule({"block-0": PLAN, "attn1-1": PLAN})):
        generate(pipe)


def test_guidance_halves_of_a_block_are_refused():
    pipe = make_dit_pipeline()
    with pytest.raises(smoothcache.ScheduleError, match="cached whole"):
        smoothcache.cache(pipe, Schedule({"block@cond": PLAN, "block@uncond": PLAN}))


class Widening(nn.Module):
    """A block whose output does not continue its input: it changes the width."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Widening()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def test_a_block_whose_output_does_not_continue_its_input_is_refused_clearly():
    model = Stack()
    message = r"returned a tensor of shape \(2, 8\) for stream 'x'.*\(2, 4\)"
    with smoothcache.cache(model, Schedule({"block": (1, 0)}), calls_per_step=1), pytest.raises(BlockCachingError, match=message):
        model(torch.randn(2, 4))


def test_streams_are_found_by_keyword_or_position():
    block = find_layers(make_dit_pipeline().transformer, ["block"])[0]
    streams = BlockStreams.of(block.module, block.name, block.streams)
    x = torch.randn(1, 2, 3)
    assert streams.inputs((x,), {})[0] is x and streams.inputs((), {"hidden_states": x})[0] is x
    with pytest.raises(BlockCachingError, match="takes no argument 'context'"):
        BlockStreams.of(block.module, block.name, ["context"])


def test_a_model_call_that_raises_mid_chain_leaves_the_next_generation_exact():
    pipe = make_dit_pipeline(num_layers=3)
    with smoothcache.cache(pipe, Schedule({"block": PLAN})):
        expected = generate(pipe)
    calls = [0]

    def fail_once(module, args, kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the second step, a computing step that keeps: its run is open here
            raise RuntimeError("interrupted")

    hook = pipe.transformer.transformer_blocks[2].register_forward_pre_hook(fail_once, with_kwargs=True)
    with smoothcache.cache(pipe, Schedule({"block": PLAN})):
        with pytest.raises(RuntimeError, match="interrupted"):
            generate(pipe)
        hook.remove()
        assert torch.equal(generate(pipe), expected)


def test_a_call_that_skips_a_runs_first_block_computes_the_blocks_after_it():
    """A model call that leaves out a run's first block on a reusing step (the previous call reused
    that run) cannot add the run's residual: the blocks after it compute, rather than passing on an
    input that lacks what the skipped block would have added."""
    pipe = make_dit_pipeline(num_layers=3)
    blocks = pipe.transformer.transformer_blocks
    reusing_twice = next(step for step in range(1, STEPS) if not PLAN[step - 1] and not PLAN[step])
    calls = [0]

    class SkippingList(nn.ModuleList):
        def __iter__(self):  # DiT's forward iterates its block list
            members = list(super().__iter__())
            return iter(members[1:] if calls[0] == reusing_twice else members)

    attn_calls: list[int] = []
    blocks[1].attn1.register_forward_hook(lambda module, args, out: attn_calls.append(calls[0]))
    pipe.transformer.register_forward_hook(lambda module, args, out: calls.__setitem__(0, calls[0] + 1))
    blocks.__class__ = SkippingList
    with smoothcache.cache(pipe, Schedule({"block": PLAN})):
        generate(pipe)
    assert reusing_twice in attn_calls  # computed, where the first block was left out
    assert [step for step in attn_calls if step != reusing_twice] == [s for s in range(STEPS) if PLAN[s]]
