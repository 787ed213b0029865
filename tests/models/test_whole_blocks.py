"""Every family's blocks cached whole (the ``"block"`` component): each block computes exactly on
its plan's steps, and a schedule computing every step changes nothing. Blocks returning a tuple
(Flux, SD3, CogVideoX, ...) rebuild each stream from its own residual."""

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

import smoothcache
from smoothcache import find_layers
from smoothcache.adapters import whole_block_components
from smoothcache.keys import key_for

from .conftest import (
    STEPS,
    WeightUses,
    assert_all_ones_is_bit_identical,
    calibrated_schedule,
)

FAMILIES = [
    "allegro", "auraflow", "cogvideox", "cogview4", "flux", "hunyuan_video", "hunyuandit", "latte",
    "ltx_video", "mochi", "pixart", "qwenimage", "sana", "sd3", "stable_audio", "wan",
]  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_cached_whole_skip_exactly_their_plans_and_all_ones_changes_nothing(name):
    pipe, generate, components, schedule, layers = blocks_of_family(name)
    with WeightUses(layers) as uncached_uses:
        uncached = generate(pipe)
    with smoothcache.cache(pipe, schedule) as handle, WeightUses(layers) as uses:
        cached = generate(pipe)
    assert all(layer.streams is not None for layer in handle.layers)
    for layer in layers:  # a block may use its first weight more than once per call (CogView4)
        plan = schedule.plans[key_for(schedule.plans, layer.layer_type, layer.block)]
        assert uses.counts[layer.name] == sum(plan) * uncached_uses.counts[layer.name] // STEPS, layer.name
    assert not torch.equal(cached, uncached)
    assert_all_ones_is_bit_identical(pipe, generate, components)


class FamilyBlocks(NamedTuple):
    """A family's tiny pipeline, its generate, its whole-block components, a schedule calibrated
    for them and the blocks: what every whole-block test starts from."""

    pipe: Any
    generate: Callable[..., torch.Tensor]
    components: list[str]
    schedule: Any
    layers: list[Any]


def blocks_of_family(name: str) -> FamilyBlocks:
    family_test = importlib.import_module(f".test_{name}", __package__)
    pipe, generate = family_test.make_pipeline(), family_test.generate
    components = whole_block_components(pipe.transformer)
    assert components, name
    schedule = calibrated_schedule(pipe, generate, components)
    return FamilyBlocks(pipe, generate, components, schedule, find_layers(pipe.transformer, components))



@pytest.mark.parametrize("name", ["flux", "sd3", "cogvideox", "pixart"])
def test_forecasting_blocks_skip_exactly_their_plans_and_extrapolate(name):
    """Forecasting blocks, one- and two-stream: the same computes as plain block reuse, other outputs."""
    pipe, generate, _, schedule, layers = blocks_of_family(name)
    with smoothcache.cache(pipe, schedule), WeightUses(layers) as plain_uses:
        reused = generate(pipe)
    with smoothcache.cache(pipe, schedule, forecast="linear"), WeightUses(layers) as uses:
        forecast = generate(pipe)
    assert uses.counts == plain_uses.counts
    assert torch.isfinite(forecast).all() and not torch.equal(forecast, reused)


def test_forecasting_extrapolates_each_tensor_of_a_layer_returning_a_tuple():
    """Flux's joint attention returns (image, text) outputs: a reusing step extrapolates both."""
    family_test = importlib.import_module(".test_flux", __package__)
    pipe, generate = family_test.make_pipeline(), family_test.generate
    plan = (1, 1, 0, 1, 0, 1)
    assert len(plan) == STEPS
    attn = pipe.transformer.transformer_blocks[0].attn
    seen: list[tuple[torch.Tensor, ...]] = []
    attn.register_forward_hook(lambda m, a, out: seen.append(tuple(t.clone() for t in out)))
    with smoothcache.cache(pipe, smoothcache.Schedule({"attn": plan}), forecast="linear"):
        generate(pipe)
    ratios = {2: 1.0, 4: 0.5}  # steps since the last compute over the gap before it
    for step, ratio in ratios.items():
        last, previous = seen[step - 1], seen[step - 2 if step == 2 else step - 3]
        assert len(seen[step]) == 2
        for got, a, b in zip(seen[step], last, previous, strict=True):
            assert torch.allclose(got, a + ratio * (a - b), atol=1e-5)


@pytest.mark.parametrize("forecast", ["none", "linear"])
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_blocks_of_two_streams_cached_under_compile_match_eager(name, forecast):
    """Traced, a block keeps its output and inputs (``KeptStates``) instead of their difference;
    blocks returning two streams must rebuild (or extrapolate) each from its own pair, as eagerly."""
    family_test = importlib.import_module(f".test_{name}", __package__)
    pipe, generate = family_test.make_pipeline(), family_test.generate
    components = whole_block_components(pipe.transformer)
    schedule = calibrated_schedule(pipe, generate, components)
    with smoothcache.cache(pipe, schedule, forecast=forecast):
        expected = generate(pipe)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    try:
        with torch._dynamo.config.patch(recompile_limit=64), smoothcache.cache(pipe, schedule, forecast=forecast):
            compiled = generate(pipe)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(compiled, expected, atol=1e-5)
