import gc
import weakref

import pytest
import torch
from conftest import STEPS, CallCounter, generate, sample_loop
from torch import nn

import smoothcache
from smoothcache import (
    NoCacheableLayersError,
    Schedule,
    ScheduleError,
    StepMismatchError,
)

SKIPPING = Schedule({"attn1": (1, 0, 1, 0, 0, 1, 1, 0, 1, 1), "ff": (1, 1, 0, 1, 0, 1, 0, 1, 0, 1)})


def attn_and_ff_counters(pipe):
    blocks = pipe.transformer.transformer_blocks
    return CallCounter([b.attn1.to_q for b in blocks]), CallCounter([b.ff.net[2] for b in blocks])


def test_all_ones_schedule_is_bit_identical_to_uncached(dit_pipe):
    uncached = generate(dit_pipe)
    with smoothcache.cache(dit_pipe, Schedule({"attn1": (1,) * STEPS, "ff": (1,) * STEPS})):
        assert torch.equal(generate(dit_pipe), uncached)


def test_skipped_steps_really_skip_the_layer(dit_pipe):
    uncached = generate(dit_pipe)
    attn, ff = attn_and_ff_counters(dit_pipe)
    with smoothcache.cache(dit_pipe, SKIPPING):
        cached = generate(dit_pipe)
    blocks = len(dit_pipe.transformer.transformer_blocks)
    assert attn.count == sum(SKIPPING.plans["attn1"]) * blocks
    assert ff.count == sum(SKIPPING.plans["ff"]) * blocks
    assert not torch.equal(cached, uncached)


def test_consecutive_generations_restart_the_schedule(dit_pipe):
    attn, _ = attn_and_ff_counters(dit_pipe)
    with smoothcache.cache(dit_pipe, SKIPPING):
        first = generate(dit_pipe)
        second = generate(dit_pipe)
        generate(dit_pipe, seed=5)
    assert torch.equal(first, second)
    assert attn.count == 3 * sum(SKIPPING.plans["attn1"]) * 2


def test_disable_restores_the_model_exactly_and_frees_cached_outputs(dit_pipe):
    before = generate(dit_pipe)
    kept = []
    spy = dit_pipe.transformer.transformer_blocks[0].attn1.register_forward_hook(
        lambda m, a, out: kept.append(weakref.ref(out))
    )
    handle = smoothcache.cache(dit_pipe, SKIPPING)
    generate(dit_pipe)
    handle.disable()
    spy.remove()
    gc.collect()
    assert kept and all(ref() is None for ref in kept)
    for module in dit_pipe.transformer.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(generate(dit_pipe), before)
    handle.enable()  # and it can come back
    assert not torch.equal(generate(dit_pipe), before)
    handle.disable()


def test_a_previous_instance_forward_is_put_back(dit_pipe):
    attn = dit_pipe.transformer.transformer_blocks[0].attn1
    custom = attn.forward
    attn.forward = custom  # e.g. another library's wrapper
    with smoothcache.cache(dit_pipe, SKIPPING):
        assert attn.__dict__["forward"] is not custom
    assert attn.__dict__["forward"] is custom


