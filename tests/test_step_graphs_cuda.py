"""step_graphs with real CUDA graphs (skipped without CUDA): replayed generations give the plain
path's output bit for bit, uncached and cached (whole blocks, layers with forecasting), eager and
compiled without CUDA graphs, with prefetched timesteps; and the replays happen."""

from __future__ import annotations

import pytest
import torch
from conftest import STEPS, make_dit_pipeline

import smoothcache
from smoothcache import Schedule

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("deterministic_convolutions")]

BLOCKS = Schedule.fixed_interval(["block"], STEPS, 2)
LAYERS = Schedule.fixed_interval(["attn1", "ff"], STEPS, 2)



def cuda_pipeline():
    return make_dit_pipeline(num_layers=3).to("cuda")


def latents(pipe) -> torch.Tensor:
    return pipe(class_labels=[1, 2], num_inference_steps=STEPS, generator=torch.Generator("cuda").manual_seed(0),
                output_type="pt").images.float().cpu()


@pytest.mark.parametrize("schedule, forecast", [(None, "none"), (BLOCKS, "none"), (BLOCKS, "linear"), (LAYERS, "linear")],
                         ids=["uncached", "blocks", "blocks-forecast", "layers-forecast"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_replayed_generations_are_the_plain_path_bit_for_bit(schedule, forecast, compiled) -> None:
    from torch._dynamo.utils import counters

    pipe = cuda_pipeline()
    if compiled:
        pipe.transformer = torch.compile(pipe.transformer)
    cached = smoothcache.cache(pipe, schedule, forecast=forecast) if schedule is not None else None
    graphs = None
    try:
        plain = [latents(pipe) for _ in range(2)]
        assert torch.equal(plain[0], plain[1])
        graphs = smoothcache.step_graphs(pipe)
        compiled_before = counters["stats"]["unique_graphs"]
        outputs = [latents(pipe) for _ in range(4)]
        assert counters["stats"]["unique_graphs"] == compiled_before  # nothing compiled again, in a capture or after
        assert graphs.stats.captured == STEPS and graphs.stats.replayed == 2 * STEPS, graphs.stats
        assert graphs.stats.capture_error is None and graphs.stats.incomplete == 0
        for output in outputs:
            assert torch.equal(output, plain[0])
    finally:
        if graphs is not None:
            graphs.disable()
        if cached is not None:
            cached.disable()
        torch._dynamo.reset()


def test_with_prefetched_timesteps() -> None:
    pipe = cuda_pipeline()
    cached = smoothcache.cache(pipe, BLOCKS)
    plain = latents(pipe)
    with smoothcache.prefetch_timesteps(pipe), smoothcache.step_graphs(pipe) as graphs:
        outputs = [latents(pipe) for _ in range(3)]
        assert graphs.stats.replayed == STEPS
    assert all(torch.equal(output, plain) for output in outputs)
    cached.disable()
