"""Caching under diffusers' context parallelism: two CPU processes (gloo) split a tiny Wan
transformer's sequence with Ulysses attention (the model's own ``_cp_plan``: split at ``blocks.0``,
gather at ``proj_out``). Every rank must take the scheduled decision at every step (else the
Ulysses all-to-alls of the ranks no longer pair up), and the cached output must equal the
single-process cached output.

Ring attention is not tested here: in diffusers 0.42.1 no attention backend that runs on CPU
returns the log-sum-exp ring attention needs (``native`` refuses ``return_lse``; ``_native_flash``
has no CPU kernel). ``benchmarks/context_parallel.py`` runs it on GPUs.
"""

from __future__ import annotations

import datetime
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import smoothcache
from smoothcache import Schedule

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available() or "fork" not in multiprocessing.get_all_start_methods():
    pytest.skip("needs torch.distributed with gloo, and fork", allow_module_level=True)

WORLD = 2
STEPS = 4
LATENTS = (1, 4, 3, 8, 8)  # 3 x 4 x 4 = 48 tokens after the (1, 2, 2) patches: 24 per rank
SCHEDULE = Schedule.fixed_interval(["attn1", "ffn"], STEPS, 2)  # computes steps 0, 2, 3
BLOCKS = 2


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=BLOCKS, rope_max_seq_len=32,
    ).eval()


@torch.no_grad()
def generate(model, schedule: Schedule | None) -> tuple[torch.Tensor, list[list[int]], int]:
    """WanPipeline's loop (conditional then unconditional call per step, UniPC); returns the latents,
    per model call how many blocks computed attn1 and ffn, and how many tokens attn1 saw."""
    from diffusers import UniPCMultistepScheduler

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(LATENTS, generator=generator)
    prompt, negative = torch.randn(2, 1, 7, 16, generator=generator)
    pipe = SimpleNamespace(
        transformer=model,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )
    calls: list[list[int]] = []  # per model call: blocks that computed attn1, ffn
    tokens: list[int] = []

    def computed(index: int):
        def hook(module, args) -> None:
            calls[-1][index] += 1
            tokens.append(args[0].shape[1])

        return hook

    # children that run only when their cached layer computes: they see what ran
    handles = [model.register_forward_pre_hook(lambda module, args: calls.append([0, 0]))]
    for block in model.blocks:
        handles.append(block.attn1.to_q.register_forward_pre_hook(computed(0)))
        handles.append(block.ffn.net[0].register_forward_pre_hook(computed(1)))
    handle = smoothcache.cache(pipe, schedule) if schedule is not None else None
    pipe.scheduler.set_timesteps(STEPS)
    for t in pipe.scheduler.timesteps:
        cond = model(latents, t.expand(1), prompt, return_dict=False)[0]
        uncond = model(latents, t.expand(1), negative, return_dict=False)[0]
        latents = pipe.scheduler.step(uncond + 5.0 * (cond - uncond), t, latents, return_dict=False)[0]
    if handle is not None:
        handle.disable()
    for h in handles:
        h.remove()
    return latents, calls, max(tokens)


def cp_rank(rank: int, folder: Path) -> None:
    """One rank: Ulysses CP over gloo, then the same cached generation as the single process."""
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    # diffusers 0.42.1 enable_parallelism computes `rank % torch.accelerator.device_count()`:
    # ZeroDivisionError without an accelerator. This forked process may pretend it has one.
    torch.accelerator.device_count = lambda: 1
    model = tiny_wan()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    uncached = generate(model, None)
    cached = generate(model, SCHEDULE)
    torch.save({"uncached": uncached, "cached": cached}, folder / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Single-process uncached and cached runs, and the same on each of two CP ranks."""
    from diffusers import ContextParallelConfig  # noqa: F401  (imported here, before the fork)

    folder = tmp_path_factory.mktemp("cp")
    single = {"uncached": generate(tiny_wan(), None), "cached": generate(tiny_wan(), SCHEDULE)}
    # fork: the children share this process's imports (spawning would import diffusers twice more)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=cp_rank, args=(rank, folder)) for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=90)
    hung = [w.pid for w in workers if w.is_alive()]
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert not hung, f"CP ranks {hung} hung (ranks out of step?)"
    assert [w.exitcode for w in workers] == [0] * WORLD, "a CP rank failed; its traceback is in the captured stderr"
    ranks = [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]
    return {"single": single, "ranks": ranks}


def test_each_rank_holds_half_the_sequence(runs):
    assert runs["single"]["cached"][2] == 48
    assert [r["cached"][2] for r in runs["ranks"]] == [24, 24]


def test_every_rank_runs_exactly_the_scheduled_steps(runs):
    plan = SCHEDULE.plans["attn1"]
    expected = [[BLOCKS * plan[step]] * 2 for step in range(STEPS) for _ in range(2)]  # 2 calls per step (CFG)
    assert plan == (1, 0, 1, 1)
    assert runs["single"]["cached"][1] == expected
    for rank in runs["ranks"]:
        assert rank["cached"][1] == expected
        assert rank["uncached"][1] == [[BLOCKS, BLOCKS]] * (2 * STEPS)


def test_cached_cp_output_equals_cached_single_process_output(runs):
    single_cached = runs["single"]["cached"][0]
    # caching changes the output, so equality below is not trivially met by an uncached run
    assert (single_cached - runs["single"]["uncached"][0]).abs().max() > 1e-3
    for rank in runs["ranks"]:
        torch.testing.assert_close(rank["uncached"][0], runs["single"]["uncached"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["cached"][0], single_cached, rtol=1e-5, atol=1e-5)
