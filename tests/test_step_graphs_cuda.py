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


def test_two_step_counts_alternating_with_one_set_kept() -> None:
    """With room for one set, each generation drops the other's graphs and captures its own: every
    output is still the plain one, bit for bit (with copy_outputs=False too)."""
    pipe = cuda_pipeline()

    def run(steps: int) -> torch.Tensor:
        return pipe(class_labels=[1, 2], num_inference_steps=steps, generator=torch.Generator("cuda").manual_seed(0),
                    output_type="pt").images.float().cpu()

    plain = {steps: run(steps) for steps in (STEPS, STEPS - 2)}
    with smoothcache.step_graphs(pipe, max_sets=1, copy_outputs=False) as graphs:
        for _ in range(3):
            for steps in (STEPS, STEPS - 2):
                assert torch.equal(run(steps), plain[steps])
        assert len(graphs._sets) == 1 and graphs.stats.captured >= 4 * STEPS - 4


def test_replays_hold_their_memory_flat() -> None:
    """Replays allocate nothing new beyond the copied-out outputs, which the caller frees: what the
    allocator reserves stays put from one replayed generation to the next."""
    pipe = cuda_pipeline()
    with smoothcache.cache(pipe, BLOCKS), smoothcache.step_graphs(pipe) as graphs:
        for _ in range(3):
            latents(pipe)
        torch.cuda.synchronize()
        reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
        for _ in range(3):
            latents(pipe)
        torch.cuda.synchronize()
        assert graphs.stats.replayed == 4 * STEPS
        assert torch.cuda.memory_reserved() == reserved and torch.cuda.memory_allocated() == allocated


def read_on_host(_module, _args, output) -> None:
    """A forward hook that reads a value back on the host (a sync, which no capture allows); returns
    nothing, so the output stays the block's."""
    float(output.sum())


def test_a_forward_that_waits_for_the_gpu_cannot_be_captured() -> None:
    pipe = cuda_pipeline()
    hook = pipe.transformer.transformer_blocks[0].register_forward_hook(read_on_host)
    try:
        graphs = smoothcache.step_graphs(pipe)
        latents(pipe)
        with pytest.raises(smoothcache.GraphCaptureError):
            latents(pipe)
        assert graphs.graphs == 0 and "forward" not in vars(pipe.transformer)
        # the allocator no longer routes into the failed capture's pool (torch before 2.12 left it so)
        pool = graphs.capture.pool
        with pytest.raises(RuntimeError, match="not currently recording"):
            torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), pool)
        latents(pipe)  # the next generation runs without graphs
        # and the failed capture's pool is released: nothing of it stays reserved (the cuBLAS
        # workspaces allocated inside the capture kept two of its segments until step graphs cleared them)
        torch.cuda.empty_cache()
        assert [s for s in torch.cuda.memory_snapshot() if s["segment_pool_id"] == pool] == []
    finally:
        hook.remove()