def test_per_block_keys_win_over_type_keys(dit_pipe):
    schedule = Schedule({"attn1": (1,) * STEPS, "attn1-1": (1, 0) * (STEPS // 2)})
    first, second = (CallCounter([b.attn1.to_q]) for b in dit_pipe.transformer.transformer_blocks)
    with smoothcache.cache(dit_pipe, schedule):
        generate(dit_pipe)
    assert (first.count, second.count) == (STEPS, STEPS // 2)


def test_step_count_mismatch_is_an_error_unless_asked_to_compute(dit_pipe):
    with smoothcache.cache(dit_pipe, SKIPPING):
        with pytest.raises(StepMismatchError, match="schedule has 10 steps but the pipeline is running 12"):
            generate(dit_pipe, steps=12)
        generate(dit_pipe)  # the handle recovers for a correct call
    attn, _ = attn_and_ff_counters(dit_pipe)
    with smoothcache.cache(dit_pipe, SKIPPING, steps_mismatch="compute"):
        generate(dit_pipe, steps=12)
    assert attn.count == (sum(SKIPPING.plans["attn1"]) + 2) * 2


def test_keys_that_match_no_layer_are_an_error(dit_pipe):
    with pytest.raises(ScheduleError, match=r"Schedule keys \['mlp'\] match no layer of DiTTransformer2DModel"):
        smoothcache.cache(dit_pipe, Schedule({"attn1": (1, 0), "mlp": (1, 0)}))
    with pytest.raises(NoCacheableLayersError, match="indexed blocks: BasicTransformerBlock with children"):
        smoothcache.cache(dit_pipe, Schedule({"attn1": (1, 0)}), components=["attention"])
    with pytest.raises(TypeError, match="Expected a diffusers pipeline with a .transformer or an nn.Module"):
        smoothcache.cache(object(), SKIPPING)


def test_blocks_wrapped_by_torch_compile_are_refused_with_what_to_do_instead(dit_pipe):
    blocks = dit_pipe.transformer.transformer_blocks
    for i, block in enumerate(list(blocks)):
        blocks[i] = torch.compile(block, backend="eager")
    with pytest.raises(NoCacheableLayersError, match=r"its blocks are torch.compile wrappers .*compile_repeated_blocks"):
        smoothcache.cache(dit_pipe, Schedule({"block": (1, 0)}))


class TupleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, *, scale=1.0):
        y = self.linear(x) * scale
        return y, -y


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = TupleLayer()

    def forward(self, x):
        a, b = self.attn(x, scale=0.5)
        return x + a - b


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TupleBlock(), TupleBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_tuple_outputs_keyword_arguments_and_sequential_cfg():
    torch.manual_seed(0)
    model = TupleModel().eval()
    counter = CallCounter([b.attn.linear for b in model.blocks])
    schedule = Schedule({"attn": (1, 0, 1)})
    x_cond, x_uncond = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad(), smoothcache.cache(model, schedule, calls_per_step=2):
        outs = [model(x) for _ in range(3) for x in (x_cond, x_uncond)]
    assert counter.count == 2 * 2 * 2  # 2 computed steps x 2 calls per step x 2 blocks
    # step 1 reuses step 0 per call slot: the conditional call gets the conditional output
    assert torch.equal(outs[2], outs[0]) and torch.equal(outs[3], outs[1])
    assert not torch.equal(outs[2], outs[3])


def test_bare_module_counts_calls_and_wraps_at_the_schedule_length(original_dit):
    x, y = torch.randn(4, 6, 16), torch.tensor([0, 1, 4, 4])
    schedule = Schedule({"attn": (1, 0, 1, 0), "mlp": (1, 1, 0, 1)})
    counter = CallCounter([b.attn.qkv for b in original_dit.blocks])
    with torch.no_grad(), smoothcache.cache(original_dit, schedule):
        a = sample_loop(original_dit.forward_with_cfg, x, 4, y=y, cfg_scale=4.0)
        b = sample_loop(original_dit.forward_with_cfg, x, 4, y=y, cfg_scale=4.0)
    assert torch.equal(a, b)
    assert counter.count == 2 * 2 * 2


def test_more_calls_per_step_than_declared_is_an_error_not_a_new_generation(dit_pipe):
    """A pipeline calling the model twice per step without calls_per_step=2 must not run silently."""
    from types import SimpleNamespace

    transformer, scheduler = dit_pipe.transformer, dit_pipe.scheduler
    pipe = SimpleNamespace(transformer=transformer, scheduler=scheduler)
    schedule = Schedule({"attn1": (1, 0, 1, 1)})
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 2])
    with torch.no_grad(), smoothcache.cache(pipe, schedule):
        scheduler.set_timesteps(4)
        with pytest.raises(StepMismatchError, match="called for step 5"):
            for t in scheduler.timesteps:
                for _ in range(2):  # conditional and unconditional calls
                    transformer(x, timestep=t.expand(2), class_labels=labels)


def test_the_step_is_anchored_at_the_first_cached_layer_in_module_order(dit_pipe):
    # "attn1-1" (block 1) is listed first, but block 0's ff runs first: the step must advance there
    ordered = Schedule({"attn1-1": (1,) * STEPS, "ff-0": (1,) + (0,) * (STEPS - 1)})
    blocks = dit_pipe.transformer.transformer_blocks
    ff0 = CallCounter([blocks[0].ff.net[2]])
    with smoothcache.cache(dit_pipe, ordered) as handle:
        assert [layer.name for layer in handle.layers] == ["transformer_blocks.0.ff", "transformer_blocks.1.attn1"]
        generate(dit_pipe)
    assert ff0.count == 1  # a stale (one step late) decision would compute it twice


class ControlFirstModel(nn.Module):
    """Registers its main blocks first but runs its control blocks first (as Wan VACE does)."""

    def __init__(self) -> None:
        super().__init__()
        self.main_blocks = nn.ModuleList([TupleBlock()])
        self.control_blocks = nn.ModuleList([TupleBlock()])

    def forward(self, x):
        return self.main_blocks[0](self.control_blocks[0](x))


def test_layers_running_before_the_anchor_block_see_the_current_step():
    torch.manual_seed(0)
    model = ControlFirstModel().eval()
    schedule = Schedule({"attn": (1, 0, 1, 0)})
    control = CallCounter([model.control_blocks[0].attn.linear])
    with torch.no_grad(), smoothcache.cache(model, schedule):
        for _ in range(4):
            model(torch.randn(2, 4))
    assert control.count == 2  # steps 0 and 2; decisions one step late would compute steps 0, 1 and 3


def test_a_call_slot_whose_input_shape_changes_computes_before_it_reuses():
    torch.manual_seed(0)
    model = TupleModel().eval()
    counter = CallCounter([b.attn.linear for b in model.blocks])
    with torch.no_grad(), smoothcache.cache(model, Schedule({"attn": (1, 0, 0, 0)})):
        outs = [model(torch.randn(batch, 4)) for batch in (2, 2, 3, 3)]
    assert counter.count == 2 * 2  # steps 0 and 2 (a new batch size) in both blocks
    assert [out.shape[0] for out in outs] == [2, 2, 3, 3]


@pytest.mark.parametrize("solver", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_second_order_solvers_count_every_model_evaluation_as_a_step(dit_pipe, solver):
    # They evaluate the model twice per step but the last; their step_index and timesteps count
    # evaluations, 2N - 1 for N steps, so a step is one evaluation of one call.
    import diffusers

    dit_pipe.scheduler = getattr(diffusers, solver).from_config(dit_pipe.scheduler.config)
    with smoothcache.calibration(dit_pipe) as rec:
        generate(dit_pipe, steps=4)
    assert (rec.profile.num_steps, rec.profile.metadata["calls_per_step"]) == (7, 1)
    schedule = rec.profile.schedule(compute_fraction=0.6)
    attn, ff = attn_and_ff_counters(dit_pipe)
    with smoothcache.cache(dit_pipe, schedule):
        generate(dit_pipe, steps=4)
    assert (attn.count, ff.count) == (sum(schedule.plans["attn1"]) * 2, sum(schedule.plans["ff"]) * 2)
    assert min(sum(plan) for plan in schedule.plans.values()) < 7
    with smoothcache.cache(dit_pipe, Schedule({"attn1": (1, 0, 1, 1)})):
        expected = f"schedule has 4 steps but the pipeline is running 7.*{solver} is a solver of order 2"
        with pytest.raises(StepMismatchError, match=expected):
            generate(dit_pipe, steps=4)


def test_a_bare_module_starts_over_after_a_generation_cut_short(original_dit):
    """Without a scheduler the handle counts calls; a generation cut short, by a model call that
    raised or by a loop stopped between steps (its host-side timestep then rises again), must not
    shift the next generation's steps. (Through DiT's forward_with_cfg, which calls forward
    directly, neither is visible: the model's own hooks do not run.)"""
    x, y = torch.randn(4, 6, 16), torch.tensor([0, 1, 4, 4])
    schedule = Schedule({"attn": (1, 0, 1, 0), "mlp": (1, 1, 0, 1)})
    with torch.no_grad(), smoothcache.cache(original_dit, schedule):
        fresh = sample_loop(original_dit, x, 4, y=y)
        sample_loop(original_dit, x, 2, y=y)  # stopped after 2 of 4 steps
        after_stop = sample_loop(original_dit, x, 4, y=y)
        sample_loop(original_dit, x, 4, y=y)
        with pytest.raises(IndexError):  # a call that raises: a class label past the label table
            original_dit(x, torch.full((4,), 750), torch.tensor([0, 1, 4, 10_000]))
        after_raise = sample_loop(original_dit, x, 4, y=y)
    assert torch.equal(after_stop, fresh) and torch.equal(after_raise, fresh)
